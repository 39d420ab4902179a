"""The MLflow UI over the project's store: ``mlflow server`` in a light configuration (one worker, no job
runner, loopback only), started as a child process group and stopped cleanly.

``serve_ui`` is what ``gpt2exp ui`` runs (foreground, Ctrl-C stops it); ``mlflow_server`` is a context
manager that tests and scripts use to get a real server on a free port. The headless-Chromium helpers
(``find_chromium``, ``dump_dom``, ``screenshot``) drive Debian's ``chromium`` from the command line to
check what the UI actually renders (it is a React app: the DOM is built after the page loads); ``Browser``
drives one tab over the DevTools protocol to measure the layout. ``ui_url`` links into the model-training view.
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
from typing import Any

from gpt2exp.errors import Gpt2expError
from gpt2exp.tracking.store import check_store

STARTUP_TIMEOUT_S = 90.0  # ready in about 6 s on an idle machine; much slower on a busy one
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


class UIError(Gpt2expError, RuntimeError):
    """The server could not be started (port taken, bad store, it died or never became ready)."""


def server_env() -> dict[str, str]:
    """The server's environment: no telemetry, no background job runner, quiet clients."""
    return os.environ | {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "PYTHONUNBUFFERED": "1",
    }


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


# --- headless Chromium (Debian's ``chromium`` package), for tests and scripts/check_ui.py ---------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container: the sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--metrics-recording-only",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH."""
    import shutil

    if env := os.environ.get("CHROMIUM"):
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _chromium(args: list[str], url: str, budget_ms: int, timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise UIError("no Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")
    with tempfile.TemporaryDirectory(prefix="gpt2exp-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def dump_dom(url: str, budget_ms: int = 15000, timeout: float = 120) -> str:
    """The page's DOM (serialized HTML) after ``budget_ms`` of virtual time: what the React app rendered."""
    result = _chromium(["--dump-dom"], url, budget_ms, timeout)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise UIError(f"chromium --dump-dom {url} failed (code {result.returncode}): {result.stderr.strip()[-800:]}")
    return result.stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 900), budget_ms: int = 15000, timeout: float = 120) -> Path:
    """A PNG of the page after ``budget_ms`` of virtual time."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    result = _chromium([f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"], url, budget_ms, timeout)
    if not path.is_file():
        raise UIError(f"chromium --screenshot {url} wrote nothing (code {result.returncode}): {result.stderr.strip()[-800:]}")
    return path


# Chromium's --remote-debugging-pipe reads fd 3 and writes fd 4: a small exec wrapper puts the pipes there (sh
# cannot name descriptors above 9, and a preexec_fn is unsafe with threads)
PIPES_ON_3_AND_4 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
)


def _above(fd: int, low: int) -> int:
    """``fd`` moved to a number of at least ``low``."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return moved


class Browser:
    """A headless Chromium tab driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``:
    no port, no websocket library): load a page, wait for what the React app renders, measure it with
    JavaScript. A context manager; ``size`` is the viewport in CSS pixels."""

    def __init__(self, size: tuple[int, int] = (1400, 900), timeout: float = 60.0) -> None:
        exe = find_chromium()
        if exe is None:
            raise UIError("no Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")
        self.timeout, self.size, self._id, self._buffer = timeout, size, 0, b""
        self.session: str | None = None  # the tab's DevTools session, once attached
        self._profile = tempfile.TemporaryDirectory(prefix="gpt2exp-chromium-")
        to_chrome, self._out = os.pipe()  # Chromium reads commands on its fd 3 and writes answers on its fd 4
        self._in, from_chrome = os.pipe()
        to_chrome, from_chrome = _above(to_chrome, 10), _above(from_chrome, 10)  # neither is 3 or 4: no clash when moved
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PIPES_ON_3_AND_4, str(to_chrome), str(from_chrome), exe, *flags],
            pass_fds=(to_chrome, from_chrome),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()  # no Chromium left behind
            raise

    def send(self, method: str, **params: Any) -> dict:
        """One DevTools command (to the page once attached); its result. Events that come before it are dropped."""
        import json
        import select

        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        try:
            os.write(self._out, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise UIError(f"chromium exited (code {self.proc.poll()}) before {method}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise UIError(f"chromium {method}: {answer['error'].get('message')}")
                    return answer.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise UIError(f"chromium did not answer {method} within {self.timeout:.0f} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise UIError(f"chromium exited (code {self.proc.poll()}) during {method}")
            self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited, results as JSON values)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise UIError(f"javascript error: {result['exceptionDetails'].get('text')} in {expression[:200]!r}")
        return result["result"].get("value")

    def goto(self, url: str, until: str = "true", timeout: float = 60.0) -> None:
        """Load ``url``, then wait until the JavaScript condition ``until`` holds (the app renders after the load)."""
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"document.readyState === 'complete' && Boolean({until})"):
            if time.monotonic() > deadline:
                raise UIError(f"{url}: {until!r} did not hold within {timeout:.0f} s")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        import base64

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        for fd in (self._in, self._out):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
