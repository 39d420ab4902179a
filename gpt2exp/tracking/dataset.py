"""The training corpus as an MLflow dataset input: its real source (a local path, a URL, a Hugging Face
dataset), the token cache key as its digest and its size as its profile."""

from __future__ import annotations

import json
import os
import urllib.parse
import warnings
from pathlib import Path

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag

DIGEST_CHARS = 24  # the token cache folder is named by the same prefix of the key: the digest finds it
NAME_CHARS = 60


def dataset_source(source: str) -> tuple[DatasetSource, str]:
    """The MLflow source and a short name for the spec's ``kind:value`` data source (``DataSpec.source``).

    ``path:`` is the absolute path (a file, a folder or a glob, relative to the working directory as the
    tokenizer read it); ``builtin:`` the folder of the installed corpus files; ``url:`` the URL;
    ``hf_dataset:`` the Hugging Face dataset."""
    kind, _, value = source.partition(":")
    if kind == "url":
        return HTTPDatasetSource(url=value), Path(urllib.parse.urlparse(value).path).name or value
    if kind == "hf_dataset":
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource  # imports `datasets` only to load

        return HuggingFaceDatasetSource(path=value), value
    if kind == "builtin":
        from gpt2exp.data.sources import builtin_files

        path = Path(os.path.commonpath(builtin_files(value)))
        return _local(path), value
    if kind == "path":
        path = Path(os.path.expanduser(value)).absolute()
        return _local(path), path.name or value
    raise ValueError(f"not a data source: {source!r} (expected path:, url:, hf_dataset: or builtin:)")


def _local(path: Path) -> DatasetSource:
    """MLflow's ``local`` source (the class it registers for plain paths; it has no public name to import)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers that class twice (for "" and "file:") and says so
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        return resolve_dataset_source(str(path))


def dataset_input(source: str, key: str, n_tokens: int, context: str = "training") -> DatasetInput:
    """A run input for the corpus ``source`` (see :func:`dataset_source`) tokenized under cache ``key``."""
    origin, name = dataset_source(source)
    meta = MetaDataset(origin, name=name[-NAME_CHARS:], digest=key[:DIGEST_CHARS] or None)
    dataset = Dataset(**meta.to_dict(), profile=json.dumps({"train_tokens": n_tokens}))
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])
