"""Text in, tokens out: the GPT-2 tokenizer, token caches and batches."""

from gpt2exp.data.loader import BatchSampler, epoch_steps, open_tokens, to_device
from gpt2exp.data.prepare import TokenData, cache_root, prepare
from gpt2exp.data.sources import DataError
from gpt2exp.data.tokenizer import EOT, TokenizerUnavailable, get_tokenizer

__all__ = [
    "EOT",
    "BatchSampler",
    "DataError",
    "TokenData",
    "TokenizerUnavailable",
    "cache_root",
    "epoch_steps",
    "get_tokenizer",
    "open_tokens",
    "prepare",
    "to_device",
]
