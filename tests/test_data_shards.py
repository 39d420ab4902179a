"""``data.prepare_with: ray``: Shakespeare in several files tokenized by Ray Data (a real local Ray) into
shards, read back as the local preparation's exact token stream, split, batches and evaluation windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2exp.data import prepare
from gpt2exp.data.loader import BatchSampler, EvalWindows
from gpt2exp.data.prepare import TokenData, load_complete
from gpt2exp.data.shards import ShardedTokens, split_ranges
from gpt2exp.spec import DataSpec

SEGMENT = 40_000  # tokens per split segment here, so that segments and shards cut each other


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus_files(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 kB of the corpus as five files cut mid-line, after an empty file (no EOT may precede the first text)."""
    folder = tmp_path_factory.mktemp("files")
    data = corpus_path.read_bytes()[:600_000]
    (folder / "a-empty.txt").write_bytes(b"")
    for i, cut in enumerate(range(0, len(data), 120_000)):
        (folder / f"b-part{i}.txt").write_bytes(data[cut : cut + 120_000])
    return folder


@pytest.fixture(scope="module")
def both(ray_local, corpus_files: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenData, TokenData]:
    """(local, sharded) preparations of the same folder, with SEGMENT-token split segments."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gpt2exp.data.build.SEGMENT_TOKENS", SEGMENT)
        local = prepare(DataSpec(path=str(corpus_files), cache_dir=str(cache / "local")), show_progress=False)
        spec = DataSpec(path=str(corpus_files), cache_dir=str(cache / "ray"), prepare_with="ray")
        sharded = prepare(spec, show_progress=False)
    return local, sharded


def test_shards_hold_the_local_token_stream_and_split(both: tuple[TokenData, TokenData], corpus_files: Path) -> None:
    local, sharded = both
    assert sharded.meta["layout"] == "shards" and sharded.meta["shards"] == 6 and sharded.meta["n_documents"] == 5
    shards = sorted(p.name for p in (sharded.dir / "shards").iterdir())
    assert shards == [f"part-{i:05d}.bin" for i in range(6)] and (sharded.dir / "shards/part-00000.bin").stat().st_size == 0
    assert (sharded.dir / "shards/part-00001.bin").read_bytes()[:2] == np.uint16(50256).tobytes()  # skipped by the split
    assert (sharded.n_train, sharded.n_val) == (local.n_train, local.n_val) and local.n_train + local.n_val > 4 * SEGMENT
    assert isinstance(sharded.train, ShardedTokens) and sharded.path("train").name == "train.json"
    assert np.array_equal(np.asarray(sharded.train), local.train) and np.array_equal(np.asarray(sharded.val), local.val)
    ranges = json.loads(sharded.path("val").read_text())["ranges"]
    assert len(ranges) > len({r[0] for r in ranges}) > 1  # val tails of several segments, in several shards
    again = prepare(DataSpec(path=str(corpus_files), cache_dir=str(sharded.dir.parent), prepare_with="ray"), show_progress=False)
    assert again.dir == sharded.dir and again.meta == sharded.meta  # found complete: not rebuilt


def test_batches_and_eval_windows_read_across_shards(both: tuple[TokenData, TokenData]) -> None:
    local, sharded = both
    for rank in (0, 1):
        a = BatchSampler(local.path("train"), 64, 8, seed=4, rank=rank, world_size=2)
        b = BatchSampler(sharded.path("train"), 64, 8, seed=4, rank=rank, world_size=2)
        for step in (0, 1, 9):
            assert all(torch.equal(p, q) for p, q in zip(a.batch(step), b.batch(step), strict=True))
    ev_local, ev_sharded = EvalWindows(local.path("val"), 64), EvalWindows(sharded.path("val"), 64)
    assert np.array_equal(ev_local.starts, ev_sharded.starts)
    got = [x for x, _, _ in ev_sharded.batches(len(ev_sharded), 16)]
    assert torch.equal(torch.cat(got), torch.cat([x for x, _, _ in ev_local.batches(len(ev_local), 16)]))


def test_a_damaged_shard_is_found(both: tuple[TokenData, TokenData], tmp_path: Path) -> None:
    _, sharded = both
    assert isinstance(load_complete(sharded.dir), TokenData)
    copy = tmp_path / "copy"
    shutil.copytree(sharded.dir, copy)
    part = copy / "shards/part-00003.bin"
    part.write_bytes(bytes(part.stat().st_size))
    assert load_complete(copy) == "part-00003.bin: sha256 mismatch"


def test_split_ranges_cut_segments_over_shards() -> None:
    # shards of 5, 0, 7 tokens (the middle one empty), the first starting with an EOT to skip; segments of 4
    ranges = split_ranges([5, 0, 7], skip_first=1, segment=4, val_fraction=0.25)
    p0, p2 = "shards/part-00000.bin", "shards/part-00002.bin"
    assert ranges["train"] == [[p0, 1, 4], [p2, 0, 3], [p2, 4, 6]]
    assert ranges["val"] == [[p0, 4, 5], [p2, 3, 4], [p2, 6, 7]]


def test_training_reads_the_shards(both: tuple[TokenData, TokenData], corpus_files: Path, tmp_path: Path) -> None:
    """A run on the sharded preparation trains on the same batches and scores the same windows as on the local one."""
    from gpt2exp.launch.plan import make_plan
    from gpt2exp.launch.runner import run_plan
    from gpt2exp.spec import validate_spec

    local, sharded = both
    losses = []
    for data, how in ((local, "local"), (sharded, "ray")):
        raw = {
            "name": "shards",
            "data": {"path": str(corpus_files), "cache_dir": str(data.dir.parent), "prepare_with": how},
            "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
            "train": {"max_steps": 3, "batch_size": 4, "eval_interval": 3, "eval_tokens": 256, "final_eval_tokens": 512},
            "tracking": {"enabled": False},
        }
        plan = make_plan(validate_spec(raw), tmp_path / how, show_progress=False)
        assert plan.jobs[0].train_tokens == str(data.path("train"))
        runs = run_plan(plan, "local", show_progress=False).runs
        assert runs.status.tolist() == ["completed"], runs.error.tolist()
        losses.append((float(runs.train_loss.iloc[0]), float(runs.val_loss.iloc[0])))
    assert losses[0] == losses[1]
