"""Faults survived by rerunning: a damaged or planted checkpoint is refused and the previous one used,
a damaged token cache is rebuilt, a NUL-byte data file is one clear error. Each rerun ends with the
uninterrupted run's val_loss. Real tiny runs on the corpus (local launcher; one on Ray, for its merged folders)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gpt2exp.data.prepare import file_digest
from gpt2exp.launch.plan import Plan, make_plan
from gpt2exp.launch.runner import run_plan
from gpt2exp.model import GPT
from gpt2exp.spec import ModelSpec, validate_spec
from gpt2exp.training.checkpoint import CheckpointError, read_state, write_state

pytestmark = pytest.mark.slow

MODEL = {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}
SPEC = {
    "name": "faults",
    "model": MODEL,
    "train": {
        "max_steps": 12,
        "batch_size": 8,
        "lr": 2e-2,
        "warmup_steps": 2,
        "eval_interval": 12,
        "eval_tokens": 256,
        "log_interval": 4,
        "checkpoint_interval": 4,
    },
    "tracking": {"enabled": False},
}
NEWEST, PREVIOUS = "step_00000008", "step_00000004"


@pytest.fixture(scope="module")
def raw_spec(corpus_head, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny spec on the corpus head, with a token cache of this module's own."""
    return {**SPEC, "data": {"path": str(corpus_head(200_000)), "cache_dir": str(tmp_path_factory.mktemp("cache"))}}


def run(raw: dict, output: Path, launcher: str = "local") -> tuple[pd.DataFrame, Plan]:
    plan = make_plan(validate_spec(raw), output, show_progress=False)
    return run_plan(plan, launcher, show_progress=False).runs, plan


@pytest.fixture(scope="module")
def reference(raw_spec: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, Path]:
    """An uninterrupted run: its final val_loss and its output folder (checkpoints at steps 4 and 8)."""
    results, plan = run(raw_spec, tmp_path_factory.mktemp("reference"))
    assert results.status[0] == "completed"
    return float(results.val_loss[0]), plan.output


def killed_after_step_8(reference: tuple[float, Path], tmp_path: Path) -> Path:
    """A copy of the reference run as if killed after its checkpoint at step 8: that run's folder."""
    shutil.copytree(reference[1], tmp_path / "out")
    run_dir = tmp_path / "out" / "faults" / "runs" / "base" / "seed_1337"
    shutil.rmtree(run_dir / "final")
    (run_dir / "status.json").unlink()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [PREVIOUS, NEWEST]
    return run_dir


def truncate_shard(folder: Path) -> None:
    with open(folder / "__0_0.distcp", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)


def garble_shard(folder: Path) -> None:
    garble_shard_of(folder, rank=0)


