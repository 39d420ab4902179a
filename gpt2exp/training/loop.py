"""The worker loop: one function that trains one variant at one seed, whatever launches it (this
process, torchrun, or a Ray Train worker). Launchers differ only in the ``Session`` they pass."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gpt2exp.data.loader import BatchSampler, EvalWindows, to_device
from gpt2exp.model import GPT
from gpt2exp.parallel.distributed import all_mean, grad_sync, wrap
from gpt2exp.spec import ExperimentSpec
from gpt2exp.training.checkpoint import read_state, save_final, write_state
from gpt2exp.training.evaluate import ContextEval, score_windows
from gpt2exp.training.job import Diverged, TrainJob
from gpt2exp.training.metrics import mfu, peak_flops
from gpt2exp.training.optim import build_optimizer, lr_at


class Session(Protocol):
    """What the loop needs from its launcher."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        """Call ``read`` on the latest complete checkpoint folder, if any; return what it returns."""

    def checkpoint(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        """Every rank: ``write`` its part into a folder that becomes the latest checkpoint; returns, once it is the
        one a resume would use, where it is kept."""
        ...

    def emit(self, record: dict[str, Any]) -> None:
        """Rank 0: a metrics record for progress display and tracking (must not block)."""


class RunLog(Protocol):
    """Where rank 0 logs its run (``gpt2exp.tracking.runs.RunLogger``: an MLflow run), given by the launcher."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Facts known once the model is built."""

    def log(self, record: dict[str, Any]) -> None:
        """A step's metrics record (sent without waiting)."""

    def flush(self) -> None:
        """Wait until every record sent is stored: a resume from the next checkpoint skips those steps."""

    def checkpoint(self, step: int, location: str) -> None:
        """A checkpoint that is committed (a resume would use it)."""

    def final_model(self, final_dir: Path, step: int) -> None:
        """The final model, saved in ``final_dir``."""

    def log_series(self, key: str, values: dict[int, float]) -> None:
        """A curve whose steps are not training steps (``val_loss_by_position``: step = position)."""


