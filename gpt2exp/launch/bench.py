"""What the variants' final models cost to run, measured fairly: after every job of an experiment has
finished, the driver loads each variant's final model (first seed) and times them in interleaved rounds.
Round r runs every variant once, in an order rotated by r, so whatever else loads the machine hits all
variants alike (as ``benchmarks/train_step.py`` alternates gpt2exp and transformers); each figure is the
median over rounds.

Per round and variant, on the spec's device, in its precision:

- ``prefill_tokens_per_sec``: one prompt of block_size tokens through the model into a fresh KV cache;
- ``decode_tokens_per_sec``: greedy decoding with the KV cache at batch 1, the cache holding
  block_size - DECODE_STEPS tokens at the start (long contexts are where the KV cache's size shows; a block
  of at most DECODE_STEPS tokens decodes block_size - 1 tokens after a 1-token prompt);
- ``decode_tokens_per_sec_b8``: the same at batch ``WIDE_BATCH`` (8), where reading the cache dominates sooner;
- ``train_tokens_per_sec``: one forward + backward + AdamW step on the spec's micro-batch, on a copy of
  the model made once (the trained weights stay as they are).

The training loop's own tokens/s (``tokens_per_sec_during_training`` in results and comparisons) stays what
it was: measured while other jobs shared the machine, it compares variants only roughly."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt2exp.model import GPT, KVCache
from gpt2exp.spec import ExperimentSpec
from gpt2exp.training.checkpoint import load_final
from gpt2exp.training.job import BENCH_METRICS
from gpt2exp.training.loop import autocast_for
from gpt2exp.training.optim import build_optimizer

if TYPE_CHECKING:
    from gpt2exp.launch.plan import Plan

DECODE_STEPS = 16  # greedy tokens timed per decode measurement
WIDE_BATCH = 8


@dataclass(frozen=True)
class Timer:
    """Seconds a call takes on ``device`` (its queue drained before and after), by ``clock``: wall time, or
    ``time.process_time`` for the CPU time of a one-thread process, which other jobs' load barely moves."""

    device: torch.device
    clock: Callable[[], float] = time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = self.clock()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock() - t0


@torch.no_grad()
def _prefill(model: GPT, tokens: torch.Tensor, timed: Timer) -> float:
    """Tokens/s of a block_size prompt (1, T) into a fresh cache, up to the next token's logits."""
    cache = KVCache(model.spec.n_layer, model.spec.block_size)
    return tokens.numel() / timed(lambda: model.lm_head(model.hidden_states(tokens, cache)[:, -1]))


@torch.no_grad()
def _decode(model: GPT, prompt: torch.Tensor, timed: Timer) -> float:
    """Tokens/s of greedy steps with the KV cache up to the block's end (DECODE_STEPS at most), after an untimed
    prefill of prompt (B, T)."""
    n = model.spec.block_size - prompt.size(1)
    cache = KVCache(model.spec.n_layer, model.spec.block_size)
    nxt = model.lm_head(model.hidden_states(prompt, cache)[:, -1]).argmax(-1, keepdim=True)  # (B, 1)

    def steps() -> None:
        tok = nxt
        for _ in range(n):
            tok = model.lm_head(model.hidden_states(tok, cache)[:, -1]).argmax(-1, keepdim=True)

    return prompt.size(0) * n / timed(steps) if n else math.nan  # block_size 1: nothing to decode


class Trainer:
    """A copy of a model with its own AdamW, for timed training steps that leave the model itself as it is."""

    def __init__(self, model: GPT, spec: ExperimentSpec, timed: Timer) -> None:
        self.model, self.spec, self.timed = copy.deepcopy(model).train(), spec, timed
        self.optimizer = build_optimizer(self.model, spec.train, timed.device)

    def tokens_per_sec(self, batch: torch.Tensor) -> float:
        """Tokens/s of one forward + backward + AdamW step on batch (B, T + 1)."""

        def step() -> None:
            with autocast_for(self.spec, self.timed.device):
                _, loss = self.model(batch[:, :-1], batch[:, 1:])
            assert loss is not None
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return batch[:, :-1].numel() / self.timed(step)


def measure(model: GPT, trainer: Trainer, gen: torch.Generator) -> dict[str, float]:
    """One round's figures (``BENCH_METRICS``) of one model; the tokens come from ``gen`` (seeded alike for every
    variant: paired inputs)."""
    s, spec, timed = model.spec, trainer.spec, trainer.timed
    prompt_len = max(1, s.block_size - DECODE_STEPS)
    draw = lambda *shape: torch.randint(s.vocab_size, shape, generator=gen).to(timed.device)
    with autocast_for(spec, timed.device):
        figures = {
            "prefill_tokens_per_sec": _prefill(model, draw(1, s.block_size), timed),
            "decode_tokens_per_sec": _decode(model, draw(1, prompt_len), timed),
            "decode_tokens_per_sec_b8": _decode(model, draw(WIDE_BATCH, prompt_len), timed),
        }
    figures["train_tokens_per_sec"] = trainer.tokens_per_sec(draw(spec.micro_batch_size, s.block_size + 1))
    return figures


def interleaved(models: dict[str, tuple[GPT, ExperimentSpec]], rounds: int, timed: Timer) -> dict[str, dict[str, float]]:
    """Median figures per variant over ``rounds`` interleaved rounds (round r starts with the r-th variant),
    after one untimed warm-up round (allocators, kernels, AdamW's state)."""
    names = list(models)
    trainers = {n: Trainer(model, spec, timed) for n, (model, spec) in models.items()}
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(-1, rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            figures = measure(models[name][0], trainers[name], torch.Generator().manual_seed(max(r, 0)))
            if r >= 0:
                samples[name].append(figures)
    return {n: {k: statistics.median(f[k] for f in samples[n]) for k in BENCH_METRICS} for n in names}


def benchmark_plan(plan: Plan) -> dict[str, tuple[str, dict[str, float]]]:
    """The interleaved benchmark of every variant whose first seed finished: variant -> (that job's key, figures).
    In a sweep, each variant at its chosen setting: its first verdict run (the comparison's runs)."""
    firsts = {}
    for job in plan.jobs:
        final = Path(job.run_dir) / "final"
        if job.trial is not None and job.trial.phase == "selection":
            continue
        if job.variant not in firsts and final.is_dir():
            firsts[job.variant] = job
    if not firsts or plan.spec.eval.benchmark_rounds == 0:
        return {}
    device = torch.device("cuda" if plan.spec.parallel.use_gpu and torch.cuda.is_available() else "cpu")
    models = {v: (load_final(Path(j.run_dir) / "final", device).eval(), j.spec) for v, j in firsts.items()}
    figures = interleaved(models, plan.spec.eval.benchmark_rounds, Timer(device))
    return {v: (firsts[v].key, figures[v]) for v in firsts}
