"""Ray Train's torch backend, loaded late in the Train controller.

Each ``fit`` sends its backend configuration to the Train controller, a process of its own.
Unpickling Ray's ``TorchConfig`` makes the controller import torch (1.3 s on 2 cores) before it
starts the workers. This configuration names a backend that loads Ray's own torch backend only
once the workers are up, so that the controller's torch import overlaps the workers' start. The
process group set-up itself is Ray's, unchanged."""

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
    def train_func_context(self) -> Any:
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH


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
