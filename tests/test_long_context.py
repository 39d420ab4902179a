"""Long-context evaluation: strided scoring at a fixed context (equal to scoring each token by hand with the context
it is documented to get), loss by position, ``gpt2exp evaluate --context`` (past block_size; learned positions refuse
in one line), the ``eval:`` spec section, and a tiny real experiment whose runs log ``val_loss_ctxN`` in MLflow and
whose report draws the loss-by-context and loss-by-position figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from typer.testing import CliRunner

import gpt2exp
from gpt2exp import cli
from gpt2exp.data.loader import EvalWindows, StridedWindows
from gpt2exp.data.sources import DataError
from gpt2exp.model import GPT
from gpt2exp.spec import ModelSpec, SpecError, validate_spec
from gpt2exp.spec.sections import metric_key, split_context
from gpt2exp.training.checkpoint import save_final
from gpt2exp.training.evaluate import ContextEval, bucket_means, position_losses, score_strided

CPU = torch.device("cpu")


def tiny_model(positional: str, vocab_size: int = 512) -> GPT:
    spec = ModelSpec(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, positional=positional)
    return GPT(spec, seed=3).eval()


@torch.no_grad()
def brute_force(model: GPT, tokens: np.ndarray, context: int, stride: int, first: int, end: int) -> tuple[float, list[int]]:
    """Mean loss of targets [first, end) (target i: token i+1 from tokens up to i), each scored alone with the context
    the docstring promises: the first window ends at max(first + stride, context), later ones every stride tokens
    (the last at ``end``), each window is the ``context`` tokens before its end. Also each target's context length."""
    t = torch.from_numpy(tokens.astype(np.int64))
    e0 = min(end, max(first + stride, context))
    losses, seen = [], []
    for i in range(first, end):
        window_end = e0 if i < e0 else min(end, e0 + stride * math.ceil((i + 1 - e0) / stride))
        begin = max(0, window_end - context)
        logits, _ = model(t[None, begin : i + 1])
        losses.append(F.cross_entropy(logits[0, -1:], t[i + 1 : i + 2]).item())
        seen.append(i + 1 - begin)
    return sum(losses) / len(losses), seen


@pytest.mark.parametrize(("positional", "context", "stride", "first"), [("rope", 32, 8, 0), ("alibi", 32, 16, 32)])
def test_strided_scores_each_token_once_with_its_documented_context(
    positional: str, context: int, stride: int, first: int
) -> None:
    """At 2x block_size: strided batches (two ranks' shares together) give the brute-force mean over the same targets,
    and past the first window every target sees context - stride + 1 to context tokens."""
    model = tiny_model(positional)
    tokens = np.random.default_rng(0).integers(0, 512, 120).astype(np.uint16)
    windows = StridedWindows(tokens, context, stride, first=first, n=80)
    assert windows.length == context and windows.n_targets == min(80, len(tokens) - 1 - first)
    expected, seen = brute_force(model, tokens, context, stride, first, first + windows.n_targets)
    after_first = seen[max(0, context - first) :] if first < context else seen
    assert min(after_first) == context - stride + 1 and max(seen) == context
    loss, se, count = score_strided(model, windows, micro=3, device=CPU)
    assert count == windows.n_targets and loss == pytest.approx(expected, abs=1e-5) and se > 0
    shares = [b for rank in (0, 1) for b in windows.batches(2, rank, 2)]
    assert len(shares) == 2 * len(list(windows.batches(2, 0, 2)))  # the same number of batches on each rank
    assert sum(int(m.sum()) for *_, m in shares) == count  # together: each target once


def test_learned_positions_refuse_a_longer_window() -> None:
    from gpt2exp.model.gpt import ContextTooLong

    with pytest.raises(ContextTooLong, match="at most 16"):
        score_strided(tiny_model("learned"), StridedWindows(np.arange(100, dtype=np.uint16), 32, 16), 4, CPU)


@torch.no_grad()
def test_position_losses_are_the_mean_over_windows_at_each_position() -> None:
    model = tiny_model("alibi")
    tokens = np.random.default_rng(1).integers(0, 512, 200).astype(np.uint16)
    windows = EvalWindows(tokens, 32)  # 6 non-overlapping windows of 32
    x, y, _ = next(windows.batches(4, 4))
    logits, _ = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(4, 32).mean(0)
    got = position_losses(model, windows, 4, micro=3, device=CPU)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert bucket_means(got, 8) == pytest.approx({p: float(expected[p : p + 8].mean()) for p in (0, 8, 16, 24)}, abs=1e-5)


# ------------------------------------------------------------------------------------------------------ CLI
def evaluate_cli(folder: Path, data: Path, *args: str) -> object:
    return CliRunner().invoke(cli.app, ["evaluate", "--model-uri", str(folder), "--data", str(data), *args])


def test_cli_evaluates_past_block_size_and_learned_refuses_in_one_line(corpus_head, tmp_path: Path) -> None:
    data = corpus_head(4000)
    for positional in ("rope", "learned"):
        model = tiny_model(positional, vocab_size=50304)  # the tokenizer's ids
        save_final(tmp_path / positional, model, model.spec)
    result = evaluate_cli(tmp_path / "rope", data, "--context", "32", "--json", "--max-tokens", "400")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["context"], out["stride"], out["block_size"], out["tokens"]) == (32, 16, 16, 400)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"])) and 8 < out["loss"] < 13  # untrained: about ln(50304)
    plain = evaluate_cli(tmp_path / "rope", data, "--max-tokens", "400", "--json")  # no --context: block_size windows
    assert json.loads(plain.stdout)["context"] == 16

    refused = evaluate_cli(tmp_path / "learned", data, "--context", "32")
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and "Traceback" not in refused.output
    assert lines[0].startswith("error: --context 32 is longer than the 16 positions") and "--context 16 or less" in lines[0]
    bad = evaluate_cli(tmp_path / "rope", data, "--stride", "32")
    assert bad.exit_code == 2 and "--stride 32 is longer than the context 16; give at most 16" in bad.stderr


