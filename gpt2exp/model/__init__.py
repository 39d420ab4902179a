"""The GPT-2 model family."""

from gpt2exp.model.attention import KVCache
from gpt2exp.model.gpt import GPT

__all__ = ["GPT", "KVCache"]
