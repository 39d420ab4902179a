"""Ray Train's torch backend, loaded late.

Ray's ``TorchConfig`` imports torch wherever it is unpickled or used: in the driver when ``fit``
wraps the training function, and in the Train controller (a process of its own) before it starts
the workers; 1.3-1.5 s of CPU each on 2 cores, on the path to the first step. This configuration
has the same fields and meaning, and loads Ray's own torch backend and context only where they act:
on the workers, and in the controller once the workers are up. The process group set-up is Ray's,
unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig


@dataclass
class LateTorchConfig(BackendConfig):
    """``ray.train.torch.TorchConfig``'s fields and meaning."""

    backend: str | None = None  # nccl, gloo, ...; None: chosen by Ray from the workers' resources
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _LateTorchBackend

    @property
    def train_func_context(self) -> type:
        return _LateTorchContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH


class _LateTorchContext:
    """Ray's ``TorchConfigContextManager`` (the worker's CUDA device), imported on the worker: the
    driver wraps the training function in it."""

    def __enter__(self) -> Any:
        from ray.train.torch.config import TorchConfigContextManager

        self._ray = TorchConfigContextManager()
        return self._ray.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self._ray.__exit__(*exc)


class _LateTorchBackend(Backend):
    """Ray's ``_TorchBackend``, imported when first used."""

    share_cuda_visible_devices = True

    @staticmethod
    def _ray() -> Backend:
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self._ray().on_start(worker_group, backend_config)

    def on_training_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self._ray().on_training_start(worker_group, backend_config)

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self._ray().on_shutdown(worker_group, backend_config)
