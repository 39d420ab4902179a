"""Ray Train's torch backend, loaded late.

Ray's ``TorchConfig`` imports torch wherever it is unpickled or used: in the driver when ``fit``
wraps the training function, and in the Train controller (a process of its own) before it starts
the workers, each a second or more of CPU on the path to the first step. This configuration
has the same fields and meaning, and loads Ray's own torch backend and context only where they act:
on the workers, and in the controller once the workers are up. The process group set-up is Ray's,
but for one thing on the private cluster (a node address on loopback): there the rendezvous store of
rank 0 listens on 127.0.0.1 (torch's own ``TCPStore`` server listens on every interface, whatever
``MASTER_ADDR`` says) and gloo's connections use the loopback interface."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig

from gpt2exp import _ray_compat

_store: Any = None  # on worker 0 of a group on loopback: the TCPStore server that every rank joins


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
        return _ray_compat.torch_framework()


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
        backend, _, _ = _ray_compat.torch_backend()
        return backend()

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        assert isinstance(backend_config, LateTorchConfig)  # this backend's config
        port = None
        if backend_config.backend in ("gloo", "nccl") and backend_config.init_method == "env":
            port = worker_group.execute_single(0, _serve_store_on_loopback, backend_config.timeout_s)
        if port is None:
            self._ray().on_start(worker_group, backend_config)
            return
        import ray

        _, set_env_vars, setup_process_group = _ray_compat.torch_backend()

        worker_group.execute(_join_store_on_loopback, port)
        worker_group.execute(set_env_vars)
        setup = [
            worker_group.execute_single_async(
                rank,
                setup_process_group,
                backend=backend_config.backend,
                world_rank=rank,
                world_size=len(worker_group),
                init_method="env://",
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ]
        ray.get(setup)

    def on_training_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self._ray().on_training_start(worker_group, backend_config)

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self._ray().on_shutdown(worker_group, backend_config)


def _serve_store_on_loopback(timeout_s: int) -> int | None:
    """On worker 0, when its node's Ray address is loopback: a TCPStore server on a socket bound to
    127.0.0.1, kept for the life of the worker; its port. Else None."""
    import ipaddress
    import socket
    from datetime import timedelta

    import ray

    global _store
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return None
    from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage]  # public, re-exported from torch._C

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    _store = TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )
    return port


def _join_store_on_loopback(port: int) -> None:
    """On every worker: rendezvous at worker 0's store as a client (torch's agent-store mode, where rank 0
    starts no server of its own), and gloo on the loopback interface."""
    import psutil

    names = [name for name, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs)]
    loopback = names[0] if names else "lo"
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", GLOO_SOCKET_IFNAME=loopback
    )
