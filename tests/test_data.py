"""The data pipeline on real text: Shakespeare from ../shared, the real GPT-2 tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2exp.data import EOT, DataError, cache_root, get_tokenizer, prepare
from gpt2exp.data.build import SEGMENT_TOKENS
from gpt2exp.data.loader import BatchSampler, EvalWindows, epoch_steps
from gpt2exp.data.prepare import TokenData, file_digest, load_complete
from gpt2exp.data.sources import builtin_files, read_pieces
from gpt2exp.spec import DataSpec


@pytest.fixture(scope="module")
def text(corpus_path: Path) -> str:
    return corpus_path.read_text(encoding="utf-8")[:300_000]


@pytest.fixture
def small_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shakespeare-300k.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, text: str):
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "s.txt").write_text(text, encoding="utf-8")
    return prepare(DataSpec(path=str(folder / "s.txt"), cache_dir=str(folder / "cache")), show_progress=False)


def spec(tmp_path: Path, **kw) -> DataSpec:
    return DataSpec(cache_dir=str(tmp_path / "cache"), **kw)


def stream(data) -> np.ndarray:
    """train + val back in stream order (a corpus under one segment: train is the head, val the tail)."""
    assert data.n_train + data.n_val <= SEGMENT_TOKENS
    return np.concatenate([data.train, data.val])


# -------------------------------------------------------------------------------- tokenization
def test_tokens_decode_back_to_the_text(tmp_path: Path, small_file: Path, text: str) -> None:
    data = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    enc = get_tokenizer()
    tokens = stream(data)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert enc.decode(tokens.tolist()) == text
    assert tokens.tolist() == enc.encode_ordinary(text)  # streaming in pieces changes no token
    assert data.n_val == round(len(tokens) * 0.1)
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta["n_train_tokens"] == data.n_train and meta["tokenizer"] == "gpt2" and meta["n_documents"] == 1
    assert meta["source"] == f"path:{small_file}" and meta["key"] and meta["created"]


def test_full_corpus_follows_the_segment_tail_rule(tmp_path: Path, corpus_path: Path) -> None:
    data = prepare(spec(tmp_path, path=str(corpus_path), val_fraction=0.2), show_progress=False)
    ref = np.array(get_tokenizer().encode_ordinary(corpus_path.read_text(encoding="utf-8")), dtype=np.uint16)
    segments = [ref[i : i + SEGMENT_TOKENS] for i in range(0, len(ref), SEGMENT_TOKENS)]
    assert len(segments) == 2
    cuts = [len(s) - int(len(s) * 0.2 + 0.5) for s in segments]
    np.testing.assert_array_equal(data.train, np.concatenate([s[:c] for s, c in zip(segments, cuts, strict=True)]))
    np.testing.assert_array_equal(data.val, np.concatenate([s[c:] for s, c in zip(segments, cuts, strict=True)]))
    assert data.meta["n_bytes"] == corpus_path.stat().st_size and data.meta["mb_per_s"] > 0


def test_pieces_cut_at_safe_newlines(small_file: Path, text: str) -> None:
    path = small_file.with_name("mixed.txt")
    path.write_bytes(("café — naïve ✓ déjà vu\n" * 500 + text[:20_000]).encode() + b"\xff\xfe broken\n")
    pieces = list(read_pieces(path, piece_bytes=1000))
    assert len(pieces) > 20 and sum(n for _, n in pieces) == path.stat().st_size
    whole = path.read_bytes().decode("utf-8", errors="replace")
    assert "".join(p for p, _ in pieces) == whole
    enc = get_tokenizer()
    assert [t for p, _ in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(whole)


def test_thread_counts_give_the_same_tokens(tmp_path: Path, corpus_head) -> None:
    """One thread (no pool) and three (this thread takes every third piece) write identical files, in input order."""
    path = corpus_head(1_200_000)  # about five 256 KiB pieces
    one, three = (prepare(spec(tmp_path / str(n), path=str(path)), show_progress=False, num_threads=n) for n in (1, 3))
    assert (one.meta["threads"], three.meta["threads"]) == (1, 3) and one.meta["files"] == three.meta["files"]
    whole = get_tokenizer().encode_ordinary(path.read_text(encoding="utf-8"))
    assert np.concatenate([three.train, three.val]).tolist() == whole  # one segment: train is the head, val the tail


def test_folder_documents_are_joined_by_eot(tmp_path: Path, text: str) -> None:
    docs = {"a.txt": text[:3000], "b/c.md": text[3000:5000], "empty.txt": "", "z.txt": text[5000:9000]}
    for name, body in docs.items():
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_text(body, encoding="utf-8")
    (tmp_path / "corpus" / "data.bin").write_bytes(bytes(range(256)))  # not a text suffix: ignored
    (tmp_path / "corpus" / ".notes.txt").write_text("hidden: ignored")
    data = prepare(spec(tmp_path, path=str(tmp_path / "corpus")), show_progress=False)
    enc = get_tokenizer()
    a, c, z = (enc.encode_ordinary(docs[n]) for n in ("a.txt", "b/c.md", "z.txt"))
    expected = [*a, EOT, *c, EOT, *z]
    assert stream(data).tolist() == expected
    assert data.meta["n_documents"] == 3

    globbed = prepare(spec(tmp_path, path=str(tmp_path / "corpus" / "*.txt")), show_progress=False)
    assert EOT in stream(globbed) and globbed.meta["n_documents"] == 2  # a.txt and z.txt


# ---------------------------------------------------------------------------------------- cache
def test_second_prepare_reuses_the_cache(tmp_path: Path, small_file: Path) -> None:
    t0 = time.perf_counter()
    first = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    t1 = time.perf_counter()
    stamp = {f.name: f.stat().st_mtime_ns for f in first.dir.iterdir()}
    second = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    t2 = time.perf_counter()
    assert second.dir == first.dir and second.meta == first.meta
    assert {f.name: f.stat().st_mtime_ns for f in second.dir.iterdir()} == stamp
    assert t2 - t1 < (t1 - t0) / 2
    copy = shutil.copy(small_file, tmp_path / "copy.txt")  # same content elsewhere: same cache
    assert prepare(spec(tmp_path, path=str(copy)), show_progress=False).dir == first.dir
    url = prepare(spec(tmp_path, url=small_file.as_uri()), show_progress=False)  # downloaded once, same content
    assert url.dir == first.dir and len(list((tmp_path / "cache" / "downloads").iterdir())) == 1
    other = prepare(spec(tmp_path, path=str(small_file), val_fraction=0.2), show_progress=False)
    assert other.dir != first.dir and other.n_val > first.n_val


def test_incomplete_caches_are_rebuilt(tmp_path: Path, small_file: Path, capsys: pytest.CaptureFixture) -> None:
    data = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    (data.dir / "meta.json").unlink()  # crashed before meta.json: not complete
    assert load_complete(data.dir) == "no meta.json"
    again = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    assert again.dir == data.dir and isinstance(load_complete(again.dir), TokenData)

    with open(data.dir / "train.bin", "r+b") as f:  # meta.json present but a file cut short
        f.truncate(1000)
    assert load_complete(data.dir) == f"train.bin: 1,000 bytes, {2 * data.n_train:,} recorded"
    assert prepare(spec(tmp_path, path=str(small_file)), show_progress=False).n_train == data.n_train

    shutil.move(data.dir, data.dir.with_name(f".tmp-{data.dir.name}-crashed"))  # a half-written temp folder
    rebuilt = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    assert rebuilt.dir == data.dir and rebuilt.meta["created"] and isinstance(load_complete(rebuilt.dir), TokenData)
    assert not list(data.dir.parent.glob(".tmp-*"))
    warnings = capsys.readouterr().err.strip().splitlines()  # one line per rebuild of a damaged folder
    assert warnings == [
        f"warning: token cache {data.dir}: no meta.json; rebuilding it",
        f"warning: token cache {data.dir}: train.bin: 1,000 bytes, {2 * data.n_train:,} recorded; rebuilding it",
    ]


def test_cache_records_and_checks_file_hashes(tmp_path: Path, small_file: Path, capsys: pytest.CaptureFixture) -> None:
    """Same-size damage (a zeroed val.bin, out-of-vocabulary ids) is found by the SHA-256 recorded at creation."""
    data = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    assert data.meta["files"] == {name: file_digest(data.dir / name) for name in ("train.bin", "val.bin")}
    val = data.val.copy()
    (data.dir / "val.bin").write_bytes(bytes(2 * data.n_val))
    assert load_complete(data.dir) == "val.bin: sha256 mismatch"
    rebuilt = prepare(spec(tmp_path, path=str(small_file)), show_progress=False)
    assert np.array_equal(rebuilt.val, val) and rebuilt.meta["files"] == data.meta["files"]
    assert capsys.readouterr().err == f"warning: token cache {data.dir}: val.bin: sha256 mismatch; rebuilding it\n"


def test_tokens_beyond_the_vocabulary_are_refused_at_creation(
    tmp_path: Path, small_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Narrow:  # the GPT-2 encoding claiming a vocabulary of 100 tokens
        name, n_vocab = "gpt2", 100
        encode_to_numpy = staticmethod(get_tokenizer().encode_to_numpy)

    monkeypatch.setattr(sys.modules["gpt2exp.data.prepare"], "get_tokenizer", Narrow)
    with pytest.raises(RuntimeError, match=r"token id \d+ >= its vocabulary size 100"):
        prepare(spec(tmp_path, path=str(small_file)), show_progress=False)


def test_concurrent_preparers_build_once(tmp_path: Path, small_file: Path) -> None:
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare(spec(tmp_path, path=str(small_file)), show_progress=False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.dir for r in results}) == 1
    assert len({json.dumps(r.meta, sort_keys=True) for r in results}) == 1  # one build, found by the others
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [results[0].dir.name]


def test_cache_root_honours_env_then_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2EXP_CACHE", str(tmp_path / "env"))
    assert cache_root(DataSpec()) == tmp_path / "env"
    assert cache_root(DataSpec(cache_dir=str(tmp_path / "spec"))) == tmp_path / "spec"
    monkeypatch.delenv("GPT2EXP_CACHE")
    assert cache_root(DataSpec()) == Path.home() / ".cache" / "gpt2exp" / "tokens"


# --------------------------------------------------------------------------------------- errors
def _empty_file(d: Path) -> str:
    (d / "empty.txt").write_text("")
    return "empty.txt"


def _no_text_files(d: Path) -> str:
    (d / "code").mkdir()
    (d / "code" / "x.py").write_text("x = 1\n")
    return "code"


def _utf16(d: Path) -> str:
    (d / "u16.txt").write_text("hello", encoding="utf-16")
    return "u16.txt"


def _zero_filled_tail(d: Path) -> str:
    (d / "tail.txt").write_bytes(b"To be, or not to be, that is the question.\n" * 500 + bytes(50_000))  # NULs after 8 KB
    return "tail.txt"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_empty_file, ["no text", "empty"]),
        (_zero_filled_tail, ["NUL bytes", "tail.txt", "not text"]),
        (lambda d: "nothing-*.txt", ["matches no files", "nothing-*.txt"]),
        (lambda d: "missing.txt", ["does not exist", "missing.txt"]),
        (_no_text_files, ["no .txt/.md", "code"]),
        (_utf16, ["not UTF-8", "u16.txt"]),
    ],
    ids=["empty-file", "zero-filled-tail", "empty-glob", "missing", "no-text-files", "utf16"],
)
def test_unusable_sources_fail_with_one_clear_line(tmp_path: Path, make, expected: list[str]) -> None:
    path = tmp_path / make(tmp_path)
    with pytest.raises(DataError) as err:
        prepare(spec(tmp_path, path=str(path)), show_progress=False)
    message = str(err.value)
    assert "\n" not in message and all(s in message for s in expected), message


def test_too_little_text_for_a_block(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n")
    data = prepare(spec(tmp_path, path=str(tmp_path / "tiny.txt")), show_progress=False)
    data.check_min_tokens(2)  # val: about 3 tokens
    with pytest.raises(DataError, match=r"train split has \d+ tokens but model.block_size=64 needs at least 65"):
        data.check_min_tokens(64)
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchSampler(data.train, block_size=64, batch_size=2, seed=0)


# -------------------------------------------------------------------------------------- batches
def test_batches_are_windows_fixed_by_seed_and_step(prepared) -> None:
    s = BatchSampler(prepared.train, block_size=32, batch_size=8, seed=1)
    x, y = s.batch(5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = s.starts(5)
    assert torch.equal(x[0], torch.from_numpy(prepared.train[starts[0] : starts[0] + 32].astype(np.int64)))
    resumed = BatchSampler(prepared.dir / "train.bin", block_size=32, batch_size=8, seed=1)  # fresh: resuming at step 5
    assert all(torch.equal(a, b) for a, b in zip(resumed.batch(5), s.batch(5), strict=True))
    assert not torch.equal(s.batch(6)[0], x)
    assert not torch.equal(BatchSampler(prepared.train, 32, 8, seed=2).batch(5)[0], x)
    assert s.starts(0).max() <= len(prepared.train) - 33


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shares_make_up_the_single_process_batch(prepared, world: int) -> None:
    single = BatchSampler(prepared.train, block_size=16, batch_size=8, seed=3)
    ranks = [BatchSampler(prepared.train, 16, 8, seed=3, rank=r, world_size=world) for r in range(world)]
    for step in (0, 7):
        x, y = single.batch(step)
        assert torch.equal(torch.cat([r.batch(step)[0] for r in ranks]), x)
        assert torch.equal(torch.cat([r.batch(step)[1] for r in ranks]), y)
        micro = single.micro_batches(step, 8 // world)  # gradient accumulation in one process
        assert all(torch.equal(m[0], r.batch(step)[0]) for m, r in zip(micro, ranks, strict=True))
    with pytest.raises(ValueError, match="multiple of world_size"):
        BatchSampler(prepared.train, 16, 6, seed=0, world_size=4)


def test_eval_windows_are_fixed_and_cover_the_split(prepared) -> None:
    """The evaluation set: non-overlapping windows covering the split, one order for every run; the
    first n windows are the same rows whatever the micro batch and the worker count."""
    ev = EvalWindows(prepared.val, block_size=16)
    tokens = ev.tokens
    assert len(ev) == (len(tokens) - 1) // 16 and len(ev) > 20
    assert sorted(ev.starts.tolist()) == list(range(0, len(ev) * 16, 16))  # every window once, none overlapping
    assert ev.starts[:10].tolist() != sorted(ev.starts[:10].tolist())  # a prefix samples the whole split
    assert np.array_equal(EvalWindows(prepared.val, 16).starts, ev.starts)
    assert ev.count(16 * 7 + 3) == 7 and ev.count(1) == 1 and ev.count(10**9) == len(ev)

    def scored(micro: int, world: int) -> list[list[int]]:
        rows = []
        for rank in range(world):
            for x, y, n in ev.batches(11, micro, rank, world):
                assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape[1] == 16
                rows += x[:n].tolist()
        return sorted(rows)

    single = scored(11, 1)
    assert len(single) == 11
    assert scored(4, 1) == scored(2, 2) == scored(3, 4) == single
    counts = {len(list(ev.batches(11, 3, r, 4))) for r in range(4)}
    assert counts == {1}  # every rank runs the same number of forwards (collectives in FSDP/DDP)


def test_epoch_steps() -> None:
    assert epoch_steps(1_000_000, block_size=250, batch_size=8) == 500
    assert epoch_steps(100, 10, 4) == 2.5


# ------------------------------------------------------------------------------------- built-in
def test_builtin_corpus_loads(tmp_path: Path) -> None:
    try:
        files = builtin_files("shakespeare")
    except DataError as e:
        pytest.skip(str(e))
    assert len(files) == 38 and all(f.suffix == ".md" for f in files)
    data = prepare(DataSpec(cache_dir=str(tmp_path / "cache")), show_progress=False)  # no source: the built-in one
    assert data.meta["source"] == "builtin:shakespeare" and data.meta["n_documents"] == 38
    assert int((data.train == EOT).sum() + (data.val == EOT).sum()) == 37
    assert data.n_train > 1_000_000
    text = get_tokenizer().decode(data.train[:100_000].tolist())
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")  # plain text, not Markdown
    assert "\nTHESEUS:\nNow, fair Hippolyta, our nuptial hour\n" in text
    assert "**" not in text and "\n#" not in text and "  \n" not in text
    data.check_min_tokens(1024)
    assert os.path.commonpath([data.dir, tmp_path]) == str(tmp_path)
