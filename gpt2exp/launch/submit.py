"""Submit an experiment to a running Ray cluster as a Ray Job, and look after its jobs.

``gpt2exp submit SPEC --address http://HEAD:8265`` does, on the client:

1. validates the spec with its ``--set`` overrides (and ``parallel.launcher=ray``), as ``gpt2exp run`` would;
2. reaches the cluster's dashboard (a short timeout: a wrong address is a one-line error within seconds; a head
   that is still starting, refusing connections while ``ray start`` runs here, listing no node yet or answering
   "try again later", is waited for up to a minute, saying so once) and
   sends the cluster's token when the cluster wants one (Ray's token authentication: the token comes from
   ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, as with Ray's own tools);
3. asks the cluster for its alive nodes and their resources (the dashboard's state API, ``/api/v0/nodes``)
   and checks the rules a cluster puts on an experiment: the workers fit, and on a multi-node cluster the
   output folder, the token cache and the MLflow tracking URI are reachable from every node;
4. packs the project folder (the working directory: ``.gitignore``, ``.rayignore`` and ``--exclude`` are
   honoured, as Ray does for a ``working_dir``; ``SECRETS`` such as ``.env`` files, keys and Ray's token are
   always left out) into a zip together with the *effective* spec (the YAML with the overrides applied) at
   ``.gpt2exp-submit/<submission id>.yaml``, so the job runs exactly what was validated here, wherever the
   spec file lived;
5. submits ``python -m gpt2exp.cli run .gpt2exp-submit/<id>.yaml --launcher ray --output OUT --no-progress``
   with that zip as ``working_dir`` and the environment the job needs (tracking URI, caches, Ray Train's
   poll interval), under a submission id that names the experiment: ``gpt2exp-<spec name>-<UTC time>``.

``gpt2exp pipeline submit PIPELINE`` does the same for a whole pipeline: the rules apply to every run stage's
experiment, the package holds the pipeline made self-contained (its run stages' specs inline), and the job runs
``gpt2exp pipeline run`` with the Ray launcher for every run stage.

Inside the job, Ray sets ``RAY_ADDRESS``, so ``ensure_ray()`` joins the cluster instead of starting one;
the driver runs on the head node, its Ray Train workers wherever the cluster has room.

On a multi-node cluster the entrypoint is ``python -m gpt2exp.launch.submit checked-run OUT SPEC ...``: in the
same driver process, a marker written into the output folder must be visible from every node (the one reliable
test that the folder is on a shared filesystem; a client cannot see that from outside), then ``gpt2exp run``.

``--dry-run`` stops before step 2: it lists what the package holds and the entrypoint, contacting no one.

Everything here raises :class:`SubmitError` (a one-line message and an exit code) for the CLI to print.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from gpt2exp.errors import Gpt2expError
from gpt2exp.spec import ExperimentSpec, SpecError, load_spec, parse_overrides

CONNECT_TIMEOUT_S = 5.0  # the dashboard answers in milliseconds; a wrong address must fail fast
SPEC_DIR = ".gpt2exp-submit"  # where the effective spec lies inside the uploaded package
PACKAGE_LIMIT = 100 * 1024**2  # Ray refuses working_dir packages of 100 MiB and more
PACKAGE_WARNING = 25 * 1024**2
RETRY_S = 60.0  # how long a cluster's transient answers (a head still starting, "try again later") are waited out
# never uploaded, whatever the ignore files say: dotenv files, Ray's token folder, SSH keys, keys, credentials
SECRETS = [".env*", ".ray/", "id_*", "*.pem", "*.key", "*credentials*"]
ALWAYS_EXCLUDED = [".git", ".venv", "venv", "__pycache__", SPEC_DIR, *SECRETS]  # Ray's defaults, plus ours
OBJECT_STORES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://")
FILE_STORES = ("sqlite:", "file:")
JOB_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # the Train controller actor reads it: set it job-wide
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PYTHONUNBUFFERED": "1",  # logs reach `--follow` as they are written
}


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


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Patience:
    """Waits out a cluster's transient answers, for up to ``RETRY_S`` in all, saying once that it waits."""

    address: str
    say: Callable[[str], None] = _stderr
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


# ------------------------------------------------------------------------------------- connecting
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
        ips = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
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


