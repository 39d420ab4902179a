"""``data.hf_dataset`` offline: Shakespeare as a Hugging Face dataset built on disk (``save_to_disk``, JSON
lines), loaded whole or streamed, gives the tokens of the same documents as text files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2exp.data import DataError, TokenData, prepare
from gpt2exp.spec import DataSpec

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def plays(corpus_path: Path) -> list[str]:
    """Four documents of real text: 240 kB of the corpus cut at blank lines."""
    text = corpus_path.read_text(encoding="utf-8")[:240_000]
    cuts = [0] + [text.index("\n\n", n) + 2 for n in (60_000, 120_000, 180_000)] + [len(text)]
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


@pytest.fixture(scope="module")
def as_files(plays: list[str], tmp_path_factory: pytest.TempPathFactory) -> TokenData:
    """The reference: the same documents as text files (one document each), prepared locally."""
    folder = tmp_path_factory.mktemp("plays")
    for i, play in enumerate(plays):
        (folder / f"play{i}.txt").write_text(play, encoding="utf-8")
    return prepare(DataSpec(path=str(folder), cache_dir=str(folder / ".cache")), show_progress=False)


@pytest.fixture(scope="module")
def hf_dirs(plays: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hf")
    rows = {"title": [f"play {i}" for i in range(len(plays))], "text": plays}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder / "saved"))
    (folder / "jsonl").mkdir()
    for part in range(2):  # two data files, two rows each
        lines = [json.dumps({"title": t, "text": p}) for t, p in zip(rows["title"], plays, strict=True)][2 * part : 2 * part + 2]
        (folder / "jsonl" / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    return {"saved": folder / "saved", "jsonl": folder / "jsonl", "glob": folder / "jsonl" / "*.jsonl"}


@pytest.mark.parametrize("kind", ["saved", "jsonl", "glob"])
@pytest.mark.parametrize("streaming", [False, True])
def test_local_datasets_give_the_tokens_of_the_same_text_files(
    hf_dirs: dict[str, Path], as_files: TokenData, tmp_path: Path, kind: str, streaming: bool
) -> None:
    spec = DataSpec(hf_dataset=str(hf_dirs[kind]), hf_streaming=streaming, cache_dir=str(tmp_path))
    data = prepare(spec, show_progress=False)
    assert np.array_equal(data.train, as_files.train) and np.array_equal(data.val, as_files.val)
    assert data.meta["n_documents"] == 4 and data.meta["source"] == f"hf_dataset:{hf_dirs[kind]}"
    assert prepare(spec, show_progress=False).dir == data.dir  # content-keyed: found again


def test_the_key_follows_the_content(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    spec = DataSpec(hf_dataset=str(hf_dirs["jsonl"]), cache_dir=str(tmp_path))
    first = prepare(spec, show_progress=False)
    assert prepare(spec.model_copy(update={"hf_text_field": "title"}), show_progress=False).dir != first.dir
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in hf_dirs["jsonl"].iterdir():
        (changed / f.name).write_text(f.read_text().replace(" the ", " thee "))
    assert prepare(DataSpec(hf_dataset=str(changed), cache_dir=str(tmp_path)), show_progress=False).dir != first.dir


@pytest.mark.parametrize("streaming", [False, True])
def test_a_missing_text_column_is_one_line(hf_dirs: dict[str, Path], tmp_path: Path, streaming: bool) -> None:
    spec = DataSpec(hf_dataset=str(hf_dirs["saved"]), hf_text_field="body", hf_streaming=streaming, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"^data.hf_text_field: 'body' is not a column of .*; columns: \['title', 'text'\]$"):
        prepare(spec, show_progress=False)


def test_unusable_datasets_are_one_line(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("no data files here")
    with pytest.raises(DataError, match="no data files of one kind"):
        prepare(DataSpec(hf_dataset=str(tmp_path), cache_dir=str(tmp_path / "c")), show_progress=False)
    spec = DataSpec(hf_dataset=str(hf_dirs["saved"]), cache_dir=str(tmp_path / "c"), prepare_with="ray")
    with pytest.raises(DataError, match=r"prepare_with: ray tokenizes files .* use prepare_with: local"):
        prepare(spec, show_progress=False)
