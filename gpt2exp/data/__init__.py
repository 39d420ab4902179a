"""Text in, tokens out: the GPT-2 tokenizer and token caches (``gpt2exp.data.loader``, which needs
torch, makes the batches)."""

from gpt2exp.data.prepare import TokenData, cache_root, open_tokens, prepare
from gpt2exp.data.sources import DataError
from gpt2exp.data.tokenizer import EOT, TokenizerUnavailable, get_tokenizer

__all__ = ["EOT", "DataError", "TokenData", "TokenizerUnavailable", "cache_root", "get_tokenizer", "open_tokens", "prepare"]
