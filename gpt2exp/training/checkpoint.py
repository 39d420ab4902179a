"""Checkpoints: sharded training state (torch.distributed.checkpoint, any strategy) and the final
consolidated weights (one safetensors file + the model spec, loadable in one process).

A training checkpoint folder holds DCP shards of ``{"model", "optim"}``, ``meta.json`` (step,
metrics, spec; written by rank 0) and ``rng_<rank>.pt`` (torch RNG states, read with
``weights_only=True``). Folders are complete or absent: writers build them under a temporary
name and rename, and Ray Train registers a checkpoint only after every rank reported it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from gpt2exp.model import GPT
from gpt2exp.parallel.distributed import rank_and_world
from gpt2exp.spec import ModelSpec

META = "meta.json"
WEIGHTS, MODEL_SPEC = "model.safetensors", "model_spec.json"


def write_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Every rank: write its shards of model + optimizer, its RNG state, and (rank 0) meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # single process: DCP says it assumes so, which is right
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    rank, _ = rank_and_world()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_{rank}.pt")
    if rank == 0:
        (folder / META).write_text(json.dumps(meta, indent=1))


def read_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: restore model, optimizer and RNG from ``folder`` (resharding if the world changed)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank, _ = rank_and_world()
    if (rng_file := folder / f"rng_{rank}.pt").exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((folder / META).read_text())


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file() and (folder / ".metadata").is_file()


def save_final(folder: Path, model: nn.Module, spec: ModelSpec) -> None:
    """All ranks gather the full weights; rank 0 writes ``folder`` atomically (weights + spec)."""
    from safetensors.torch import save_file

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_and_world()[0] != 0:
        return
    if spec.tie_weights:
        state.pop("lm_head.weight", None)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS)
    (tmp / MODEL_SPEC).write_text(spec.model_dump_json(indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_final(folder: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A trained GPT from a folder written by ``save_final``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / MODEL_SPEC).is_file():
        raise FileNotFoundError(f"{folder}: not a gpt2exp model folder (expected {WEIGHTS} and {MODEL_SPEC})")
    model = GPT(ModelSpec.model_validate_json((folder / MODEL_SPEC).read_text()))
    missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS, device=str(device)), strict=False)
    tied = {"lm_head.weight"} if model.spec.tie_weights else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: weights do not match the spec (missing {missing}, unexpected {unexpected})")
    return model.to(device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