def _quiet_ray_logs() -> None:
    """Ray's client logs every packaging step and websocket close at INFO; keep warnings only."""
    import logging

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _job_client(cluster: Cluster) -> Any:
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # ray[train] alone has no Jobs SDK
        raise SubmitError(f"Ray's Jobs SDK is not installed ({e}): pip install 'ray[default]'") from None
    _quiet_ray_logs()
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
        raise SubmitError(f"the Ray cluster at {cluster.address}: {_first_line(str(e))}") from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# ------------------------------------------------------------------------------------------ rules
@dataclass
class Payload:
    """What a job runs, validated here: an experiment spec or a pipeline (its YAML travels in the package)."""

    name: str  # the experiment's or the pipeline's: names the submission
    summary: str  # e.g. "2 variant(s)", for the notes
    experiments: list[ExperimentSpec]  # what it trains (the resource and data rules apply to each)
    tracking_uri: str | None  # given in the file (else MLFLOW_TRACKING_URI); None with tracking off
    tracking: bool
    yaml_text: str
    command: list[str]  # the gpt2exp words before the file: ["run"] or ["pipeline", "run"]
    extra_args: list[str] = field(default_factory=list)  # after the common options (e.g. --from STAGE)
    mlflow_experiment: str = ""  # where to watch it in MLflow


@dataclass
class Plan:
    """What will be submitted, and why it is allowed to run on this cluster."""

    payload: Payload
    submission_id: str
    output: str
    tracking_uri: str | None
    env_vars: dict[str, str]
    entrypoint: str
    working_dir: Path
    nodes: list[Node]
    notes: list[str] = field(default_factory=list)


def _gpu_and_cpu_need(spec: ExperimentSpec) -> list[tuple[str, int, float, float]]:
    """(variant, workers, GPUs per worker, CPUs per worker) of every variant."""
    out = []
    for v in spec.expand():
        p = v.spec.parallel
        out.append((v.name, p.num_workers, p.gpus_per_worker if p.use_gpu else 0.0, float(p.cpus_per_worker or 1)))
    return out


def check_fit(spec: ExperimentSpec, nodes: list[Node]) -> None:
    """Every variant's worker group fits the cluster: GPUs (in total, and per worker on one node) and CPUs."""
    total_gpus, total_cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    max_node_gpus = max((n.gpus for n in nodes), default=0.0)
    where = f"the cluster has {len(nodes)} node(s), {total_cpus:g} CPU(s), {total_gpus:g} GPU(s)"
    for name, workers, gpus, cpus in _gpu_and_cpu_need(spec):
        label = f"variant {name}: " if name != "base" else ""
        if gpus:
            if total_gpus == 0:
                raise SubmitError(f"{label}parallel.use_gpu is true but {where}: add GPU nodes or set parallel.use_gpu=false", 2)
            if workers * gpus > total_gpus:
                raise SubmitError(
                    f"{label}{workers} workers x {gpus:g} GPU = {workers * gpus:g} GPUs, but {where}: lower parallel.num_workers "
                    "or parallel.gpus_per_worker",
                    2,
                )
            if gpus > max_node_gpus:
                raise SubmitError(
                    f"{label}parallel.gpus_per_worker={gpus:g} but the largest node has {max_node_gpus:g} GPU(s) (a worker runs on one node)",
                    2,
                )
        if workers * cpus > total_cpus:
            raise SubmitError(
                f"{label}{workers} workers x {cpus:g} CPU = {workers * cpus:g} CPUs, but {where}: lower parallel.num_workers"
                + (" or parallel.cpus_per_worker" if cpus > 1 else ""),
                2,
            )


def is_file_store(uri: str) -> bool:
    """A tracking URI that is a file on one machine (SQLite, a file store, a bare path)."""
    return uri.startswith(FILE_STORES) or ("://" not in uri and not uri.startswith("databricks"))


def check_tracking(uri: str | None, multi_node: bool) -> None:
    """On a multi-node cluster the workers log to MLflow themselves: the store must be a server they reach."""
    if not multi_node:
        return
    if uri is None:
        raise SubmitError(
            "a multi-node cluster needs an MLflow server that every node reaches (the default store is a SQLite file on one "
            "node): start `mlflow server --host 0.0.0.0 --port 5000` and pass --set tracking.tracking_uri=http://HOST:5000 "
            "(or set MLFLOW_TRACKING_URI)",
            2,
        )
    if is_file_store(uri):
        raise SubmitError(
            f"MLflow at {uri} is a file on one machine; workers on other nodes can't reach it: start `mlflow server "
            "--host 0.0.0.0 --port 5000` and pass --set tracking.tracking_uri=http://HOST:5000",
            2,
        )
    host = urllib.parse.urlparse(uri).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        raise SubmitError(
            f"MLflow at {uri} is a loopback address: on the other nodes it means themselves; use the server's network "
            "address (e.g. http://10.0.0.5:5000) and start it with --host 0.0.0.0",
            2,
        )


