"""The report's figure: a metric against tokens seen and against training time, one line per
variant (mean over seeds, shaded min–max band with several seeds), train loss faint and dashed;
with a comparison table, a third panel shows each variant's difference to the baseline with its 95%
interval, coloured by the corrected verdict, and a fourth the final metric against decoding cost
(ms per token from the speed benchmark, else KV-cache bytes per token): the trade-off GQA/MQA make.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend change."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from gpt2exp.report.runs import Runs


def variant_curves(runs: Runs, metric: str, finished_only: bool = True) -> pd.DataFrame:
    """``variant, seed, step, value, tokens, elapsed_s``: every logged point of ``metric``."""
    frame = runs.frame.loc[runs.frame.status == "FINISHED"] if finished_only else runs.frame
    parts = [runs.curve(r["run_id"], metric).assign(variant=r["variant"], seed=r["seed"]) for r in frame.to_dict("records")]
    parts = [p for p in parts if not p.empty]
    columns = ["variant", "seed", "step", "value", "tokens", "elapsed_s"]
    return pd.concat(parts, ignore_index=True).loc[:, columns] if parts else pd.DataFrame(columns=columns)


def _mean_by_step(curves: pd.DataFrame) -> pd.DataFrame:
    """Per step: mean x (tokens, elapsed), mean/min/max value and how many seeds reached it."""
    return (
        curves.groupby("step")
        .agg(
            tokens=("tokens", "mean"),
            elapsed_s=("elapsed_s", "mean"),
            mean=("value", "mean"),
            lo=("value", "min"),
            hi=("value", "max"),
            n=("value", "size"),
        )
        .reset_index()
    )


def plot_curves(
    runs: Runs,
    metric: str,
    path: str | Path,
    variants: list[str] | None = None,
    train_loss: bool = True,
    finished_only: bool = True,
    table: pd.DataFrame | None = None,
) -> Path:
    """Write the PNG to ``path``: metric vs tokens seen, metric vs training seconds and, given the
    comparison ``table``, the differences to the baseline (:func:`plot_deltas`)."""
    path = Path(path)
    curves = variant_curves(runs, metric, finished_only)
    train = variant_curves(runs, "train_loss", finished_only) if train_loss and metric == "val_loss" else None
    variants = [v for v in (variants or runs.variants) if v in set(curves.variant)]

    ratios = [1, 1] + ([0.75] if table is not None else []) + ([0.9] if table is not None and cost_axis(table) else [])
    fig = Figure(figsize=(6 * sum(ratios) + 0.5, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ratios), width_ratios=ratios)
    by_tokens, by_time = axes[0], axes[1]
    by_time.sharey(by_tokens)
    if table is not None:
        plot_deltas(axes[2], table)
    if table is not None and len(ratios) == 4:
        plot_cost(axes[3], table)
    colors = [f"C{i % 10}" for i in range(len(variants))]
    lows, highs = [], []
    for name, color in zip(variants, colors, strict=True):
        mine = curves.loc[curves.variant == name]
        agg = _mean_by_step(mine)
        seeds = mine.seed.nunique()
        label = f"{name} ({seeds} seeds)" if seeds > 1 else name
        lows.append(agg.lo.min())
        highs.append(agg.hi.max())
        for ax, x in ((by_tokens, "tokens"), (by_time, "elapsed_s")):
            ax.plot(agg[x], agg["mean"], color=color, lw=2, marker="o", ms=3.5, label=label)
            if seeds > 1:
                ax.fill_between(agg[x], agg.lo, agg.hi, color=color, alpha=0.18, lw=0)
            if train is not None and not train.empty:
                t = _mean_by_step(train.loc[train.variant == name])
                ax.plot(t[x], t["mean"], color=color, lw=1, ls="--", alpha=0.45)

    label = metric.replace("_", " ")
    by_tokens.set_xlabel("tokens seen")
    by_tokens.xaxis.set_major_formatter(EngFormatter(sep=""))
    by_tokens.set_ylabel(label)
    by_time.set_xlabel("training time (s)")
    for ax in (by_tokens, by_time):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    if lows and highs:  # frame the metric; early train-loss values may fall outside
        low, high = min(lows), max(highs)
        pad = 0.06 * (high - low or abs(high) or 1.0)
        by_tokens.set_ylim(low - pad, high + pad)
    handles, labels = by_tokens.get_legend_handles_labels()
    if train is not None and not train.empty:
        handles.append(Line2D([], [], color="grey", lw=1, ls="--", alpha=0.6))
        labels.append("train loss (dashed)")
    by_time.legend(handles, labels, loc="upper right", frameon=True, fontsize=9)
    counts = curves[curves.variant.isin(variants)].groupby("variant").seed.nunique()
    fewest, most = (int(counts.min()), int(counts.max())) if len(counts) else (1, 1)
    n = fewest if fewest == most else f"{fewest}–{most}"
    seeds = f" (mean over {n} seeds · band: min–max over seeds)" if most > 1 else ""
    fig.suptitle(f"{runs.experiment}: {label} by variant{seeds}", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


VERDICT_COLORS = {"better": "#17803d", "worse": "#b42318"}


def plot_deltas(ax, table: pd.DataFrame) -> None:
    """Each variant's final metric minus the baseline's (paired mean over seeds) with its 95% interval,
    green/red when the Holm-corrected verdict is better/worse, grey otherwise; p Holm beside it."""
    a = table.attrs
    rows = table[table.variant != a["baseline"]].iloc[::-1]  # the spec's order, top to bottom
    y = list(range(len(rows)))
    ci = rows["delta_ci95"] if "delta_ci95" in rows else pd.Series(float("nan"), index=rows.index)
    for yi, r, half in zip(y, rows.itertuples(), ci, strict=True):
        color = VERDICT_COLORS.get(r.verdict, "grey")
        ax.errorbar(r.delta, yi, xerr=None if pd.isna(half) else half, fmt="o", color=color, capsize=4, ms=6)
        note = r.verdict if pd.isna(r.p_adjusted) else f"{r.verdict} (p Holm {r.p_adjusted:.2g})"
        ax.annotate(note, (r.delta, yi), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8, color=color)
    ax.axvline(0.0, color="black", lw=1)
    ax.set_yticks(y, list(rows.variant), fontsize=9)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"Δ final {a['metric'].replace('_', ' ')} vs {a['baseline']}")
    ax.grid(True, axis="x", alpha=0.3)
    better = "lower" if a["lower_is_better"] else "higher"
    ax.set_title(
        "no verdict: fewer than 2 paired seeds" if a.get("note") else f"paired over seeds, 95% CI ({better} is better)",
        fontsize=10,
    )


def cost_axis(table: pd.DataFrame) -> tuple[str, str] | None:
    """(column, axis label) of the decoding cost the table has: ms/token measured at batch 1, else KV bytes/token."""
    if "decode_tokens_per_sec" in table and table.decode_tokens_per_sec.notna().any():
        return "decode_ms_per_token", "decode ms/token (batch 1, KV cache near full)"
    if "kv_bytes_per_token" in table and table.kv_bytes_per_token.notna().any():
        return "kv_bytes_per_token", "KV-cache bytes per token"
    return None


def plot_cost(ax, table: pd.DataFrame) -> None:
    """Final metric (mean ± 95% CI over seeds) against decoding cost, one point per variant: down and left is better."""
    axis = cost_axis(table)
    assert axis is not None
    column, xlabel = axis
    metric = table.attrs["metric"]
    x = 1000.0 / table.decode_tokens_per_sec if column == "decode_ms_per_token" else table[column]
    ci = table.get(f"final_{metric}_ci95")
    for i, (xi, r) in enumerate(zip(x, table.to_dict("records"), strict=True)):
        y, half = r[f"final_{metric}"], None if ci is None or pd.isna(ci.iloc[i]) else ci.iloc[i]
        ax.errorbar(xi, y, yerr=half, fmt="o", color=f"C{i % 10}", capsize=4, ms=6)  # the variant's colour in the curves
        ax.annotate(r["variant"], (xi, y), xytext=(5, 5), textcoords="offset points", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"final {metric.replace('_', ' ')}")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, alpha=0.3)
    ax.set_title("quality against decoding cost (95% CI over seeds)", fontsize=10)