def autocast_for(spec: ExperimentSpec, device: torch.device) -> contextlib.AbstractContextManager:
    """The run's precision on ``device``: bf16/fp16 autocast, or none for fp32 (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    precision = spec.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(job: TrainJob, session: Session, logger: RunLog | None = None) -> dict[str, Any]:
    """Train ``job`` to ``job.total_steps`` (resuming from the session's latest checkpoint); rank 0
    logs into ``logger`` when the launcher gives one."""
    spec, t, device = job.spec, job.spec.train, session.device
    torch.manual_seed(job.seed)  # dropout; the weights come from (seed, parameter name) alone
    raw = GPT(spec.model, seed=job.seed).to(device)
    flops_per_token, n_params = raw.flops_per_token(), raw.num_params()
    if logger is not None:
        logger.log_params({"n_params": n_params, "flops_per_token": flops_per_token})
    bf16 = device.type == "cuda" and t.precision in ("auto", "bf16")
    model = wrap(raw, spec.parallel, device, bf16)
    optimizer = build_optimizer(raw, t, device)
    if t.compile:
        model = cast(nn.Module, torch.compile(model))  # a module compiles to an OptimizedModule
    sampler = BatchSampler(job.train_tokens, spec.model.block_size, t.batch_size, job.seed, session.rank, session.world_size)
    eval_set = EvalWindows(job.val_tokens, spec.model.block_size)
    micro, accum = spec.micro_batch_size, spec.grad_accum_steps
    tokens_per_step = t.batch_size * spec.model.block_size
    final_eval_tokens = t.final_eval_budget(job.total_steps * tokens_per_step)
    contexts = (
        ContextEval(job.val_tokens, spec.eval.contexts, spec.eval.tokens or final_eval_tokens) if spec.eval.contexts else None
    )
    peak = peak_flops(device, spec.parallel.peak_flops)
    ckpt_every = t.checkpoint_interval or t.eval_interval

    meta = session.restore(lambda folder: read_state(folder, raw, optimizer)) or {}
    start = meta.get("step", 0)
    last: dict[str, Any] = dict(meta.get("metrics", {}))
    train_s = float(meta.get("train_seconds", 0.0))  # time in training steps: evaluation and checkpoints excluded

    def evaluate(n_tokens: int) -> tuple[float, float]:
        with autocast_for(spec, device):
            return score_windows(model, eval_set, n_tokens, micro, device, session.rank, session.world_size)

    model.train()
    clock, interval_s, steps_since_log = time.perf_counter(), 0.0, 0
    for step in range(start, job.total_steps):
        lr = lr_at(step, job.total_steps, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for m, batch in enumerate(sampler.micro_batches(step, micro)):  # this rank's share of the global batch
            xb, yb = to_device(*batch, device)  # (micro, T)
            with grad_sync(model, m == accum - 1), autocast_for(spec, device):
                _, loss = model(xb, yb)
                (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        if not math.isfinite(grad_norm):  # identical on every rank: the gradients were all-reduced
            raise Diverged(f"{job.key}: non-finite gradient norm at step {step + 1}; the last good checkpoint is kept")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps_since_log += 1

        done = step + 1
        is_last = done == job.total_steps
        checkpoint_due = done % ckpt_every == 0 and not is_last
        record: dict[str, Any] = {}
        log_due = done % t.log_interval == 0 or done % t.eval_interval == 0 or is_last
        train_loss = math.nan  # measured on logging steps
        if log_due:
            train_loss = all_mean([loss_sum.item() / accum], device)[0]  # waits for the step to finish
            if not math.isfinite(train_loss):
                raise Diverged(f"{job.key}: loss is {train_loss} at step {done}; the last good checkpoint is kept")
        if log_due or checkpoint_due:  # a stretch of training ends here
            now = time.perf_counter()
            train_s, interval_s = train_s + now - clock, interval_s + now - clock
        if log_due:
            tps = tokens_per_step * steps_since_log / interval_s
            record = dict(
                step=done,
                train_loss=train_loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_sec_during_training=tps,
                tokens_seen=done * tokens_per_step,
                train_seconds=train_s,
                mfu=mfu(flops_per_token, tps, peak, session.world_size),
            )
            if done % t.eval_interval == 0 or is_last:  # the last evaluation scores more of the same windows
                record["val_loss"], record["val_loss_se"] = evaluate(final_eval_tokens if is_last else t.eval_tokens)
                record["val_perplexity"] = math.exp(min(record["val_loss"], 50.0))
            if is_last and contexts is not None:  # the final model at other context lengths, all ranks taking part
                with autocast_for(spec, device):
                    scores, by_position = contexts.run(
                        model, micro * spec.model.block_size, device, session.rank, session.world_size
                    )
                record.update(scores)
                if logger is not None:
                    logger.log_series("val_loss_by_position", by_position)
            last.update(record)
            session.emit({**record, "event": "step", "total_steps": job.total_steps})
            if logger is not None:
                logger.log(record)
            interval_s, steps_since_log = 0.0, 0
        if checkpoint_due:
            state = {
                "step": done,
                "metrics": dict(last),
                "train_seconds": train_s,
                "experiment": job.experiment,
                "variant": job.variant,
                "seed": job.seed,
            }
            if logger is not None:  # every step up to the checkpoint is in the run before it counts: a resume skips them
                logger.flush()
            where = session.checkpoint(
                lambda folder, state=state: write_state(folder, raw, optimizer, state), {**last, "step": done}
            )
            if logger is not None and spec.tracking.log_checkpoints:  # committed (under Ray: reported)
                logger.checkpoint(done, where)
        if log_due or checkpoint_due:
            clock = time.perf_counter()  # evaluation and checkpoint time is not training time
    save_final(Path(job.run_dir) / "final", raw, spec.model)  # raw: FSDP2 shards it in place
    if logger is not None:
        logger.final_model(Path(job.run_dir) / "final", job.total_steps)
    summary = {
        **last,
        "tokens_per_sec_during_training": last["tokens_seen"] / train_s,  # the run's throughput: tokens per second of training
        "params": n_params,
        "flops_per_token": flops_per_token,
        "world_size": session.world_size,
    }
    session.emit({**summary, "event": "done", "total_steps": job.total_steps})
    return summary