def absolute_store(uri: str | None, on_this_machine: bool) -> str | None:
    """A relative SQLite URI (``sqlite:///mlflow.db``) would land in the job's temporary copy of the project: made
    absolute here when the head is this machine, refused otherwise."""
    if not uri or not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    if on_this_machine:
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    raise SubmitError(
        f"MLflow at {uri} is a relative path: in the job it would be a file in a temporary copy of the project; give "
        "an absolute one (sqlite:////path/mlflow.db) or a server (http://HOST:5000)",
        2,
    )


def check_output(output: str | None, multi_node: bool, on_this_machine: bool) -> str:
    """The output folder the job writes to, as the cluster will see it.

    Single node on this machine: any folder (made absolute here). Single remote node: an absolute path on that
    node (the job runs in a temporary copy of the project, so a relative one would vanish). Several nodes: an
    absolute path on a filesystem mounted at the same place on every node, because the workers write run status
    and Ray Train checkpoints there; the job checks that before it trains (``checked-run``)."""
    if output and output.startswith(OBJECT_STORES):
        raise SubmitError(
            f"--output {output}: gpt2exp writes its run folders with ordinary file I/O; mount the bucket on every node "
            "(s3fs, mountpoint-s3, gcsfuse, blobfuse2) and give the mount path, e.g. --output /mnt/bucket/gpt2exp",
            2,
        )
    if output and "://" in output:
        raise SubmitError(f"--output {output}: give a folder path", 2)
    if on_this_machine and not multi_node:
        return str(Path(output or "outputs").expanduser().resolve())
    if not output or not PurePosixPath(output).is_absolute():  # `~` too: it would mean this machine's home
        what = "several nodes" if multi_node else "a remote head node"
        raise SubmitError(
            f"a cluster with {what} needs --output as an absolute path that "
            + (
                "every node mounts at the same place (NFS, EFS, Filestore, a mounted bucket), e.g. --output /mnt/shared/gpt2exp"
                if multi_node
                else "exists on the head node, e.g. --output /home/ray/gpt2exp-outputs"
            )
            + ": the job runs in a temporary copy of the project",
            2,
        )
    return output


def check_data_cache(spec: ExperimentSpec, multi_node: bool) -> None:
    """Workers read the token files that the driver wrote: on several nodes a custom cache must be absolute."""
    if not multi_node:
        return
    for v in spec.expand():
        cache = v.spec.data.cache_dir
        if cache is not None and not cache.startswith(("/", "~")):
            raise SubmitError(
                f"data.cache_dir {cache!r} is relative: workers on other nodes read the token files from it; leave it unset "
                "(the job keeps its token cache in the shared output folder) or give an absolute shared path",
                2,
            )


