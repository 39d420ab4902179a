"""Reaching a Ray cluster's dashboard: its address, its token, its nodes, and Ray's Jobs client.

A wrong address is a one-line error within seconds (a short timeout); a head that is still starting on this
machine, or a cluster that answers "try again later", is waited out by :class:`Patience`. Every failure here is
a :class:`SubmitError` (a one-line message and an exit code) for the CLI to print."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2exp import _ray_compat
from gpt2exp.errors import Gpt2expError

CONNECT_TIMEOUT_S = 5.0  # the dashboard answers in milliseconds; a wrong address must fail fast
RETRY_S = 60.0  # how long a cluster's transient answers (a head still starting, "try again later") are waited out


class SubmitError(Gpt2expError):
    """A one-line reason for the user, and the exit code (1: cluster or job; 2: the spec or the inputs)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class Unreachable(SubmitError):
    """No answer from the dashboard; ``refused``: nothing listens at its address."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


def to_stderr(text: str) -> None:
    """The default ``say``: one note on stderr."""
    print(text, file=sys.stderr, flush=True)


@dataclass
class Patience:
    """Waits out a cluster's transient answers, for up to ``RETRY_S`` in all, saying once that it waits."""

    address: str
    say: Callable[[str], None] = to_stderr
    deadline: float | None = None

    def wait(self, why: str) -> bool:
        """Sleep a moment and return True (try again), or False once the time is up."""
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + RETRY_S
            self.say(f"waiting for the Ray cluster at {self.address}: {why} (retrying for up to {RETRY_S:g} s)")
        if now >= self.deadline:
            return False
        time.sleep(min(0.5, self.deadline - now))
        return True


