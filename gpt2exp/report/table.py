"""The comparison table: one row per variant with size, tokens seen, wall time, throughput, final and
best value of a metric, perplexity and the difference to the baseline variant.

With several seeds every figure is a mean with its 95% confidence interval (Student t), and the
difference to the baseline is paired over the seeds both variants ran: paired t-test p-value, its Holm
adjustment over all variants compared, the minimal detectable difference (80% power) and a verdict,
``better`` / ``worse`` when the adjusted p-value is below 5% (family-wise), else ``no clear difference``
(see :mod:`gpt2exp.report.stats`). With one seed per variant no verdict is possible: the table says so
and how to add seeds. :func:`display_frame`, :func:`summary_frame` and :func:`notes` are the table as people read it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gpt2exp.report.runs import ReportError, Runs, context_keys, load_runs, lower_is_better, per_run
from gpt2exp.report.stats import ALPHA, POWER, holm, mdd, mean_ci, paired_p_value, verdict
from gpt2exp.report.sweep import chosen_settings, selection_note, split_sweep
from gpt2exp.spec.sections import metric_key, split_context
from gpt2exp.training.job import BENCH_METRICS

SEEDS_ADVICE = "Run at least 3 seeds: `train.seeds: [1, 2, 3]` in the spec, or `--set 'train.seeds=[1,2,3]'`."


def comparison_table(
    runs: Runs, metric: str = "val_loss", baseline: str | None = None, finished_only: bool = True
) -> pd.DataFrame:
    """One row per variant (spec order). Columns: variant, n_seeds, params, tokens, wall_s,
    tokens_per_sec_during_training, final_<metric>, best_<metric>, perplexity, kv_bytes_per_token, the speed
    benchmark's prefill/decode/decode_b8/train_tokens_per_sec (one seed measured, NaN without it), delta (final metric minus the
    baseline's: mean of the paired differences over shared seeds, else difference of means), with
    more than one seed ``<column>_ci95`` (half-width of the 95% t interval) after each measured column
    and ``delta_ci95`` (paired over shared seeds); then always ``n_paired``, ``p_value`` (paired t-test),
    ``p_adjusted`` (Holm over the variants compared), ``mdd`` (minimal detectable difference at 80% power
    and the strictest Holm level) and ``verdict`` (``too few seeds`` below 2 paired seeds).

    ``df.attrs`` holds experiment, parent_run_id, metric, baseline, lower_is_better, multi_seed,
    ``comparisons`` (variants with a p-value), ``note`` (why there is no verdict and how to add seeds,
    else None) and ``excluded`` (unfinished runs left out, as ``variant/seed=N: STATUS``)."""
    runs, selection = split_sweep(runs)  # a sweep: the verdict runs at each variant's chosen setting
    metric, available = metric_key(metric), runs.metrics()  # val_loss@512 is logged as val_loss_ctx512
    if metric not in available:
        shown = [m for m in available if not m.startswith("system/")]
        raise ReportError(f"no run logged metric {metric!r}; available: {', '.join(shown) or 'none'}")
    excluded = [
        f"{r['variant']}/seed={r['seed']}: {r['status']}" for r in runs.frame.to_dict("records") if r["status"] != "FINISHED"
    ]
    per = per_run(runs, metric, finished_only)
    if per.empty:
        raise ReportError(
            f"experiment {runs.experiment!r}: no finished runs ({'; '.join(excluded)}); --include-unfinished to compare them anyway"
        )
    per = per.loc[per[f"final_{metric}"].notna()]
    if per.empty:
        raise ReportError(f"experiment {runs.experiment!r}: no finished run logged {metric!r}")
    variants = [v for v in runs.variants if v in set(per.variant)]
    baseline = baseline or runs.baseline or variants[0]
    if baseline not in variants:
        raise ReportError(f"baseline {baseline!r} is not a variant with results; variants: {', '.join(variants)}")
    lower = lower_is_better(metric)
    multi = bool(per.groupby("variant").size().max() > 1)
    final = f"final_{metric}"
    base = per.loc[per.variant == baseline].set_index("seed")[final]
    measured = ["params", "tokens", "wall_s", "tokens_per_sec_during_training", final, f"best_{metric}", "perplexity"]
    measured += [key for _, key in context_keys(runs)]
    measured += ["kv_bytes_per_token", *BENCH_METRICS]
    rows, diffs = [], []
    for name in variants:
        group = per.loc[per.variant == name]
        row: dict[str, Any] = {"variant": name, "n_seeds": len(group)}
        for col in measured:
            mean, ci, _ = mean_ci(group[col])
            row[col] = mean
            if multi and col not in ("params", "tokens", "kv_bytes_per_token", *BENCH_METRICS):  # one value per variant
                row[f"{col}_ci95"] = ci
        mine = group.set_index("seed")[final]
        pairable = not (mine.index.has_duplicates or base.index.has_duplicates)
        shared = [s for s in mine.index if pd.notna(s) and s in base.index] if pairable else []
        d = np.array([mine[s] - base[s] for s in shared])
        d_mean, d_ci, n = mean_ci(d) if len(d) else (row[final] - mean_ci(base)[0], math.nan, 0)
        row["delta"] = 0.0 if name == baseline else d_mean
        if multi:
            row["delta_ci95"] = math.nan if name == baseline else d_ci
        row["n_paired"] = n
        rows.append(row)
        diffs.append(d)
    table = pd.DataFrame(rows)
    table["n_seeds"] = table.n_seeds.astype(int)
    if table.params.notna().all():
        table["params"] = table.params.round().astype(int)
    compared = (table.variant != baseline).to_numpy()
    table["p_value"] = np.where(compared, [float(paired_p_value(d)) for d in diffs], math.nan)  # 1-D d: one p each
    table["p_adjusted"] = holm(table.p_value)  # the baseline's NaN is left out of the family
    m = int(table.p_value.notna().sum())
    level = ALPHA / max(m, 1)  # the strictest Holm level: detectable even as the family's smallest p
    table["mdd"] = [
        mdd(d.std(ddof=1) if len(d) > 1 else math.nan, len(d), level) if c else math.nan
        for d, c in zip(diffs, compared, strict=True)
    ]
    table["verdict"] = [
        verdict(r["delta"], r["p_adjusted"], r["n_paired"], lower) if c else "baseline"
        for r, c in zip(table.to_dict("records"), compared, strict=True)
    ]
    if selection:
        table.insert(1, "setting", table.variant.map(chosen_settings(selection)))
    note = None
    if m == 0 and compared.any():  # no test was possible: say why and how to get one
        why = "No variant shares 2 seeds with the baseline" if multi else "One seed per variant"
        note = f"{why}: no verdict is possible (seed-to-seed noise is as large as typical differences). {SEEDS_ADVICE}"
    table.attrs.update(
        experiment=runs.experiment,
        parent_run_id=runs.parent_id,
        tracking_uri=runs.tracking_uri,
        metric=metric,
        baseline=baseline,
        lower_is_better=lower,
        multi_seed=multi,
        comparisons=m,
        note=note,
        excluded=excluded if finished_only else [],
        selection=selection,
        verdict_seeds=sorted(int(s) for s in per.seed.dropna().unique()),
    )
    return table


def compare(
    tracking_uri: str,
    experiment: str,
    metric: str = "val_loss",
    baseline: str | None = None,
    parent_run_id: str | None = None,
    include_unfinished: bool = False,
) -> pd.DataFrame:
    """:func:`load_runs` then :func:`comparison_table` (what ``gpt2exp compare`` prints)."""
    runs = load_runs(tracking_uri, experiment, parent_run_id)
    return comparison_table(runs, metric, baseline, finished_only=not include_unfinished)


def _num(value: Any, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _p(value: float) -> str:
    return "" if math.isnan(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def _pm(mean: Any, ci: Any, fmt: str) -> str:
    text = _num(mean, fmt)
    spread = _num(ci, fmt.lstrip("+"))
    return f"{text} ± {spread}" if text and spread else text


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text for people: ``mean ± ci95`` cells, rounded numbers, compact p-values, readable headers."""
    a = table.attrs
    metric, multi = a["metric"], a.get("multi_seed", False)
    digits = ".4f" if abs(table[f"final_{metric}"]).max() < 1000 else ",.1f"
    cols: list[tuple[str, str, str]] = [  # header, column, format
        ("seeds", "n_seeds", "d"),
        ("params", "params", ",.0f"),
        ("tokens", "tokens", ",.0f"),
        ("wall s", "wall_s", ",.1f"),
        ("tokens/s in training", "tokens_per_sec_during_training", ",.0f"),
        (f"final {metric}", f"final_{metric}", digits),
        (f"best {metric}", f"best_{metric}", digits),
        ("perplexity", "perplexity", ",.2f"),
        *((f"val_loss@{n}", key, digits) for key, (_, n) in _contexts(table)),
        ("KV B/token", "kv_bytes_per_token", ",.0f"),
        ("prefill tok/s", "prefill_tokens_per_sec", ",.0f"),
        ("decode tok/s", "decode_tokens_per_sec", ",.0f"),
        ("decode b8 tok/s", "decode_tokens_per_sec_b8", ",.0f"),
        ("train tok/s", "train_tokens_per_sec", ",.0f"),
        (f"Δ {metric} vs {a['baseline']}", "delta", "+" + digits),
    ]
    out = pd.DataFrame({"variant": table.variant})
    optional = ("kv_bytes_per_token", *BENCH_METRICS)  # runs without the benchmark (or from before it) lack them
    cols = [c for c in cols if c[1] not in optional or bool(table[c[1]].notna().any())]
    if "setting" in table:
        out["setting"] = table.setting.fillna("")
    for header, col, fmt in cols:
        ci = table.get(f"{col}_ci95") if multi else None
        out[header] = [_pm(m, c, fmt) for m, c in zip(table[col], ci if ci is not None else [None] * len(table), strict=True)]
    base = table.variant == a["baseline"]
    out.loc[base, cols[-1][0]] = "0 (baseline)"
    if multi:
        out["p"] = [_p(p) for p in table.p_value]
        out["p Holm"] = [_p(p) for p in table.p_adjusted]
        out["mdd"] = [_num(v, digits) for v in table.mdd]
    out["verdict"] = table.verdict
    return out


