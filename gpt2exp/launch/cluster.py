"""Connecting to Ray: join the cluster at RAY_ADDRESS, or start a private one on this machine.

This module needs Ray alone (not Ray Train, torch or MLflow), and imports it only when used, so
that the driver can start Ray first and prepare everything else meanwhile (``beside_ray``): on a
small machine starting a private cluster is seconds of waiting for its processes."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import psutil

from gpt2exp import _ray_compat, env

env.apply(env.RAY)

T = TypeVar("T")


def ensure_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a private one on this machine (127.0.0.1).
    Call it on the main thread (Ray installs signal handlers). A private cluster goes with this process:
    at exit, and on SIGTERM as on Ctrl-C (both raise KeyboardInterrupt, so a run records that it was
    interrupted and ``shutdown`` follows)."""
    import ray

    if ray.is_initialized():
        return
    # workers' logs stay in Ray's session folder; errors come back as exceptions, metrics through the bus
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address.startswith(("http://", "https://")):  # a dashboard address is for `gpt2exp jobs`
        # no idle workers prestarted for the driver: only the progress bus could use one (Ray Train's
        # actors carry a runtime env of their own), and starting them delays ray.init on a small machine
        config = {"prestart_worker_first_driver": False}
        kwargs |= {"address": "local", "num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1", "_system_config": config}
    # Ray turns token authentication on for a new local cluster (kept) and says so on every start;
    # its warnings that authentication is off still show
    logging.getLogger(_ray_compat.AUTH_SETUP_LOGGER).addFilter(_quiet_auth_on)
    ray.init(**kwargs)
    if own_cluster():
        atexit.unregister(shutdown)  # once, however often Ray is started in this process
        atexit.register(shutdown)  # runs before Ray's own exit hook (registered at import)
        # Ray's own SIGTERM handler raises SystemExit wherever the main thread is, and the interpreter then
        # waits for the training threads, with the cluster still up. SIGINT too: a shell starts `cmd &` with
        # SIGINT ignored, and a `kill -INT` would then leave the run and its cluster going
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.default_int_handler)
        _watch_driver()
        # the actor every `fit` asks for resources: started now, while the driver sets up MLflow
        _ray_compat.start_autoscaling_coordinator()


# The watchdog of a private cluster: while the driver lives it notes the driver's descendants (Ray's processes
# rename themselves, so they are known by ancestry); when the driver is gone without shutting Ray down
# (SIGKILL, a crash), it kills those still running (Ray 2.60's agents outlive their raylet).
WATCHDOG = """
import os, sys, time, psutil
seen = {}
try:
    driver = psutil.Process(int(sys.argv[1]))
    while driver.status() != psutil.STATUS_ZOMBIE:
        seen.update((p.pid, p) for p in driver.children(recursive=True) if p.pid != os.getpid())
        time.sleep(0.5)
except psutil.Error:
    pass
for p in seen.values():
    try:
        p.kill()  # psutil checks that the pid still names the same process
    except psutil.Error:
        pass
"""


def _watch_driver() -> None:
    """Start the watchdog (a process of its own session, so a kill of this process group spares it)."""
    null = subprocess.DEVNULL
    argv = [sys.executable, "-c", WATCHDOG, str(os.getpid())]
    subprocess.Popen(argv, stdin=null, stdout=null, stderr=null, start_new_session=True, close_fds=True)


def _quiet_auth_on(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def beside_ray(work: Callable[[], T], start: bool = True) -> T:
    """``work()``, in a thread while Ray starts (``ensure_ray``) on the main thread when ``start``;
    its result, or its exception."""
    if not start:
        return work()
    with ThreadPoolExecutor(1, thread_name_prefix="beside-ray") as pool:
        done = pool.submit(work)
        try:
            ensure_ray()
        finally:
            result = done.result()  # the work's own error first: it is the user's to fix
    return result


def own_cluster() -> bool:
    """Whether this process started the cluster it is connected to (a private one, without dashboard)."""
    return _ray_compat.global_node() is not None


def shutdown() -> None:
    """``ray.shutdown()`` without waiting 1 s for the autoscaler monitor of a cluster this process
    started to obey SIGTERM (on one machine it has nothing to tidy up, so it is killed outright).
    At exit it also runs instead of Ray's own hook, which sleeps 0.5 s for worker log lines that
    log_to_driver=False never sends. Of a private cluster nothing is left: what its processes started
    (agents, workers) and still runs after Ray's shutdown is killed."""
    import psutil
    import ray

    monitors, processes = _ray_compat.node_processes()
    for monitor in monitors:
        monitor.kill()
    tree = _process_trees([p.pid for p in processes])
    ray.shutdown()
    for process in tree:  # left by Ray's shutdown: its agents notice the end of their raylet seconds later
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


class Background:
    """``work()`` on a daemon thread (one still in a Ray call after Ctrl-C must not hold up the exit), watched through
    ``ended`` rather than the thread: in Python 3.11 a Ctrl-C inside ``Thread.join`` marks a running thread stopped."""

    def __init__(self, work: Callable[[], object], name: str) -> None:
        self.ended = threading.Event()
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(work,), name=name, daemon=True).start()

    def _run(self, work: Callable[[], object]) -> None:
        try:
            work()
        except BaseException as e:
            self.error = e
        finally:
            self.ended.set()


def shutdown_under(busy: list[Background], stop: threading.Event, grace_s: float = 5.0) -> None:
    """Shut Ray down after Ctrl-C while ``busy`` work of this driver waits in Ray calls (a trainer's ``fit``).
    ``ray.shutdown()`` under a thread blocked in ``ray.get`` frees what that wait wakes up to call: the process
    segfaults. So ``stop`` is set (the work then returns instead of going on), the workers of a private
    cluster are killed (each waiting call raises), the work is given ``grace_s`` to return, then Ray is
    shut down."""
    import psutil

    stop.set()
    # the raylet's "a worker died unexpectedly" for each, which Ray's driver prints on stdout, is not news here
    with contextlib.redirect_stdout(io.StringIO()):
        if own_cluster():
            for process in _process_trees([p.pid for p in _ray_compat.node_processes()[1]]):
                with contextlib.suppress(psutil.Error):
                    if _is_worker(process.cmdline()):
                        process.kill()
        deadline = time.monotonic() + grace_s
        for work in busy:
            work.ended.wait(max(0.0, deadline - time.monotonic()))
        shutdown()


def _is_worker(cmdline: list[str]) -> bool:
    """Whether a process of the cluster is a Ray worker (a task's or an actor's: ``ray::...`` once started),
    not one of the node's own (GCS, raylet, its agents ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``), whose end
    would take the driver with it."""
    title = cmdline[0].strip() if cmdline else ""
    if title.startswith("ray::"):
        return not title.endswith("Agent")
    return any(a.endswith("default_worker.py") for a in cmdline)


def _process_trees(pids: list[int]) -> list[psutil.Process]:
    """The processes ``pids`` and all their descendants that are alive."""
    import psutil

    tree = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            tree += [root, *root.children(recursive=True)]
    return tree
