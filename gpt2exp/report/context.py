"""The report's long-context figures (``eval.contexts``): final validation loss against context length (log2 axis)
and loss by position in a window of the longest context, one line per variant (mean over seeds), each variant's
trained block_size marked. The loss by position shows the variants scored at the experiment's longest context
(the same windows); one with a shorter longest context (learned positions) scored other windows and is left out.
Nothing is drawn for runs without long-context metrics.

Drawn like :mod:`gpt2exp.report.plots`: matplotlib's object API on an Agg canvas."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, ScalarFormatter

from gpt2exp.report.plots import variant_curves
from gpt2exp.report.runs import Runs, context_keys

BY_POSITION = "val_loss_by_position"  # step: the first position of a bucket (gpt2exp.training.evaluate.ContextEval)


def context_losses(runs: Runs, variants: list[str], finished_only: bool = True) -> pd.DataFrame:
    """``variant, context, value``: each variant's final ``val_loss@N`` at each context, mean over seeds."""
    frame = runs.frame.loc[runs.frame.status == "FINISHED"] if finished_only else runs.frame
    rows = [
        (r["variant"], n, float(hist.value.iloc[-1]))
        for r in frame.to_dict("records")
        for n, key in context_keys(runs)
        if len(hist := runs.history(r["run_id"], key))
    ]
    losses = pd.DataFrame(rows, columns=["variant", "context", "value"])
    return losses.loc[losses.variant.isin(variants)].groupby(["variant", "context"], sort=False).value.mean().reset_index()


def block_sizes(runs: Runs) -> dict[str, int]:
    """Each variant's trained block_size (its first run's ``model.block_size`` param)."""
    out: dict[str, int] = {}
    for r in runs.frame.to_dict("records"):
        if r["variant"] not in out and (block := runs.client.get_run(r["run_id"]).data.params.get("model.block_size")):
            out[r["variant"]] = int(block)
    return out


def _mark_blocks(ax: Axes, blocks: set[int]) -> None:
    for block in sorted(blocks):
        ax.axvline(block, color="grey", ls=":", lw=1.2)
        ax.annotate(f"trained block_size {block}", (block, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="grey")  # fmt: skip


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.5, 4.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_context_figures(runs: Runs, folder: Path, variants: list[str], finished_only: bool = True) -> dict[str, Path]:
    """``loss_by_context.png`` and ``loss_by_position.png`` in ``folder``, when the runs logged long-context metrics:
    ``{"context": path, "position": path}``, else ``{}``."""
    losses = context_losses(runs, variants, finished_only)
    if losses.empty:
        return {}
    blocks = block_sizes(runs)
    folder.mkdir(parents=True, exist_ok=True)
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, ax = _figure()
    for name, mine in losses.groupby("variant", sort=False):
        mine = mine.sort_values("context")
        ax.plot(mine.context, mine.value, color=colors[str(name)], lw=2, marker="o", ms=4, label=str(name))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(losses.context))))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    _mark_blocks(ax, {blocks[v] for v in set(losses.variant) if v in blocks})
    ax.set(xlabel="context (tokens; each scored token sees N/2+1 to N)", ylabel="final val loss")
    ax.set_title(f"{runs.experiment}: validation loss by context length", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    paths = {"context": folder / "loss_by_context.png"}
    fig.savefig(paths["context"])

    curves = variant_curves(runs, BY_POSITION, finished_only)
    curves = curves.loc[curves.variant.isin(variants)]
    reach = curves.groupby("variant").step.max()  # a variant with a shorter longest context scored other windows: left out
    curves = curves.loc[curves.variant.isin(reach.index[reach == reach.max()])]
    if curves.empty:
        return paths
    fig, ax = _figure()
    width = curves.groupby("variant").step.apply(lambda s: s.sort_values().diff().min()).fillna(1)  # bucket width per variant
    for name, mine in curves.groupby("variant", sort=False):
        mean = mine.groupby("step").value.mean()
        ax.plot(mean.index + width[name] / 2, mean.values, color=colors[str(name)], lw=1.8, label=str(name))
    _mark_blocks(ax, {blocks[v] for v in set(curves.variant) if v in blocks})
    ax.set(xlabel="position in the window (bucket centre)", ylabel="val loss")
    longest = int(curves.step.max() + width.max())
    ax.set_title(f"{runs.experiment}: validation loss by position, windows of {longest} tokens", fontsize=11)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    paths["position"] = folder / "loss_by_position.png"
    fig.savefig(paths["position"])
    return paths
