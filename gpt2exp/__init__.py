"""gpt2exp: compare GPT-2 variants (attention, positions, ...) from one YAML spec.

The names below load on first use, so that importing a light submodule (as Ray's processes do
when they unpickle one of its classes) does not import torch."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("gpt2exp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_WHERE = {
    "run": "gpt2exp.api",
    "compare": "gpt2exp.api",
    "GPT": "gpt2exp.model",
    "ExperimentSpec": "gpt2exp.spec",
    "ModelSpec": "gpt2exp.spec",
    "SpecError": "gpt2exp.spec",
    "load_spec": "gpt2exp.spec",
    "get_tokenizer": "gpt2exp.data.tokenizer",
}

if TYPE_CHECKING:
    from gpt2exp.api import compare, run
    from gpt2exp.data.tokenizer import get_tokenizer
    from gpt2exp.model import GPT
    from gpt2exp.spec import ExperimentSpec, ModelSpec, SpecError, load_spec


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gpt2exp' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)


__all__ = ["GPT", "ExperimentSpec", "ModelSpec", "SpecError", "__version__", "compare", "get_tokenizer", "load_spec", "run"]
