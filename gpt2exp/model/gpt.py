"""The GPT-2 model family: pre-LayerNorm transformer blocks with switchable attention and positions."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2exp.errors import INPUT, Gpt2expError
from gpt2exp.model import flex
from gpt2exp.model.attention import CausalSelfAttention, KVCache, Span, attention_mask, narrowest_window
from gpt2exp.model.decode import Decoder
from gpt2exp.model.loss import IGNORE, linear_cross_entropy
from gpt2exp.model.positional import rope_cache, sinusoidal_table
from gpt2exp.spec import ModelSpec

INIT_STD = 0.02  # GPT-2's standard deviation for weights and embeddings


class ContextTooLong(Gpt2expError, ValueError):
    """A sequence longer than a model with learned positions can take."""

    code = INPUT


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, parameter name) alone: a stable 64-bit hash of both."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, spec.mlp_width, bias=spec.bias)  # mlp_hidden, GPT-2's 4 x n_embd by default
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(spec.mlp_width, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.n_embd, bias=spec.bias)
        self.attn = CausalSelfAttention(spec, layer)
        self.ln_2 = nn.LayerNorm(spec.n_embd, bias=spec.bias)
        self.mlp = MLP(spec)

    def forward(
        self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None, span: Span
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, rope, cache, span)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.ModuleDict):
    """GPT's ``transformer`` modules (state-dict prefix ``transformer.``), with their types."""

    wte: nn.Embedding
    drop: nn.Dropout
    h: nn.ModuleList  # of Block
    ln_f: nn.LayerNorm
    wpe: nn.Embedding  # learned positions only