# ---------------------------------------------------------------------------------------- packing
def effective_spec_yaml(spec_path: Path, overrides: Iterable[str]) -> str:
    """The spec file with the overrides applied (before validation: what ``load_spec`` validates)."""
    from gpt2exp.spec import set_dotted

    raw = yaml.safe_load(Path(spec_path).read_text())
    for key, value in parse_overrides(overrides).items():
        set_dotted(raw, key, value)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def new_submission_id(name: str, now: datetime | None = None) -> str:
    """``gpt2exp-<spec name>-<UTC yyyymmdd-hhmmss>``: readable, sortable, names the experiment."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"gpt2exp-{re.sub(r'[^A-Za-z0-9_-]', '-', name)}-{stamp}"


def _create_package(folder: Path, target: Path, excludes: list[str]) -> None:
    """Zip ``folder`` the way Ray packs a ``working_dir`` (``.gitignore``, ``.rayignore``, excludes)."""
    from ray._private.runtime_env.packaging import create_package

    _quiet_ray_logs()
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    create_package(str(folder), target, include_gitignore=include_gitignore, excludes=excludes)


def build_package(working_dir: Path, spec_name: str, spec_yaml: str, target: Path, excludes: Iterable[str] = ()) -> Path:
    """The job's ``working_dir`` as one zip: the project folder, the effective spec at
    ``.gpt2exp-submit/<spec_name>``, and the ``gpt2exp`` package itself when the folder does not hold it."""
    _create_package(working_dir, target, [*ALWAYS_EXCLUDED, *excludes])
    with zipfile.ZipFile(target, "a", compression=zipfile.ZIP_DEFLATED) as z:
        names = set(z.namelist())
        z.writestr(f"{SPEC_DIR}/{spec_name}", spec_yaml)
        if "gpt2exp/__init__.py" not in names:  # run from elsewhere: ship the package that is imported here
            package = Path(__file__).resolve().parents[1]
            for path in sorted(package.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    z.write(path, PurePosixPath("gpt2exp", *path.relative_to(package).parts).as_posix())
    size = target.stat().st_size
    if size >= PACKAGE_LIMIT:
        raise SubmitError(
            f"the project folder {working_dir} packs to {size / 1024**2:.0f} MiB, over Ray's limit of 100 MiB: add the big "
            "files or folders (data, checkpoints, outputs) to .rayignore, or pass --exclude PATTERN",
            2,
        )
    return target


def job_env(tracking_uri: str | None, output: str, multi_node: bool, on_this_machine: bool) -> dict[str, str]:
    """The environment of the job (driver and workers): tracking, caches, Ray Train's poll interval."""
    env = dict(JOB_ENV_DEFAULTS)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if tiktoken_cache := os.environ.get("TIKTOKEN_CACHE_DIR"):  # missing there: the tokenizer falls back to its package
        env["TIKTOKEN_CACHE_DIR"] = tiktoken_cache
    if multi_node:  # the driver tokenizes, workers on every node read the token files
        env["GPT2EXP_CACHE"] = str(PurePosixPath(output) / ".token-cache")
    elif on_this_machine and os.environ.get("GPT2EXP_CACHE"):
        env["GPT2EXP_CACHE"] = os.environ["GPT2EXP_CACHE"]
    return env


def entrypoint(
    spec_in_package: str, output: str, check_shared: bool, command: Iterable[str] = ("run",), extra: Iterable[str] = ()
) -> str:
    """The job's shell command (quoted with shlex: no user text is ever interpreted by the shell).

    With ``check_shared`` the same driver process first checks that every node sees the output folder, then
    runs. One process, not ``check && run``: when a first driver of a job exits, Ray may garbage-collect the
    job's unpacked ``working_dir`` while the job still runs in it (seen with Ray 2.60: the next process
    started in a deleted folder and died loading torch)."""
    args = [*command, spec_in_package, "--launcher", "ray", "--output", output, "--no-progress", *extra]
    if not check_shared:
        return shlex.join(["python", "-m", "gpt2exp.cli", *args])
    return shlex.join(["python", "-m", "gpt2exp.launch.submit", "checked-run", output, *args])


def experiment_payload(spec_path: Path, overrides: Iterable[str] | None = None) -> Payload:
    """An experiment spec with its overrides, run by the Ray launcher."""
    overrides = [*(overrides or []), "parallel.launcher=ray"]
    try:
        spec = load_spec(spec_path, overrides)
    except SpecError as e:
        raise SubmitError("\n".join(e.lines()), 2) from None
    return Payload(
        name=spec.name,
        summary=f"{len(spec.expand())} variant(s)",
        experiments=[spec],
        tracking_uri=spec.tracking.tracking_uri,
        tracking=spec.tracking.enabled,
        yaml_text=effective_spec_yaml(spec_path, overrides),
        command=["run"],
        mlflow_experiment=spec.tracking.experiment_name or spec.name,
    )


def pipeline_payload(path: Path, extra_args: Iterable[str] = ()) -> Payload:
    """A pipeline, made self-contained (its run stages' specs inline) so the job needs no other file."""
    from gpt2exp.pipeline.spec import RunStage, load_pipeline
    from gpt2exp.pipeline.state import EXPERIMENT

    try:
        pipeline = load_pipeline(path)
    except SpecError as e:
        raise SubmitError("\n".join(e.lines()), 2) from None
    experiments = [s.experiment for s in pipeline.stages if isinstance(s, RunStage)]
    return Payload(
        name=pipeline.name,
        summary=f"{len(pipeline.stages)} stage(s), {sum(len(e.expand()) for e in experiments)} variant(s)",
        experiments=experiments,
        tracking_uri=pipeline.tracking_uri,
        tracking=True,
        yaml_text=yaml.safe_dump(pipeline.self_contained(), sort_keys=False, allow_unicode=True),
        command=["pipeline", "run"],
        extra_args=list(extra_args),
        mlflow_experiment=EXPERIMENT.format(name=pipeline.name),
    )