def _contexts(table: pd.DataFrame) -> list[tuple[str, tuple[str, int]]]:
    """The table's ``val_loss_ctxN`` columns with (metric, N), by N."""
    found = [(col, split) for col in table.columns if (split := split_context(col)) and split[0] == "val_loss"]
    return sorted(found, key=lambda item: item[1][1])


def summary_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The headline of :func:`display_frame`: variant, final metric, Δ to the baseline, p Holm (several seeds) and
    verdict. Five columns at most: what MLflow's table view (150 px a column) shows whole beside its file tree
    in a 1400 px window; the full table is in the report's Markdown and HTML."""
    a = table.attrs
    shown = display_frame(table)
    columns = ["variant", f"final {a['metric']}", f"Δ {a['metric']} vs {a['baseline']}", "p Holm", "verdict"]
    return shown.loc[:, [c for c in columns if c in shown.columns]]


def notes(table: pd.DataFrame) -> list[str]:
    """The lines that say how to read the table."""
    a = table.attrs
    lines = [
        f"Δ = final {a['metric']} minus the baseline's ({a['baseline']}); "
        f"{'lower' if a['lower_is_better'] else 'higher'} is better. "
        "Wall time: training, from the metric timestamps; tokens/s in training: tokens trained per second of training, "
        "evaluation excluded, with whatever else ran beside it."
    ]
    if table.get("decode_tokens_per_sec") is not None and table.decode_tokens_per_sec.notna().any():
        lines.append(
            "KV B/token: key/value cache bytes per token of context in the run's precision. prefill/decode/train tok/s: "
            "the final models (first seed) timed after training in interleaved rounds, median over rounds: a block_size "
            "prompt; greedy decoding with the KV cache near full, batch 1 and 8; one training step on the micro-batch."
        )
    if a.get("multi_seed"):
        lines.append(
            "mean ± half-width of the 95% confidence interval over seeds (Student t); Δ is paired over the seeds "
            "both variants ran; p: paired t-test of Δ = 0."
        )
    if m := a.get("comparisons"):
        lines += [
            f"Verdicts are Holm-corrected over the {m} comparison{'s' * (m != 1)} at {ALPHA:.0%} family-wise error: "
            f"better/worse when p Holm < {ALPHA}.",
            f"mdd: minimal detectable difference; differences smaller than mdd could go undetected at {POWER:.0%} power "
            f"(paired t-test at {ALPHA:.0%}/{m}, the strictest Holm level, with the observed spread of Δ), "
            "so 'no clear difference' does not rule them out.",
        ]
    lines += selection_note(a.get("selection", []), a.get("verdict_seeds", []))
    if a.get("note"):
        lines.append(a["note"])
    if a.get("excluded"):
        lines.append(f"Left out (not finished): {'; '.join(a['excluded'])}.")
    return lines
