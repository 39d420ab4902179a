"""Headless Chromium (Debian's ``chromium`` package) to check what the MLflow UI actually renders, for tests and
``scripts/check_ui.py``: it is a React app, so the DOM exists only after the page has run. ``find_chromium``,
``dump_dom`` and ``screenshot`` drive the browser from its command line; ``Browser`` drives one tab over the
DevTools protocol to measure the layout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpt2exp.tracking.ui import STOP_GRACE_S, UIError

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
