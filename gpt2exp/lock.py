"""Locks across processes (``fcntl.flock``, freed by the kernel when their holder dies, even by kill -9):
one writer per experiment or pipeline folder, and one process at a time creating an MLflow store.
The holder writes who it is into the lock file, so a process turned away can say who is in the way."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

from gpt2exp.errors import Gpt2expError


def _command() -> str:
    """This process's command line, as the user typed it (``gpt2exp ...`` however the CLI was started)."""
    argv0 = Path(sys.argv[0])
    program = "gpt2exp" if argv0.name == "gpt2exp" or argv0.parts[-3:] == ("gpt2exp", "cli", "__main__.py") else argv0.name
    text = shlex.join([program, *sys.argv[1:]])
    return text if len(text) <= 200 else text[:199] + "…"


def _holder(fh: IO[str]) -> str:
    """Who holds the lock, from what it wrote (read again briefly: it may be writing it this instant)."""
    for _ in range(20):
        fh.seek(0)
        try:
            h = json.loads(fh.read())
            return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process"


@contextlib.contextmanager
def exclusive(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made with its folder) for the block and record this process in
    it (pid, host, start time, command). Taken already: wait for it when ``wait``, else raise a
    :class:`Gpt2expError` at once, ``<folder> is in use by pid N on HOST since TIME (COMMAND); ...``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Gpt2expError(f"{path.parent} is in use by {_holder(fh)}; wait for it or stop it") from None
        since = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        fh.truncate(0)
        fh.write(json.dumps({"pid": os.getpid(), "host": platform.node(), "since": since, "command": _command()}))
        fh.flush()
        yield
