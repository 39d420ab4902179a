"""Checkpoints: sharded training state (torch.distributed.checkpoint, any strategy) and the final
consolidated weights (one safetensors file + the model spec, loadable in one process).

A training checkpoint folder holds DCP shards of ``{"model", "optim"}``, ``meta.json`` (step,
metrics, spec; written by rank 0), ``rng_<rank>.pt`` (torch RNG states, read with
``weights_only=True``) and, written last by each rank, ``manifest_<rank>.json``: the size and
SHA-256 of every file that rank wrote (rank 0's also names the world size). Under Ray every rank
reports its own folder and Ray merges them, so a folder is whole when every rank's manifest is
there and every file matches it. A checkpoint is read only after it verifies, and DCP's pickled
``.metadata`` is first unpickled with an allow-list of the classes DCP writes, so a planted pickle
runs nothing; non-tensor entries of the shards are unpickled as plain data (``weights_only``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from gpt2exp.data.prepare import file_digest, file_mismatch
from gpt2exp.errors import Gpt2expError
from gpt2exp.model import GPT
from gpt2exp.parallel.distributed import rank_and_world
from gpt2exp.spec import ModelSpec

META, DCP_METADATA = "meta.json", ".metadata"
WEIGHTS, MODEL_SPEC = "model.safetensors", "model_spec.json"
# what DCP pickles into .metadata (found by unpickling checkpoints of single-process, DDP and FSDP2 runs),
# besides torch dtypes; pathlib moved its classes to pathlib._local in Python 3.13
_METADATA_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *((module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath")),
    ("collections", "OrderedDict"),
}


class CheckpointError(Gpt2expError, RuntimeError):
    """A checkpoint that cannot be trusted, read or written; the message is one line."""


def write_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Every rank: write its shards of model + optimizer, its RNG state, (rank 0) meta.json, then its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _dcp("written", folder):
        dcp_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    rank, world_size = rank_and_world()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_{rank}.pt")
    mine = [p.name for p in folder.glob(f"__{rank}_*.distcp")] + [f"rng_{rank}.pt"]  # DCP names shards __<rank>_<n>
    if rank == 0:
        (folder / META).write_text(json.dumps(meta, indent=1))
        mine += [DCP_METADATA, META]
    files = {name: file_digest(folder / name) for name in sorted(mine)}
    (folder / f"manifest_{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world_size, "files": files}, indent=1))


def verify(folder: Path) -> None:
    """Raise CheckpointError unless ``folder`` holds a whole, intact checkpoint: every rank's manifest,
    every file they list at its size and SHA-256, and DCP metadata of allowed classes only whose shards
    are all listed."""
    world_size, files = _manifest(folder, 0)
    for rank in range(1, world_size):
        files |= _manifest(folder, rank)[1]
    if unlisted := {DCP_METADATA, META} - files.keys():
        raise CheckpointError(f"manifest_0.json does not list {', '.join(sorted(unlisted))}")
    for name, record in files.items():
        if problem := file_mismatch(folder / name, record):
            raise CheckpointError(problem)
    if unlisted := dcp_shards(folder / DCP_METADATA) - files.keys():
        raise CheckpointError(f"{DCP_METADATA} names shards no manifest lists: {', '.join(sorted(unlisted))}")


def _manifest(folder: Path, rank: int) -> tuple[int, dict[str, Any]]:
    """A rank's manifest: (world size, {file name: {"size", "sha256"}})."""
    name = f"manifest_{rank}.json"
    try:
        manifest = json.loads((folder / name).read_text())
        world_size, files = int(manifest["world_size"]), dict(manifest["files"])
    except FileNotFoundError:
        raise CheckpointError(f"{name} missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{name} unreadable ({type(e).__name__}: {e})") from None
    if any(Path(f).name != f for f in files):
        raise CheckpointError(f"{name} lists a path outside the checkpoint folder")
    return world_size, files


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what DCP writes into ``.metadata``: ``_METADATA_CLASSES`` and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}, which DCP does not write")