class GPT(nn.Module):
    """GPT-2 with multi-head/grouped-query/multi-query attention and learned, sinusoidal, RoPE,
    ALiBi or no positions. ``forward(idx) -> (logits, None)``, ``forward(idx, targets) -> (None, loss)``.

    ``GPT(spec, seed=s)`` draws every parameter from (s, its name) alone (see ``init_weights``), so
    two variants built with one seed share every tensor whose name and shape agree."""

    pos_table: Tensor  # buffers, by positional: sinusoidal (block_size, n_embd); rope (block_size, hs) each
    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, spec: ModelSpec | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or ModelSpec()
        self.transformer = Transformer(
            dict(
                wte=nn.Embedding(spec.vocab_size, spec.n_embd),
                drop=nn.Dropout(spec.dropout),
                h=nn.ModuleList(Block(spec, i) for i in range(spec.n_layer)),
                ln_f=nn.LayerNorm(spec.n_embd, bias=spec.bias),
            )
        )
        if spec.positional == "learned":
            self.transformer["wpe"] = nn.Embedding(spec.block_size, spec.n_embd)
        elif spec.positional == "sinusoidal":
            # x-transformers' ScaledSinusoidal: the fixed table (element RMS 1/sqrt(2)) times a learnable
            # scalar that starts where the token embeddings' element RMS starts (INIT_STD). At amplitude 1
            # the table would carry ~99.97% of the input's energy at init and drown the tokens; a scalar
            # rather than a constant lets the model follow the token embeddings as they grow in training.
            self.register_buffer("pos_table", sinusoidal_table(spec.block_size, spec.n_embd), persistent=False)
            self.pos_scale = nn.Parameter(torch.full((1,), INIT_STD * math.sqrt(2.0)))  # (1,): FSDP2 shards dim 0
        elif spec.positional == "rope":
            cos, sin = rope_cache(spec.block_size, spec.head_size, spec.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        if spec.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation, each tensor drawn from its own generator seeded by (seed, name):
        matrices and embeddings N(0, 0.02), residual projections (``c_proj``) N(0, 0.02/sqrt(2 n_layer)),
        Linear biases 0; LayerNorms and ``pos_scale`` keep their constant start. Drawn on the CPU, so
        the values do not depend on the device, rank or world size. ``seed=None`` takes one from
        torch's global generator (``torch.manual_seed`` still decides)."""
        if seed is None:
            seed = int(torch.randint(2**62, (), device="cpu"))
        linear_biases = {f"{m}.bias" for m, mod in self.named_modules() if isinstance(mod, nn.Linear)}
        for name, p in self.named_parameters():  # tied weights once, under their first name (transformer.wte.weight)
            if p.is_meta:
                continue
            if name in linear_biases:
                p.zero_()
            elif p.dim() >= 2:
                std = INIT_STD / math.sqrt(2 * self.spec.n_layer) if name.endswith("c_proj.weight") else INIT_STD
                p.copy_(torch.empty(p.shape, device="cpu").normal_(0.0, std, generator=param_generator(seed, name)))

    # ------------------------------------------------------------------------------- forward
    def hidden_states(self, idx: Tensor, cache: KVCache | None = None, start: int = 0, window: int | None = None) -> Tensor:
        """Final-LayerNorm activations (B, T, n_embd) of tokens idx (B, T) at positions start..start+T, each
        attending to at most the last ``window`` positions (and the spec's sliding window). A ``cache``
        gives both (its ``pos`` and ``capacity``) and keeps the keys and values for the next call."""
        T = idx.size(1)
        if cache is not None:
            start, window = cache.pos, cache.capacity
        self.check_context(start + T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.spec.positional == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.spec.positional == "sinusoidal":
            table = self.pos_table[start : start + T]
            if start + T > self.pos_table.size(0):  # past the table's end
                table = sinusoidal_table(T, self.spec.n_embd, start).to(idx.device)
            x = x + (self.pos_scale * table).to(x.dtype)
        x = self.transformer.drop(x)
        rope = None
        if self.spec.positional == "rope":
            rope = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
            if start + T > self.rope_cos.size(0):  # past the table's end
                cos, sin = rope_cache(T, self.spec.head_size, self.spec.rope_theta, start)
                rope = cos.to(idx.device), sin.to(idx.device)
        keys = cache.key_positions(T, idx.device) if cache is not None else torch.arange(start, start + T, device=idx.device)
        narrowest = narrowest_window(self.spec, window)
        cut = narrowest if narrowest is not None and narrowest < keys.size(0) else None  # None: no key is cut off
        span, mask = None, None  # flex's span (model/flex.py), else SDPA's mask or bias (None: causal)
        if (cut is not None or self.spec.positional == "alibi") and flex.use_flex(x, self.spec.dropout if self.training else 0.0):
            queries = range(start, start + T)
            span = Span(queries, queries if cache is None else cache.key_range(T) or keys, cut)  # a range: mask cached
        else:
            mask = attention_mask(self.spec, start, T, keys, window)
            if mask is not None and mask.is_floating_point():
                mask = mask.to(x.dtype)
        for block in self.transformer.h:
            x = block(x, mask, rope, cache, span)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    @property
    def max_context(self) -> int | None:
        """The longest sequence the model takes: block_size with learned positions (a table of that
        length), else None: sinusoidal, RoPE, ALiBi and no positions are functions of position, so
        they extend past the trained length (how well they do there is what long-context evaluation measures)."""
        return self.spec.block_size if self.spec.positional == "learned" else None

    def check_context(self, n: int) -> None:
        """Raise ContextTooLong if n positions are more than the model has."""
        if (limit := self.max_context) is not None and n > limit:
            raise ContextTooLong(
                f"{n} tokens is longer than the {limit} positions a model with learned positions has "
                f"(block_size={limit}); give at most {limit} tokens of context"
            )

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, return_logits: bool = False, reduction: Literal["mean", "none"] = "mean"
    ) -> tuple[Tensor | None, Tensor | None]:
        """(logits (B, T, vocab), None) without targets. Given targets (B, T; -1 ignored): (None, loss), the
        mean cross-entropy (``reduction="none"``: per token, (B, T), 0 where ignored), computed a chunk of
        rows at a time without the full logits (``model.loss``); ``return_logits=True`` gives
        (logits, loss), the loss then taken from the logits."""
        h = self.hidden_states(idx)  # (B, T, C)
        logits = self.lm_head(h) if targets is None or return_logits else None  # (B, T, V)
        if targets is None:
            return logits, None
        if logits is None:
            loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), reduction)
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
        return logits, loss if reduction == "mean" else loss.view_as(targets)

    # ---------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        context: int | None = None,
    ) -> Tensor:
        """Extend idx (B, T) by up to max_new_tokens sampled tokens (B, T + n), each attending to at most the
        last ``context`` tokens (see ``stream``); temperature 0 is greedy."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos, use_cache, generator, context))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        context: int | None = None,
    ) -> Iterator[Tensor]:
        """Yield the next tokens (B, 1) one step at a time (see ``generate``).

        Each step attends to at most the last ``context`` tokens (default block_size; at most block_size
        with learned positions): see ``gpt2exp.model.decode`` for how the window moves and what the KV
        cache keeps. Cached and uncached generation see the same context. Rows that emitted ``eos``
        are padded with it, and generation stops when every row has.
        """
        decoder = Decoder(self, idx, max_new_tokens, context, use_cache)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample(decoder.logits().float(), temperature, top_k, top_p, generator)  # (B, 1)
            if eos is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos), nxt)
                done |= nxt[:, 0] == eos
            decoder.append(nxt)
            yield nxt
            if eos is not None and bool(done.all()):
                return

    # -------------------------------------------------------------------------------- helpers
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (tied weights counted once); without token and position embeddings if asked."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·hs·T with N the matmul parameters
        (all but the embedding lookups; the LM head counts) and T the attended context."""
        s = self.spec
        n = self.num_params(exclude_embeddings=True)
        if s.tie_weights:  # the tied LM head was excluded with wte; an untied one is still counted
            n += s.vocab_size * s.n_embd
        context = min(s.block_size, s.sliding_window or s.block_size)
        return 6 * n + 12 * s.n_layer * s.n_head * s.head_size * context

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: weight decay on matrices and embeddings (>= 2-D), none on biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **overrides) -> GPT:
        """GPT-2 weights from a Hugging Face checkpoint: a local folder (config.json +
        model.safetensors) or, online, a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl).
        ``overrides`` change ModelSpec fields that do not touch the weights (e.g. dropout)."""
        from gpt2exp.model.hf import load_hf_checkpoint

        spec, state = load_hf_checkpoint(name_or_path)
        model = cls(spec.model_copy(update=overrides) if overrides else spec)
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a Hugging Face GPT-2 folder (config.json + model.safetensors) that transformers loads."""
        from gpt2exp.model.hf import save_hf_checkpoint

        return save_hf_checkpoint(self.spec, self.state_dict(), path)


def sample(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """Next tokens (B, 1) from logits (B, V): greedy at temperature 0, else top-k/top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
