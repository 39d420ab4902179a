"""The GPT-2 model family. ``GPT`` and ``KVCache`` load on first use, so that ``gpt2exp.model.size`` (what
``gpt2exp validate`` computes from a spec) does not import torch."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2exp.model.attention import KVCache
    from gpt2exp.model.gpt import GPT

_WHERE = {"GPT": "gpt2exp.model.gpt", "KVCache": "gpt2exp.model.attention"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gpt2exp.model' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)


__all__ = ["GPT", "KVCache"]