def dcp_shards(path: Path) -> set[str]:
    """The shard files named by DCP's ``.metadata``, unpickled with the allow-list; anything else raises CheckpointError."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"a {type(metadata).__name__}, not Metadata")
        return {str(info.relative_path) for info in metadata.storage_data.values()}
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    except Exception as e:  # truncated, garbled or odd: nothing outside the allow-list was called
        raise CheckpointError(f"{path.name}: not DCP metadata ({type(e).__name__}: {e})") from None


class _PlainDataPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a shard's non-tensor entries (optimizer settings) must unpickle as
    plain data (``weights_only=True``) before DCP unpickles them."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


@contextlib.contextmanager
def _dcp(done: str, folder: Path) -> Iterator[None]:
    """Around a DCP call: its CheckpointException, a BaseException that would end the whole command, as a
    one-line CheckpointError, and no warning that a single process is assumed (it is right)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            yield
    except CheckpointException as e:
        cause = next((failure for failure, _ in e.failures.values()), e)
        first = (str(cause).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {folder} could not be {done}: {type(cause).__name__}: {first}") from e


def restore_newest(
    folders: list[Path], read: Callable[[Path], dict[str, Any]], emit: Callable[[dict[str, Any]], None], total_steps: int
) -> dict[str, Any] | None:
    """``read`` the first of ``folders`` (newest first) that verifies and return what it returns (None: none
    did). Says which it used: an ``event: restore`` record to ``emit`` and, when newer ones were refused,
    a warning line on rank 0's stderr."""
    refused: list[str] = []
    meta, used = None, None
    for folder in folders:
        try:
            verify(folder)
        except CheckpointError as e:
            refused.append(f"checkpoint {folder.name} failed verification ({e})")
            continue
        meta, used = read(folder), folder.name
        break
    if refused and rank_and_world()[0] == 0:
        then = f"resuming from {used}" if used else "starting from scratch"
        print(f"warning: {folders[0].parent}: {'; '.join(refused)}; {then}", file=sys.stderr, flush=True)
    if refused or used:
        record = {"step": meta["step"] if meta else 0, "total_steps": total_steps, "checkpoint": used, "refused": refused}
        emit({"event": "restore", **record})
    return meta


def read_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: restore model, optimizer and RNG from a verified ``folder`` (resharding if the world changed)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _dcp("loaded (delete it to use an earlier one, or the checkpoints folder to start over)", folder):
        dcp_load(state, checkpoint_id=str(folder), planner=_PlainDataPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank, _ = rank_and_world()
    if (rng_file := folder / f"rng_{rank}.pt").exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((folder / META).read_text())


def save_final(folder: Path, model: nn.Module, spec: ModelSpec) -> None:
    """All ranks gather the full weights; rank 0 writes ``folder`` atomically (weights + spec)."""
    from safetensors.torch import save_file

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = cast(dict[str, Tensor], get_model_state_dict(model, options=options))  # a model's values are all tensors
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
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gpt2exp.model.size import num_params

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / MODEL_SPEC).is_file():
        raise FileNotFoundError(f"{folder}: not a gpt2exp model folder (expected {WEIGHTS} and {MODEL_SPEC})")
    try:
        spec = ModelSpec.model_validate_json((folder / MODEL_SPEC).read_text())
    except ValidationError as e:
        where, why = ".".join(map(str, e.errors()[0]["loc"])), e.errors()[0]["msg"]
        raise CheckpointError(f"{folder}: {MODEL_SPEC} is not a model spec ({where}: {why})") from None
    with safe_open(folder / WEIGHTS, "pt") as f:  # the header only: a spec that lies about the size allocates nothing
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    if stored != num_params(spec):
        raise CheckpointError(
            f"{folder}: {MODEL_SPEC} describes {num_params(spec):,} parameters but {WEIGHTS} holds {stored:,}; the folder is damaged"
        )
    model = GPT(spec)
    missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS, device=str(device)), strict=False)
    tied = {"lm_head.weight"} if model.spec.tie_weights else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: weights do not match the spec (missing {missing}, unexpected {unexpected})")
    return model.to(device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
