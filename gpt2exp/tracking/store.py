"""Is an MLflow store there before anything reads it: a SQLite URI must name an existing file (else
MLflow would quietly create an empty store), and a tracking server must answer within seconds (else
MLflow's client retries for minutes). No MLflow import: a check costs nothing."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from gpt2exp.errors import Gpt2expError

TIMEOUT_S = 5.0


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (query string dropped), None for any other URI."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def missing_sqlite(uri: str) -> Path | None:
    """The database file ``uri`` names when it does not exist (reading it would create an empty store), else None."""
    path = sqlite_path(uri)
    return path if path is not None and not path.is_file() else None


def check_store(uri: str, error: type[Gpt2expError] = Gpt2expError) -> None:
    """Raise ``error`` (one line) when ``uri`` names a SQLite file that does not exist or a server that
    does not answer; other URIs are left to MLflow."""
    if (path := missing_sqlite(uri)) is not None:
        raise error(f"no MLflow store at {path}: run an experiment first, or pass --output / --tracking-uri")
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: up (it may want a token, or have no /health)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise error(f"no MLflow server answers at {uri} ({reason}); start it, or fix --tracking-uri") from None
