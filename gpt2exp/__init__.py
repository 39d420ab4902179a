"""gpt2exp: compare GPT-2 variants (attention, positions, ...) from one YAML spec."""

from importlib.metadata import PackageNotFoundError, version

from gpt2exp.data.tokenizer import get_tokenizer
from gpt2exp.model import GPT
from gpt2exp.spec import ExperimentSpec, ModelSpec, SpecError, load_spec

try:
    __version__ = version("gpt2exp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["GPT", "ExperimentSpec", "ModelSpec", "SpecError", "__version__", "get_tokenizer", "load_spec"]