def plan_submission(
    cluster: Cluster,
    payload: Payload,
    output: str | os.PathLike[str] | None = None,
    working_dir: Path | None = None,
    autoscaling: bool = False,
    submission_id: str | None = None,
    patience: Patience | None = None,
) -> Plan:
    """Check the cluster rules for the payload; everything that will be submitted, nothing sent yet. A head that
    lists no alive node yet (it is starting) is waited for (``patience``)."""
    folder = project_folder(working_dir)
    patience = patience or Patience(cluster.address)
    while not (nodes := cluster.nodes()):
        if not patience.wait("it lists no alive node yet"):
            raise SubmitError(f"the Ray cluster at {cluster.address} has no alive nodes")
    multi_node = len(nodes) > 1 or autoscaling
    here = cluster.on_this_machine(nodes)
    uri = (payload.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) if payload.tracking else None
    problems: list[SubmitError] = []  # every rule is checked: one submission attempt shows all that is wrong

    def rule(check: Callable[..., Any], *args: Any) -> Any:
        try:
            return check(*args)
        except SubmitError as e:
            if e.message not in [p.message for p in problems]:
                problems.append(e)
            return None

    out = rule(check_output, None if output is None else str(output), multi_node, here)
    if payload.tracking:
        uri = rule(absolute_store, uri, here) or uri
        rule(check_tracking, uri, multi_node)
    notes = []
    if autoscaling:
        notes.append("autoscaling cluster: the resource check is left to Ray (workers wait for nodes to join)")
    for spec in payload.experiments:
        rule(check_data_cache, spec, multi_node)
        if not autoscaling:
            rule(check_fit, spec, nodes)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        where = f"the Ray cluster at {cluster.address} ({describe_nodes(nodes)})"
        raise SubmitError(f"{len(problems)} problems with {where}:\n" + "\n".join(f"  - {p.message}" for p in problems), 2)
    if payload.tracking and uri is None:
        notes.append(
            f"MLflow: SQLite in {out}/mlflow.db on the head node (pass tracking.tracking_uri=http://HOST:5000 for a server)"
        )
    sid = submission_id or new_submission_id(payload.name)
    return Plan(
        payload=payload,
        submission_id=sid,
        output=out,
        tracking_uri=uri,
        env_vars=job_env(uri, out, multi_node, here),
        entrypoint=entrypoint(f"{SPEC_DIR}/{sid}.yaml", out, multi_node, payload.command, payload.extra_args),
        working_dir=folder,
        nodes=nodes,
        notes=notes,
    )


def project_folder(working_dir: Path | None) -> Path:
    """The folder to upload: ``working_dir`` (it must be a folder), else the current one."""
    if working_dir is not None and not Path(working_dir).is_dir():
        raise SubmitError(f"--working-dir {working_dir} is not a folder", 2)
    return (working_dir or Path.cwd()).resolve()


def describe_nodes(nodes: list[Node]) -> str:
    gpus = sum(n.gpus for n in nodes)
    return f"{len(nodes)} node(s), {sum(n.cpus for n in nodes):g} CPU(s)" + (f", {gpus:g} GPU(s)" if gpus else "")


