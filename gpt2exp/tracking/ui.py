"""The MLflow UI over the project's store: ``mlflow server`` in a light configuration (one worker, no job
runner, loopback only), started as a child process group and stopped cleanly.

``serve_ui`` is what ``gpt2exp ui`` runs (foreground, Ctrl-C stops it); ``mlflow_server`` is a context
manager that tests and scripts use to get a real server on a free port (``tracking/browser.py`` looks at what
it renders). ``ui_url`` links into the model-training view.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from gpt2exp import env
from gpt2exp.errors import Gpt2expError
from gpt2exp.tracking.store import check_store

STARTUP_TIMEOUT_S = 90.0  # seconds on an idle machine, far more on a busy one
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


class UIError(Gpt2expError, RuntimeError):
    """The server could not be started (port taken, bad store, it died or never became ready)."""


def server_env() -> dict[str, str]:
    """The server's environment: no telemetry, no background job runner, quiet clients."""
    return os.environ | env.MLFLOW | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}


def server_command(store_uri: str, artifacts: Path | None, host: str, port: int) -> list[str]:
    """``mlflow server`` for ``store_uri``; with ``artifacts``, new experiments store their artifacts there
    (served through the server: ``mlflow-artifacts:/``). Existing runs keep their own artifact URIs."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", Path(artifacts).resolve().as_uri()]
    return cmd


def check_store_uri(store_uri: str) -> None:
    """Refuse URIs that ``mlflow server`` cannot serve as a backend store, with a one-line reason."""
    if store_uri.startswith(("http://", "https://", "databricks")):
        raise UIError(f"{store_uri} is already a tracking server: open it in a browser instead")
    check_store(store_uri, UIError)


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def ui_url(base: str, experiment_id: str | None = None, path: str = "") -> str:
    """A page of the MLflow UI at ``base`` in its model-training view: MLflow 3.17's UI picks its view from a
    switch kept in the browser (the GenAI view in a fresh browser) or this URL parameter, not from the
    experiment's ``mlflow.experimentKind`` tag. ``path``: e.g. ``/runs``, ``/runs/<id>/artifacts/<file>``."""
    page = f"/experiments/{experiment_id}{path}" if experiment_id is not None else "/experiments"
    return f"{base}/#{page}?workflowType=machine_learning"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class _Server:
    """One ``mlflow server`` process group; its output goes to a log file (read back on failure)."""

    def __init__(self, store_uri: str, artifacts: Path | None, host: str, port: int) -> None:
        check_store_uri(store_uri)
        if not 0 < port < 65536:
            raise UIError(f"port {port} is out of range (1-65535)")
        if not port_is_free(host, port):
            raise UIError(f"port {port} on {host} is already in use: pick another with --port")
        self.url = base_url(host, port)
        fd, log = tempfile.mkstemp(prefix=f"gpt2exp-ui-{port}-", suffix=".log")
        self.log = Path(log)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(
                server_command(store_uri, artifacts, host, port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=server_env(),
                start_new_session=True,  # its own process group: stopped as a whole; the terminal's Ctrl-C reaches only us
            )

    def failure(self, what: str) -> UIError:
        tail = _tail(self.log)
        return UIError(f"{what} (log {self.log})" + (f":\n{tail}" if tail else ""))

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``/health`` until it answers; raise with the server's last log lines if it dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()  # what is left of its group
                raise self.failure(f"mlflow server exited with code {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise self.failure(f"mlflow server did not answer {self.url}/health within {timeout:.0f} s")
            time.sleep(0.25)

    def _group_alive(self) -> bool:
        self.proc.poll()  # reap the leader, or a zombie keeps the group "alive"
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.proc.returncode is None or _has_live_members(self.proc.pid)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds if anything is left."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            if not self._group_alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)

    def remove_log(self) -> None:
        self.log.unlink(missing_ok=True)


def _has_live_members(pgid: int) -> bool:
    """Whether a non-zombie process is in group ``pgid`` (orphans may sit as zombies until init reaps them)."""
    try:
        import psutil
    except ImportError:
        return True
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


@contextlib.contextmanager
def mlflow_server(
    store_uri: str,
    artifacts: Path | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[str]:
    """A real ``mlflow server`` on ``host`` (a free port when ``port`` is None) for the ``with`` block;
    yields its base URL (``http://127.0.0.1:PORT``) and stops the whole process group on exit."""
    server = _Server(store_uri, artifacts, host, free_port(host) if port is None else port)
    server.wait_ready(timeout)  # on failure it stops the server and keeps the log (named in the error)
    try:
        yield server.url
    finally:
        server.stop()
        server.remove_log()


def serve_ui(
    store_uri: str, artifacts: Path | None, host: str = "127.0.0.1", port: int = 5000, open_browser: bool = False
) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C (or SIGTERM/SIGHUP); returns the exit code.

    Prints the URL once ``/health`` answers. Raises ``UIError`` (one-line message, plus the server's last
    log lines when it failed to start) if the port is taken or the server does not come up."""
    server: _Server | None = None
    stopping = False

    def interrupt(signum, _frame):
        nonlocal stopping
        if stopping:  # a second Ctrl-C while stopping: no more grace period
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
            return
        stopping = True
        raise KeyboardInterrupt

    # SIGINT too: a shell starts `cmd &` with SIGINT ignored, and Python then never raises KeyboardInterrupt
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: leave the handlers alone
            previous[sig] = signal.signal(sig, interrupt)
    try:
        server = _Server(store_uri, artifacts, host, port)
        server.wait_ready()
        print(f"MLflow UI: {ui_url(server.url)}  (store {store_uri}; Ctrl-C to stop)", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: listening on {host}; MLflow refuses Host headers other than local/private addresses", flush=True)
        if open_browser:
            import webbrowser

            webbrowser.open(ui_url(server.url))
        while server.proc.poll() is None:
            time.sleep(0.5)
        raise server.failure(f"mlflow server stopped unexpectedly with code {server.proc.returncode}")
    except KeyboardInterrupt:
        stopping = True
        if server is not None:
            print("stopping the MLflow UI ...", flush=True)
            server.stop()
            server.remove_log()
        return 0
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
