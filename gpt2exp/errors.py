"""One error path: every failure the user can act on is a :class:`Gpt2expError` (a one-line message
and an exit code), and the CLI turns any other exception into one ``error: ...`` line with
:func:`describe`. Light on purpose: no torch, MLflow or Ray import."""

from __future__ import annotations

import re
from pathlib import Path

INPUT, RUNTIME = 2, 1  # exit codes: the user's input is wrong / something failed while working
LIBRARIES = ("mlflow", "ray", "safetensors", "torch")  # their errors are expected (a bad store, model, cluster)


class Gpt2expError(Exception):
    """A failure the user can act on: ``message`` is one line, ``code`` the exit code (2: input, 1: runtime)."""

    code: int = RUNTIME

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def printable(text: str) -> str:
    """``text`` with control characters (which would break or forge lines) shown as escapes; a message
    that repeats the user's input stays the one line it is meant to be."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


_RAISED = re.compile(r"^[\w.]*(Error|Exception|Diverged|Interrupt)\b.*: ")  # "ValueError: ...", "ray.exceptions.X: ..."


def last_raised(lines: list[str]) -> str | None:
    """The last line of ``lines`` that reports a raised exception (``SomeError: message``), if any."""
    return next((line for line in reversed(lines) if _RAISED.match(line)), None)


def one_line(text: str) -> str:
    """The telling line of an error message: the last ``SomeError: ...`` line of an embedded traceback
    (Ray wraps them), else the first line, with the next one when it ends in a colon; at most 500 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if raised := last_raised(lines):
        return raised[:500]
    head = lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1]
    return " ".join(head)[:500]


def _library(e: BaseException) -> str | None:
    """The library among ``LIBRARIES`` that defines or raised ``e`` (None: neither)."""
    modules = [type(e).__module__]
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", ""))
    return next((m.split(".")[0] for m in modules if m.split(".")[0] in LIBRARIES), None)


def describe(e: Exception) -> tuple[str, int]:
    """The message and exit code for an exception that reached the CLI: gpt2exp's own as they are,
    an OSError as ``file: reason``, and in one line errors of MLflow, Ray, safetensors and torch with
    their type, anything else flagged as unexpected (``GPT2EXP_DEBUG=1`` shows its traceback)."""
    if isinstance(e, Gpt2expError):
        return e.message, e.code
    if isinstance(e, OSError):
        where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return (f"{where}: {e.strerror}" if where and e.strerror else one_line(str(e)) or type(e).__name__), RUNTIME
    text = f"{type(e).__name__}: {one_line(str(e))}".removesuffix(": ")
    return (text if _library(e) else f"unexpected {text} (GPT2EXP_DEBUG=1 shows the traceback)"), RUNTIME


def check_inside(root: Path, path: Path) -> Path:
    """``path`` resolved, after checking that it stays inside ``root`` (both with symlinks resolved):
    for every output path built from a name, so that neither a name nor a link leads out of --output."""
    root, resolved = root.resolve(), path.resolve()
    if not resolved.is_relative_to(root):
        raise Gpt2expError(f"{path} leads outside the output folder {root}; rename it", INPUT)
    return resolved