# ----------------------------------------------------------------------------------------------------- spec
def test_eval_section_rules() -> None:
    base = {"name": "ctx", "model": {"block_size": 128}, "train": {"max_steps": 1}}
    with pytest.raises(SpecError) as e:
        validate_spec({**base, "eval": {"contexts": [64, 256, 512]}})
    assert e.value.lines() == [
        "eval.contexts: [256, 512] are longer than the 128 positions learned positions have (block_size); set "
        "eval.contexts: [64] (on this variant: `set: {eval.contexts: [64]}`) or use positional rope, alibi, sinusoidal or none"
    ]
    with pytest.raises(SpecError, match=r"eval.contexts: contexts \[64\] are given more than once"):
        validate_spec({**base, "model": {"positional": "rope"}, "eval": {"contexts": [64, 64]}})
    with pytest.raises(SpecError, match=r"eval\.contexts\.0: Input should be greater than 0"):
        validate_spec({**base, "eval": {"contexts": [0]}})
    variants = [{"name": "rope"}, {"name": "learned", "set": {"model.positional": "learned"}}]
    spec = {**base, "model": {"block_size": 128, "positional": "rope"}, "eval": {"contexts": [128, 256]}, "variants": variants}
    with pytest.raises(SpecError, match=r"^variants\[learned\]\.eval\.contexts: \[256\] are longer"):
        validate_spec(spec)
    variants[1]["set"]["eval.contexts"] = [128]  # the fix the message gives
    assert [v.spec.eval.contexts for v in validate_spec(spec).expand()] == [[128, 256], [128]]
    assert metric_key("val_loss@512") == "val_loss_ctx512" and metric_key("val_loss") == "val_loss"
    assert split_context("val_loss_se_ctx64") == ("val_loss_se", 64) and split_context("val_loss_ctx64_ci95") is None


# --------------------------------------------------------------------------------------------- experiment
def test_experiment_logs_losses_by_context_and_the_report_draws_them(corpus_head, tmp_path: Path) -> None:
    raw = {
        "name": "ctx",
        "data": {"path": str(corpus_head(60_000)), "cache_dir": str(tmp_path / "tokens")},
        "model": {"vocab_size": 50304, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32, "positional": "rope"},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 2e-2, "eval_interval": 4, "eval_tokens": 128},
        "eval": {"contexts": [8, 16, 32], "tokens": 256},
        "variants": [{"name": "rope"}, {"name": "learned", "set": {"model.positional": "learned", "eval.contexts": [8, 16]}}],
        "tracking": {"system_metrics": False},
    }
    result = gpt2exp.run(raw, output=tmp_path / "out", progress=False)
    assert result.completed
    client = MlflowClient(result.tracking_uri)
    logged = {row.variant: client.get_run(row.run_id).data.metrics for row in result.runs.itertuples()}
    assert {k for k in logged["rope"] if "ctx" in k} == {f"val_loss{se}_ctx{n}" for se in ("", "_se") for n in (8, 16, 32)}
    assert {k for k in logged["learned"] if "ctx" in k} == {f"val_loss{se}_ctx{n}" for se in ("", "_se") for n in (8, 16)}
    for metrics in logged.values():
        assert all(0 < metrics[k] < 12 for k in metrics if k.startswith("val_loss_ctx"))
    rope_run = result.runs.run_id[result.runs.variant == "rope"].iloc[0]
    by_position = client.get_metric_history(rope_run, "val_loss_by_position")
    assert sorted(m.step for m in by_position) == list(range(32))  # longest context 32, buckets of 32/32 = 1

    table = gpt2exp.compare("ctx", output=tmp_path / "out", metric="val_loss@32")
    assert table.attrs["metric"] == "val_loss_ctx32" and list(table.variant) == ["rope"]  # learned has no val_loss@32
    full = gpt2exp.compare("ctx", output=tmp_path / "out")
    assert full.val_loss_ctx16.tolist() == pytest.approx([logged[v]["val_loss_ctx16"] for v in ("rope", "learned")])
    assert math.isnan(full.val_loss_ctx32.iloc[1])

    report = result.report.parent
    assert {"loss_by_context.png", "loss_by_position.png"} <= {p.name for p in report.iterdir()}
    md = (report / "report.md").read_text()
    assert "val_loss@32" in md and "(loss_by_context.png)" in md and "(loss_by_position.png)" in md
    assert (report / "report.html").read_text().count("<img") == 3
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/loss_by_context.png", "report/loss_by_position.png"} <= artifacts


def test_every_context_scores_the_same_last_tokens_of_the_split() -> None:
    tokens = np.arange(1000, dtype=np.uint16)  # a target's token is its index + 1
    for budget, last in ((300, 300), (10**6, 499)):  # at most half the split
        evaluation = ContextEval(tokens, [8, 32, 64], budget)
        scored = {n: sorted(int(t) for _, y, m in w.batches(5) for t in y[m]) for n, w in evaluation.strided.items()}
        assert all(s == list(range(1000 - last, 1000)) for s in scored.values()), {n: s[:3] for n, s in scored.items()}
    with pytest.raises(DataError, match=r"too few for eval\.contexts up to 512"):
        ContextEval(tokens, [512], 100)