def garble_shard_of(folder: Path, rank: int) -> None:
    """64 bytes in the middle of the rank's shard zeroed (the size stays)."""
    with open(folder / f"__{rank}_0.distcp", "r+b") as f:
        f.seek(f.seek(0, os.SEEK_END) // 2)
        f.write(bytes(64))


class Payload:
    """A pickle that creates ``marker`` when unpickled (what a planted ``.metadata`` would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def plant_pickle(folder: Path) -> None:
    """A malicious ``.metadata``, with the manifest rewritten to match it, as an attacker would."""
    output = folder.parents[5]  # <output>/faults/runs/base/seed_1337/checkpoints/<folder>
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(output / "pwned")))
    manifest = json.loads((folder / "manifest_0.json").read_text())
    manifest["files"][".metadata"] = file_digest(folder / ".metadata")
    (folder / "manifest_0.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (truncate_shard, "__0_0.distcp: "),
        (garble_shard, "__0_0.distcp: sha256 mismatch"),
        (plant_pickle, ".metadata: refused to unpickle posix.system"),
    ],
    ids=["truncated", "garbled", "planted-pickle"],
)
def test_damaged_checkpoint_falls_back_to_the_previous_one(
    raw_spec: dict, reference: tuple[float, Path], tmp_path: Path, capsys: pytest.CaptureFixture, damage: Callable, why: str
) -> None:
    run_dir = killed_after_step_8(reference, tmp_path)
    damage(run_dir / "checkpoints" / NEWEST)
    results, _ = run(raw_spec, tmp_path / "out")
    assert results.status[0] == "completed" and results.val_loss[0] == pytest.approx(reference[0], abs=1e-4)
    warning = capsys.readouterr().err.strip()
    assert f"checkpoint {NEWEST} failed verification ({why}" in warning and f"resuming from {PREVIOUS}" in warning, warning
    assert len(warning.splitlines()) == 1 and not (tmp_path / "out" / "pwned").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restored = [r for r in records if r["event"] == "restore"]
    assert restored[-1]["checkpoint"] == PREVIOUS and restored[-1]["step"] == 4 and len(restored[-1]["refused"]) == 1


def test_no_checkpoint_verifies_so_the_run_starts_over(
    raw_spec: dict, reference: tuple[float, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = killed_after_step_8(reference, tmp_path)
    garble_shard(run_dir / "checkpoints" / NEWEST)
    (run_dir / "checkpoints" / PREVIOUS / "manifest_0.json").unlink()
    results, _ = run(raw_spec, tmp_path / "out")
    assert results.val_loss[0] == pytest.approx(reference[0], abs=1e-4)
    warning = capsys.readouterr().err
    assert f"checkpoint {PREVIOUS} failed verification (manifest_0.json missing); starting from scratch" in warning


def test_ray_checkpoint_is_verified_rank_by_rank(raw_spec: dict, tmp_path: Path) -> None:
    """Under Ray every rank reports its own folder and Ray merges them: each rank's manifest covers its
    files, and a damaged shard of rank 1 sends the rerun back to the previous checkpoint (DDP, 2 workers)."""
    from gpt2exp.launch.cluster import shutdown

    raw = {**raw_spec, "parallel": {"launcher": "ray", "strategy": "ddp", "num_workers": 2}}
    try:
        first, plan = run(raw, tmp_path, "ray")
        run_dir = Path(plan.jobs[0].run_dir)
        shutil.rmtree(run_dir / "final")
        (run_dir / "status.json").unlink()
        (lane,) = (tmp_path / "faults" / "ray").iterdir()
        newest = lane / f"base-seed1337-{NEWEST}"
        assert {"manifest_0.json", "manifest_1.json", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in newest.iterdir()}
        garble_shard_of(newest, rank=1)
        again, _ = run(raw, tmp_path, "ray")
    finally:
        shutdown()
    assert again.status[0] == "completed" and again.val_loss[0] == pytest.approx(first.val_loss[0], abs=1e-4)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (restored,) = [r for r in records if r["event"] == "restore"]
    assert restored["checkpoint"] == f"base-seed1337-{PREVIOUS}"
    assert restored["refused"] == [f"checkpoint base-seed1337-{NEWEST} failed verification (__1_0.distcp: sha256 mismatch)"]


def test_the_planted_pickle_would_have_run(tmp_path: Path) -> None:
    """The payload of the planted ``.metadata`` is live: plain ``pickle`` runs it (the fallback test shows it did not)."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


def test_planted_pickle_in_a_shard_is_refused(tmp_path: Path) -> None:
    """A shard's non-tensor entry (an optimizer setting) holding a pickle that runs code: loading refuses it
    with a one-line CheckpointError (an Exception: the command goes on), and the payload never runs."""
    model = GPT(ModelSpec(**MODEL), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.param_groups[0]["lr"] = Payload(tmp_path / "pwned")
    write_state(tmp_path / "ckpt", model, optimizer, {"step": 1})
    fresh = GPT(ModelSpec(**MODEL), seed=1)
    with pytest.raises(CheckpointError, match=r"could not be loaded .*UnpicklingError") as err:
        read_state(tmp_path / "ckpt", fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()


def zero_val(folder: Path) -> None:
    (folder / "val.bin").write_bytes(bytes((folder / "val.bin").stat().st_size))


def garble_train(folder: Path) -> None:
    tokens = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r+")
    tokens[1000:1100] = tokens[2000:2100]
    tokens.flush()


def out_of_vocab(folder: Path) -> None:
    tokens = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r+")
    tokens[::97] = 60_000
    tokens.flush()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (zero_val, "val.bin: sha256 mismatch"),
        (garble_train, "train.bin: sha256 mismatch"),
        (out_of_vocab, "train.bin: sha256 mismatch"),
    ],
    ids=["zeroed-val", "garbled-train", "out-of-vocab"],
)
def test_damaged_token_cache_is_rebuilt(
    raw_spec: dict, reference: tuple[float, Path], tmp_path: Path, capsys: pytest.CaptureFixture, damage: Callable, why: str
) -> None:
    (cache,) = [p for p in Path(raw_spec["data"]["cache_dir"]).iterdir() if p.is_dir() and not p.name.startswith(".")]
    damage(cache)
    results, _ = run(raw_spec, tmp_path)
    assert results.status[0] == "completed" and results.val_loss[0] == pytest.approx(reference[0], abs=1e-4)
    assert capsys.readouterr().err.strip() == f"warning: token cache {cache}: {why}; rebuilding it"


def test_nul_byte_data_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "zeros.txt").write_bytes(bytes(100_000))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "data": {"path": str(tmp_path / "zeros.txt")}}))
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "run", str(spec_file), "--output", str(tmp_path / "out"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "zeros.txt" in lines[0] and "NUL" in lines[0], proc.stderr


def test_a_model_folder_that_lies_about_its_size_is_refused_without_allocating(tmp_path: Path) -> None:
    """A model_spec.json claiming a huge model beside small weights: one line, at once, nothing allocated."""
    from gpt2exp.model import GPT
    from gpt2exp.spec import ModelSpec
    from gpt2exp.training.checkpoint import save_final

    spec = ModelSpec(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
    folder = tmp_path / "model"
    save_final(folder, GPT(spec, seed=0), spec)
    for claim, expected in (({"n_layer": 1000, "n_embd": 65536}, "describes 51,5"), ({"n_layer": 100_000}, "not a model spec")):
        (folder / "model_spec.json").write_text(spec.model_copy(update=claim).model_dump_json())
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "gpt2exp.cli", "generate", "--model-uri", str(folder), "--max-new-tokens", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
        assert time.perf_counter() - t0 < 30
