"""Every use of Ray's private or developer APIs, in one place. Checked on Ray 2.60.0 (``pyproject.toml``
pins the minor version to match). On a new Ray, read each function's note against Ray's source and run
``tests/test_ray.py`` and ``tests/test_submit.py`` before widening the pin.

Each is here because Ray has no public way to do it: see the reason on each. Ray is imported inside the
functions, so that importing this module stays free."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

CHECKED_ON = "2.60.0"
# Ray's loggers that speak for the user's tools: quietened while gpt2exp packs and submits a job
CLIENT_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging")
# says "Token authentication is enabled" on every start of a new local cluster (it is, and stays)
AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def global_node() -> Any:
    """The node this process started with ``ray.init`` (a private cluster), else None. (No public API tells a
    driver whether it started the cluster it is connected to.)"""
    from ray._private import worker

    return worker._global_node


def node_processes() -> tuple[list[Any], list[Any]]:
    """Of the cluster this process started: (its autoscaler monitor processes, all its processes), as
    ``subprocess.Popen`` objects. (``ray.shutdown`` waits 1 s for the monitor to obey SIGTERM, and leaves the
    agents that outlive their raylet: gpt2exp kills those itself.)"""
    from ray._private import ray_constants

    node = global_node()
    if node is None:
        return [], []
    processes = node.all_processes
    monitors = [info.process for info in processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])]
    return monitors, [info.process for infos in processes.values() for info in infos]


def start_autoscaling_coordinator() -> None:
    """Start the actor that every Ray Train ``fit`` asks for resources, now rather than on the critical path of
    the first ``fit`` (a process start and a Ray Data import). Ray Train creates it on demand otherwise."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
    except ImportError:  # a Ray Train without it
        return
    get_or_create_autoscaling_coordinator()


def without_default_callbacks(callbacks: list[Any], names: set[str]) -> list[Any]:
    """``DataParallelTrainer._create_default_callbacks`` (a developer API) less the callbacks named ``names``:
    Ray offers no switch to leave out actors a run has no use for."""
    return [cb for cb in callbacks if type(cb).__name__ not in names]


def torch_framework() -> Any:
    """Ray Train's ``TrainingFramework.TORCH``, which a ``BackendConfig`` must name (internal enum)."""
    from ray.train.v2._internal.util import TrainingFramework

    return TrainingFramework.TORCH


def torch_backend() -> tuple[Any, Any, Any]:
    """Ray's own torch backend and its two set-up steps (``_TorchBackend``, ``_set_torch_distributed_env_vars``,
    ``_setup_torch_process_group``): gpt2exp's loopback rendezvous runs them around its own store."""
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    return _TorchBackend, _set_torch_distributed_env_vars, _setup_torch_process_group


def create_package(folder: Path, target: Path, excludes: list[str], include_gitignore: bool) -> None:
    """Zip ``folder`` exactly as Ray packs a ``working_dir`` (``.gitignore``, ``.rayignore``, excludes), so that
    a package checked before submission is the one Ray would have built."""
    from ray._private.runtime_env.packaging import create_package as ray_create_package

    ray_create_package(str(folder), target, include_gitignore=include_gitignore, excludes=excludes)


def quiet_client_loggers() -> None:
    """Ray's client-side loggers at WARNING: their INFO lines repeat what gpt2exp says itself."""
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