# --------------------------------------------------------------------------------------- submitting
def submit(
    spec_path: Path,
    overrides: list[str] | None,
    address: str | None,
    follow: bool = False,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> str:
    """Submit the spec as a Ray Job and return its submission id (``options``: see :func:`send`)."""
    return send(experiment_payload(Path(spec_path), overrides), str(spec_path), address, follow, output, **options)


def submit_pipeline(
    path: Path,
    address: str | None,
    follow: bool = False,
    output: str | os.PathLike[str] | None = None,
    extra_args: Iterable[str] = (),
    **options: Any,
) -> str:
    """Submit a whole pipeline as one Ray Job (its run stages use the Ray launcher on the cluster)."""
    return send(pipeline_payload(Path(path), extra_args), str(path), address, follow, output, **options)


def send(
    payload: Payload,
    source: str,
    address: str | None,
    follow: bool = False,
    output: str | os.PathLike[str] | None = None,
    *,
    working_dir: Path | None = None,
    excludes: Iterable[str] = (),
    autoscaling: bool = False,
    submission_id: str | None = None,
    say: Callable[[str], None] = _stderr,
    write: Callable[[str], None] | None = None,
    dry_run: bool = False,
) -> str:
    """Check the cluster, pack the project with the payload's YAML, submit; returns the submission id.

    ``say`` gets the short notes (to stderr by default); with ``follow`` the job's logs stream through ``write``
    (stdout) and a job that does not succeed raises :class:`SubmitError` with its status and error line.
    ``dry_run``: only :func:`show_dry_run`, through ``write``."""
    if dry_run:
        return show_dry_run(payload, output, working_dir, excludes, autoscaling, submission_id, write or _stdout)
    patience = Patience(resolve_address(address), say)
    cluster = connect(address, patience)
    plan = plan_submission(cluster, payload, output, working_dir, autoscaling, submission_id, patience)
    say(f"cluster {cluster.address}: {describe_nodes(plan.nodes)}, Ray {cluster.ray_version}")
    if cluster.ray_version and cluster.ray_version.split(".")[:2] != _local_ray_version().split(".")[:2]:
        say(
            f"note: the cluster runs Ray {cluster.ray_version}, this machine {_local_ray_version()}: the job uses the cluster's Python environment"
        )
    for note in plan.notes:
        say(f"note: {note}")
    with tempfile.TemporaryDirectory(prefix="gpt2exp-submit-") as tmp:
        package = build_package(
            plan.working_dir, f"{plan.submission_id}.yaml", payload.yaml_text, Path(tmp) / "package.zip", excludes
        )
        size = package.stat().st_size
        if size >= PACKAGE_WARNING:
            say(f"note: uploading {size / 1024**2:.0f} MiB from {plan.working_dir}; add what the job does not need to .rayignore")
        metadata = {
            "gpt2exp.experiment": payload.name,
            "gpt2exp.spec": source,
            "gpt2exp.output": plan.output,
            "gpt2exp.tracking_uri": plan.tracking_uri or "",
        }
        sid = _submit_job(cluster, plan, package, metadata, patience)
    say(f"submitted {sid} ({payload.name}, {payload.summary}) · output {plan.output}")
    if plan.tracking_uri and not is_file_store(plan.tracking_uri):
        say(f"MLflow: {plan.tracking_uri} (experiment {payload.mlflow_experiment})")
    if not follow:
        say(f"follow it with: gpt2exp jobs logs {sid} --follow --address {cluster.address}")
        return sid
    follow_job(cluster, sid, write=write)
    return sid


def show_dry_run(
    payload: Payload,
    output: str | os.PathLike[str] | None,
    working_dir: Path | None,
    excludes: Iterable[str],
    autoscaling: bool,
    submission_id: str | None,
    write: Callable[[str], None],
) -> str:
    """What :func:`send` would run and upload, contacting no one: the entrypoint (as on a cluster of one node on
    this machine; with ``autoscaling``, of several nodes) and every file of the package, built as for the job,
    with its size in bytes. Returns the submission id it would use."""
    folder = project_folder(working_dir)
    out = check_output(None if output is None else str(output), autoscaling, on_this_machine=True)
    sid = submission_id or new_submission_id(payload.name)
    command = entrypoint(f"{SPEC_DIR}/{sid}.yaml", out, autoscaling, payload.command, payload.extra_args)
    with tempfile.TemporaryDirectory(prefix="gpt2exp-submit-") as tmp:
        package = build_package(folder, f"{sid}.yaml", payload.yaml_text, Path(tmp) / "package.zip", excludes)
        with zipfile.ZipFile(package) as z:
            files = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename)
        zipped = package.stat().st_size
    where = "several nodes" if autoscaling else "one node on this machine"
    lines = [
        f"dry run, nothing sent: job {sid} ({payload.name}, {payload.summary}) on a cluster of {where}",
        f"entrypoint: {command}",
        f"upload from {folder}: {len(files)} file(s), {sum(i.file_size for i in files):,} bytes ({zipped:,} zipped)",
        *(f"{i.file_size:>12,}  {i.filename}" for i in files),
    ]
    write("\n".join(lines) + "\n")
    return sid


def _local_ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _submit_job(cluster: Cluster, plan: Plan, package: Path, metadata: dict[str, str], patience: Patience) -> str:
    """Submit under the plan's id (``-2`` ... ``-5`` when taken); Ray's "try again later" is waited out."""
    runtime_env = {"working_dir": str(package), "env_vars": plan.env_vars}
    sid, attempt = plan.submission_id, 1
    while True:
        try:
            return cluster.client.submit_job(
                entrypoint=plan.entrypoint, submission_id=sid, runtime_env=runtime_env, metadata=metadata
            )
        except RuntimeError as e:
            if "already exists" in str(e) and attempt < 5:  # two submissions in the same second
                attempt += 1
                sid = f"{plan.submission_id}-{attempt}"
                plan.entrypoint = plan.entrypoint.replace(f"{plan.submission_id}.yaml", f"{sid}.yaml")
                with zipfile.ZipFile(package, "a") as z:
                    z.writestr(f"{SPEC_DIR}/{sid}.yaml", plan.payload.yaml_text)
                continue
            if "try again later" in str(e) and patience.wait(_ray_answer(e)):
                continue
            raise _job_api_error(cluster, e, "submit the job") from None
        except Exception as e:
            raise _job_api_error(cluster, e, "submit the job") from None


