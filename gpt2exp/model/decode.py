"""What each generation step attends to, and what the KV cache keeps: the context policy of ``GPT.stream``.

A step attends to at most the last ``context`` tokens (default block_size). How a longer sequence gets
there depends on what a position is to the model:

- Relative positions (RoPE, ALiBi, none): only distances matter, so every layer attends to the last
  ``context`` keys (a sliding window, narrowed by the spec's own) and positions keep counting past
  block_size. The cache rolls: it holds the last ``min(context, sliding_window)`` keys and values,
  and each step feeds one token after the prefill.
- Absolute positions (learned, sinusoidal): a key's position is part of its value, so dropping the
  oldest would change every other key. The window is encoded from position 0; when it is full it
  slides to its last half, which is prefilled once, and then grows one token at a time again.
  Sinusoidal positions could extend past block_size, but positions a model never trained on hurt it
  (Press et al. 2022, fig. 1), so they stay below ``context``.

Without the cache each step recomputes the same windows from the tokens the logits depend on, so both
paths give the same logits (to float tolerance) and the same greedy tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gpt2exp.errors import INPUT, Gpt2expError
from gpt2exp.model.attention import KVCache

if TYPE_CHECKING:
    from gpt2exp.model.gpt import GPT

RELATIVE = ("rope", "alibi", "none")  # positional kinds whose attention depends on distances only


class EmptyContext(Gpt2expError, ValueError):
    """A generation context of no tokens."""

    code = INPUT


class Decoder:
    """Next-token logits of sequences idx (B, T) that grow one token at a time: ``logits()``, then
    ``append()`` the chosen tokens, and again."""

    def __init__(self, model: GPT, idx: Tensor, max_new_tokens: int, context: int | None = None, use_cache: bool = True):
        s = model.spec
        self.model, self.idx, self.use_cache = model, idx, use_cache
        self.context = s.block_size if context is None else context
        if self.context < 1:
            raise EmptyContext(f"context must be at least 1 token, not {self.context}")
        model.check_context(self.context)
        self.relative = s.positional in RELATIVE
        self.window = min(self.context, s.sliding_window or self.context)  # keys a query attends to
        # the tokens the next logits depend on: relative, the receptive field of L layers; absolute, the context
        self.reach = s.n_layer * (self.window - 1) + 1 if self.relative else self.context
        self.start = max(0, idx.size(1) - self.reach)  # the first token in view
        self.capacity = min(self.window, idx.size(1) - self.start + max_new_tokens)  # never more slots than tokens
        self.cache: KVCache | None = None

    def logits(self) -> Tensor:
        """Logits (B, vocab) of the token after the current sequences."""
        x, model = self.idx[:, self.start :], self.model
        offset = self.start if self.relative else 0  # the position of x[:, 0]
        if not self.use_cache:
            h = model.hidden_states(x, start=offset, window=self.window)
        elif self.cache is None:
            cache = self.cache = KVCache(model.spec.n_layer, self.capacity, offset)
            h = [model.hidden_states(chunk, cache) for chunk in x.split(self.capacity, dim=1)][-1]  # masks ≤ (cap, 2 cap)
        else:
            h = model.hidden_states(x[:, -1:], self.cache)
        return model.lm_head(h[:, -1])  # (B, V)

    def append(self, nxt: Tensor) -> None:
        """Add the chosen tokens nxt (B, 1) and move the window."""
        self.idx = torch.cat([self.idx, nxt], dim=1)
        T = self.idx.size(1)
        if self.relative:
            self.start = max(self.start, T - self.reach)
        elif T - self.start > self.context:  # full: slide to the last half, encoded afresh
            self.start, self.cache = T - max(1, self.context // 2), None