def resolve_address(address: str | None) -> str:
    """The dashboard URL to use: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``.
    ``HEAD:8265`` becomes ``http://HEAD:8265``; Ray Client (``ray://``) and GCS addresses are refused."""
    given = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not given or given == "auto":
        raise SubmitError("no Ray cluster address: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    url = given.strip().rstrip("/")
    if url.startswith("ray://"):
        raise SubmitError(
            f"{given} is a Ray Client address; gpt2exp talks to the cluster's Jobs API on the dashboard: use http://HEAD:8265"
        )
    if "://" not in url:
        url = f"http://{url}"
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(f"{given} is not a dashboard address: use http://HEAD:8265")
    if parsed.port == 6379:
        raise SubmitError(f"{given} looks like the cluster's GCS port (6379); the Jobs API is on the dashboard: http://HEAD:8265")
    return url


def find_token() -> tuple[str, str] | None:
    """Ray's token for this machine and where it came from: ``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` (the file ``ray start`` writes)."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    path = Path(os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"))
    with contextlib.suppress(OSError):
        if token := path.read_text().strip():
            return token, str(path)
    return None


def _unreachable(url: str, reason: object) -> Unreachable:
    why = getattr(reason, "reason", reason)
    refused = isinstance(why, ConnectionRefusedError) or "refused" in str(why)
    if isinstance(why, (socket.timeout, TimeoutError)) or "timed out" in str(why):
        text = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    elif refused:
        text = "connection refused"
    elif isinstance(why, socket.gaierror):
        text = "unknown host"
    else:
        text = str(why)
    return Unreachable(
        f"cannot reach a Ray dashboard at {url} ({text}): check the address and port (default 8265) and that the "
        "cluster runs (`ray start --head --dashboard-host=0.0.0.0` to reach it from other machines)",
        refused,
    )


def head_starting_here(url: str) -> bool:
    """Whether a Ray head whose dashboard is to listen at ``url`` is starting on this machine: a ``ray start
    --head`` still runs (``--block`` runs for good) or a Ray dashboard process exists, for that port. Then
    a refused connection means "not yet"; any other refused connection is a wrong address."""
    import psutil

    parsed = urllib.parse.urlparse(url)
    if not is_local_host(parsed.hostname or ""):
        return False
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if _dashboard_port(process.info["cmdline"] or []) == parsed.port:
                return True
    return False


def _dashboard_port(args: list[str]) -> int | None:
    """The dashboard port of a ``ray start --head`` or Ray dashboard command line (else None; a private
    cluster's dashboard process serves no HTTP: ``--disable-frontend``)."""
    if "--disable-frontend" in args:
        return None
    if any(a.endswith("dashboard/dashboard.py") for a in args):
        flag, port = "--port", None
    elif "--head" in args and "start" in args and any(Path(a).name == "ray" for a in args[:2]):
        flag, port = "--dashboard-port", 8265
    else:
        return None
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            port = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            port = args[i + 1]
    try:
        return int(port) if port is not None else None
    except ValueError:
        return None


def http_json(url: str, headers: dict[str, str] | None = None, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """GET ``url`` and parse JSON; HTTP errors come back as ``urllib.error.HTTPError``, others as SubmitError."""
    request = urllib.request.Request(url, headers=headers or {})
    base = url.split("/api/", 1)[0]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(base, e) from None
    try:
        return json.loads(body)
    except ValueError:
        raise SubmitError(f"{base} answered, but not as a Ray dashboard does (no JSON from {url})") from None


@dataclass
class Cluster:
    """A Ray cluster reached through its dashboard: the Jobs client, the headers it needs, its nodes."""

    address: str
    headers: dict[str, str]
    token_source: str | None = None
    ray_version: str | None = None
    _client: Any = None

    @property
    def client(self) -> Any:
        """Ray's ``JobSubmissionClient`` for this address (auth header included)."""
        if self._client is None:
            self._client = _job_client(self)
        return self._client

    def nodes(self) -> list[Node]:
        """The alive nodes and their total resources."""
        try:
            data = http_json(f"{self.address}/api/v0/nodes?limit=10000&timeout=10", self.headers, timeout=15)
        except urllib.error.HTTPError as e:
            raise self._http_error(e, "list the cluster's nodes") from None
        rows = (data.get("data") or {}).get("result") or {}
        rows = rows.get("result", []) if isinstance(rows, dict) else rows
        return [
            Node(r.get("node_ip") or "?", bool(r.get("is_head_node")), dict(r.get("resources_total") or {}))
            for r in rows
            if r.get("state") == "ALIVE"
        ]

    def on_this_machine(self, nodes: list[Node]) -> bool:
        """Whether the head node is this machine: its node address is one of this machine's (the dashboard
        address alone can mislead: ``ray dashboard`` and ``kubectl port-forward`` make a remote head 127.0.0.1)."""
        head = next((n for n in nodes if n.is_head), None)
        host = head.ip if head else urllib.parse.urlparse(self.address).hostname or ""
        return is_local_host(host)

    def _http_error(self, e: urllib.error.HTTPError, doing: str) -> SubmitError:
        if e.code in (401, 403):
            return auth_error(self.address, e.code, self.token_source)
        return SubmitError(f"the Ray dashboard at {self.address} could not {doing}: HTTP {e.code} {e.reason}")


@dataclass(frozen=True)
class Node:
    """An alive node of the cluster: its address, whether it is the head, its total resources."""

    ip: str
    is_head: bool
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))


def auth_error(address: str, status: int, token_source: str | None) -> SubmitError:
    """The one-line fix for a refused request: where a token goes, or which one was wrong."""
    if token_source is None or status == 401:
        return SubmitError(
            f"the Ray cluster at {address} requires its authentication token and none was found here: copy the head "
            "node's ~/.ray/auth_token to this machine's ~/.ray/auth_token (or set RAY_AUTH_TOKEN)"
        )
    return SubmitError(
        f"the Ray cluster at {address} refused the token from {token_source}: it is another cluster's token; copy the "
        "head node's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN)"
    )


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine."""
    if host in ("localhost", ""):
        return True
    try:
        ips = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):
        return False
    if all(ip.is_loopback for ip in ips):
        return True
    try:
        import psutil

        mine = {
            ipaddress.ip_address(a.address.split("%")[0])
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
        }
    except (ImportError, ValueError, OSError):
        return False
    return bool(ips & mine)


def connect(address: str | None = None, patience: Patience | None = None) -> Cluster:
    """Reach the dashboard at ``address`` (or RAY_ADDRESS) and learn whether it wants a token; a refused
    connection to a head that is starting on this machine is retried (``patience``).

    ``/api/authentication_mode`` is the one endpoint Ray serves without a token: it says ``token`` when the
    cluster runs Ray's token authentication (the default of ``ray start`` once a token exists). The token is
    then sent as ``Authorization: Bearer ...`` on every request, so nobody has to set ``RAY_AUTH_MODE``."""
    url = resolve_address(address)
    patience = patience or Patience(url)
    not_ray = "that is not a Ray dashboard (the dashboard listens on port 8265 by default)"
    while True:
        try:
            mode = http_json(f"{url}/api/authentication_mode").get("authentication_mode", "disabled")
            break
        except urllib.error.HTTPError as e:
            if e.code != 404:  # 404: a Ray without token authentication (older than 2.52), or not Ray at all
                raise SubmitError(f"{url} answered HTTP {e.code} {e.reason}: {not_ray}") from None
            mode = "disabled"
            break
        except Unreachable as e:
            if not (e.refused and head_starting_here(url) and patience.wait("its head is starting")):
                raise
    cluster = Cluster(url, {})
    if mode == "token":
        found = find_token()
        if found is None:
            raise auth_error(url, 401, None)
        cluster = Cluster(url, {"Authorization": f"Bearer {found[0]}"}, found[1])
    try:  # the token works and a Ray dashboard answers, within the short timeout
        version = http_json(f"{url}/api/version", cluster.headers)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise auth_error(url, e.code, cluster.token_source) from None
        raise SubmitError(f"{url} answered HTTP {e.code} {e.reason} to /api/version: {not_ray}") from None
    if not isinstance(version, dict) or "ray_version" not in version:
        raise SubmitError(f"{url} answered /api/version without a Ray version: {not_ray}")
    cluster.ray_version = str(version["ray_version"])
    return cluster


@contextlib.contextmanager
def _address_env(address: str) -> Iterator[None]:
    """Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument: make them agree."""
    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS",)}
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_ray_logs() -> None:
    """Ray's client logs every packaging step and websocket close at INFO; keep warnings only."""
    _ray_compat.quiet_client_loggers()


def _job_client(cluster: Cluster) -> Any:
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # ray[train] alone has no Jobs SDK
        raise SubmitError(f"Ray's Jobs SDK is not installed ({e}): pip install 'ray[default]'") from None
    quiet_ray_logs()
    try:
        with _address_env(cluster.address):
            return JobSubmissionClient(cluster.address, headers=dict(cluster.headers))
    except AuthenticationError as e:
        raise auth_error(cluster.address, 403 if "failed" in str(e) else 401, cluster.token_source) from None
    except (ConnectionError, OSError) as e:
        raise _unreachable(cluster.address, e) from None
    except RuntimeError as e:
        if "ray[default]" in str(e):  # no requests/aiohttp: ray[train] alone
            raise SubmitError("Ray's Jobs SDK needs ray[default] on this machine: pip install 'ray[default]'") from None
        raise SubmitError(f"the Ray cluster at {cluster.address}: {first_line(str(e))}") from None


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def job_api_error(cluster: Cluster, e: Exception, doing: str) -> SubmitError:
    """The one-line SubmitError for an exception of Ray's Jobs client while ``doing`` something on ``cluster``."""
    from ray.exceptions import AuthenticationError

    if isinstance(e, SubmitError):
        return e
    if isinstance(e, AuthenticationError):
        return auth_error(cluster.address, 403 if "failed" in str(e) else 401, cluster.token_source)
    if isinstance(e, (ConnectionError, OSError)) and not isinstance(e, FileNotFoundError):
        return _unreachable(cluster.address, e)
    return SubmitError(f"could not {doing} on {cluster.address}: {ray_answer(e)}")


def ray_answer(e: Exception) -> str:
    """The first line of a Jobs client error, e.g. ``500: No available agent to submit job, please try again later``."""
    return first_line(str(e)).removeprefix("Request failed with status code ").rstrip(".")


def describe_nodes(nodes: list[Node]) -> str:
    """E.g. ``3 node(s), 72 CPU(s), 8 GPU(s)``."""
    gpus = sum(n.gpus for n in nodes)
    return f"{len(nodes)} node(s), {sum(n.cpus for n in nodes):g} CPU(s)" + (f", {gpus:g} GPU(s)" if gpus else "")