def _job_api_error(cluster: Cluster, e: Exception, doing: str) -> SubmitError:
    from ray.exceptions import AuthenticationError

    if isinstance(e, SubmitError):
        return e
    if isinstance(e, AuthenticationError):
        return auth_error(cluster.address, 403 if "failed" in str(e) else 401, cluster.token_source)
    if isinstance(e, (ConnectionError, OSError)) and not isinstance(e, FileNotFoundError):
        return _unreachable(cluster.address, e)
    return SubmitError(f"could not {doing} on {cluster.address}: {_ray_answer(e)}")


def _ray_answer(e: Exception) -> str:
    """The first line of a Jobs client error, e.g. ``500: No available agent to submit job, please try again later``."""
    return _first_line(str(e)).removeprefix("Request failed with status code ").rstrip(".")


# ------------------------------------------------------------------------------------- following
def job_details(cluster: Cluster, submission_id: str) -> Any:
    """Ray's ``JobDetails`` of a job, or a one-line error when the cluster has no such job."""
    try:
        return cluster.client.get_job_info(submission_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SubmitError(f"no job {submission_id} on {cluster.address} (gpt2exp jobs list shows the ids)") from None
        raise _job_api_error(cluster, e, f"read job {submission_id}") from None
    except Exception as e:
        raise _job_api_error(cluster, e, f"read job {submission_id}") from None


def stream_logs(cluster: Cluster, submission_id: str, write: Callable[[str], None] | None = None) -> None:
    """Write the job's logs as they come until the job ends (Ray's log websocket)."""
    write = write or _stdout

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(submission_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the websocket closed early (head restarted, network): the status still tells
        if "closed unexpectedly" not in str(e) and "WebSocket" not in str(e):
            raise _job_api_error(cluster, e, f"follow the logs of {submission_id}") from None


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def wait_terminal(cluster: Cluster, submission_id: str, timeout: float = 60.0) -> Any:
    """The job's details once its status is final (the log stream can end a moment before)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_details(cluster, submission_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.25)


def error_line(logs: str, message: str | None) -> str:
    """The line that says why a job failed: gpt2exp's own ``error: ...`` line, else the last raised
    exception, else the job's last line of output, else Ray's message."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", line)]
    if raised:
        return raised[-1]
    started = max((i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job ")), default=None)
    if started is not None and started + 1 < len(lines):
        return lines[-1]
    return _first_line(message or "") or "no error message"


def outcome(cluster: Cluster, info: Any) -> None:
    """Return quietly for SUCCEEDED; raise :class:`SubmitError` (code 1) naming the status and the error line."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return
    sid = info.submission_id or info.job_id
    if status == "STOPPED":
        raise SubmitError(f"job {sid} STOPPED (gpt2exp jobs stop, or the cluster stopped it)")
    if status != "FAILED":
        raise SubmitError(f"job {sid} is still {status}: gpt2exp jobs status {sid}")
    try:
        logs = cluster.client.get_job_logs(sid)
    except Exception:
        logs = ""
    code = re.search(r"exit code (\d+)", info.message or "")
    raise SubmitError(f"job {sid} FAILED{f' (exit code {code.group(1)})' if code else ''}: {error_line(logs, info.message)}")


def follow_job(cluster: Cluster, submission_id: str, write: Callable[[str], None] | None = None) -> Any:
    """Stream the logs until the job ends; return its details when it SUCCEEDED, else raise SubmitError."""
    job_details(cluster, submission_id)  # a clear error for an unknown id, before the websocket
    try:
        stream_logs(cluster, submission_id, write)
    except KeyboardInterrupt:
        raise SubmitError(
            f"stopped following; job {submission_id} goes on: gpt2exp jobs logs {submission_id} --follow, "
            f"or gpt2exp jobs stop {submission_id}",
            130,
        ) from None
    info = wait_terminal(cluster, submission_id)
    outcome(cluster, info)
    return info


# ------------------------------------------------------------------------------------ jobs commands
def list_jobs(cluster: Cluster, everything: bool = False) -> list[Any]:
    """The cluster's jobs (gpt2exp's only, unless ``everything``), oldest first."""
    try:
        jobs = cluster.client.list_jobs()
    except Exception as e:
        raise _job_api_error(cluster, e, "list jobs") from None
    if not everything:
        jobs = [j for j in jobs if (j.submission_id or "").startswith("gpt2exp-") or "gpt2exp.experiment" in (j.metadata or {})]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def stop_job(cluster: Cluster, submission_id: str, timeout: float = 30.0) -> Any:
    """Ask the job to stop and wait until it has (Ray: SIGTERM to the driver, SIGKILL after a grace period)."""
    info = job_details(cluster, submission_id)
    if info.status.is_terminal():
        return info
    try:
        cluster.client.stop_job(submission_id)
    except Exception as e:
        raise _job_api_error(cluster, e, f"stop {submission_id}") from None
    return wait_terminal(cluster, submission_id, timeout)


def job_logs(cluster: Cluster, submission_id: str) -> str:
    job_details(cluster, submission_id)
    try:
        return cluster.client.get_job_logs(submission_id)
    except Exception as e:
        raise _job_api_error(cluster, e, f"read the logs of {submission_id}") from None


def when(ms: int | None) -> str:
    return "" if not ms else datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def duration(info: Any) -> str:
    if not info.start_time:
        return ""
    end = info.end_time or time.time() * 1000
    s = max(0, int((end - info.start_time) / 1000))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def jobs_table(jobs: list[Any]) -> Any:
    """A rich table of jobs: id, status, experiment, start, duration, message."""
    from rich.table import Table

    table = Table(title=f"{len(jobs)} job(s)")
    for col in ("submission id", "status", "experiment", "started", "duration", "message"):
        table.add_column(col, overflow="fold")
    for j in jobs:
        message = _first_line(j.message or "")
        table.add_row(
            j.submission_id or j.job_id or "",
            str(j.status),
            (j.metadata or {}).get("gpt2exp.experiment", ""),
            when(j.start_time),
            duration(j),
            message[:80],
        )
    return table


def describe_job(info: Any) -> list[str]:
    """``jobs status`` lines: the status, Ray's message, and where the experiment writes."""
    meta = info.metadata or {}
    lines = [f"{info.submission_id or info.job_id}: {info.status}"]
    if info.message:
        lines.append(f"  message: {_first_line(info.message)}")
    for key, label in (("gpt2exp.experiment", "experiment"), ("gpt2exp.output", "output"), ("gpt2exp.tracking_uri", "MLflow")):
        if meta.get(key):
            lines.append(f"  {label}: {meta[key]}")
    if info.start_time:
        lines.append(f"  started: {when(info.start_time)} · duration {duration(info)}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    return lines


# ------------------------------------------------------------------------------- inside the job
def check_shared(output: str, timeout: float = 300.0) -> int:
    """In the job, before training: a marker the driver writes into ``output`` must be visible on every alive
    node (a remote task pinned to each node looks for it). Prints one line and returns an exit code; leaves
    Ray connected (as ``ensure_ray`` would connect) for the run that follows in this process."""
    import uuid

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".gpt2exp-shared-check-{uuid.uuid4().hex[:12]}"
        marker.write_text(socket.gethostname())
    except OSError as e:
        print(f"error: --output {output} cannot be written on the head node: {e}", file=sys.stderr, flush=True)
        return 2

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Path(path).is_file()

    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        refs = {
            n["NodeManagerAddress"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        blind = [ip for ip, ref in refs.items() if not ray.get(ref, timeout=timeout)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        print(
            f"error: --output {output} is not shared: node(s) {', '.join(blind)} do not see files the head node writes there; "
            "mount the same shared filesystem at that path on every node",
            file=sys.stderr,
            flush=True,
        )
        return 2
    print(f"output {output} is shared by all {len(nodes)} node(s)", flush=True)
    return 0


def _main(argv: list[str]) -> int:
    """``checked-run OUTPUT ARGS...``: the shared-folder check, then ``gpt2exp ARGS`` in this process."""
    if len(argv) >= 3 and argv[0] == "checked-run":
        code = check_shared(argv[1])
        if code:
            return code
        from gpt2exp.cli import app

        app(argv[2:], prog_name="gpt2exp")  # exits with the command's code
        return 0
    print("usage: python -m gpt2exp.launch.submit checked-run OUTPUT_FOLDER GPT2EXP_ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
