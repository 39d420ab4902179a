"""Process group, device and data-parallel wrapping (DDP or FSDP2) for the worker loop.

Ray Train creates the process group itself; under ``torchrun`` the local launcher creates it
from the environment; a single process needs none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from gpt2exp.spec import ParallelSpec

if TYPE_CHECKING:
    from gpt2exp.model import GPT


def init_from_env(use_gpu: bool) -> None:
    """Join the torch.distributed group described by torchrun's environment, if any."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_gpu else "gloo")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def pick_device(use_gpu: bool) -> torch.device:
    """cuda:<local rank> when asked for and present, else the CPU."""
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.use_gpu is true but this machine has no CUDA device; set parallel.use_gpu=false")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def set_cpu_threads(parallel: ParallelSpec, local_world: int) -> None:
    """Give each CPU worker its share of the cores (Ray's default is one thread)."""
    threads = parallel.cpus_per_worker or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)


def wrap(model: GPT, parallel: ParallelSpec, device: torch.device, bf16: bool) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``device``) when the group has several ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or parallel.strategy == "none":
        return model
    if parallel.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final micro-steps of gradient accumulation."""
    if enabled:
        yield
    elif (no_sync := getattr(model, "no_sync", None)) is not None:  # DDP
        with no_sync():
            yield
    elif (set_sync := getattr(model, "set_requires_gradient_sync", None)) is not None:  # FSDP2
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of each value over ranks, in float64 (identity in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over ranks (identity in a single process)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return [v / world for v in all_sum(values, device)]
