"""Text in, tokens out: the GPT-2 tokenizer, token caches and batches."""

from gpt2exp.data.tokenizer import EOT, TokenizerUnavailable, get_tokenizer

__all__ = ["EOT", "TokenizerUnavailable", "get_tokenizer"]
