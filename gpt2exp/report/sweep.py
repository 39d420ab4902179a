"""A sweep's runs in a comparison: each variant's setting is chosen on the first seed (the selection trials, lowest
final validation loss among the finished ones) and the verdict is made on its other seeds at that setting (the
verdict runs), so the selection does not bias the verdict."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pandas as pd

from gpt2exp.report.runs import Runs

SELECTION_METRIC = "val_loss"  # what the sweep's driver chooses on (gpt2exp.launch.tune.chosen)


def split_sweep(runs: Runs) -> tuple[Runs, list[dict[str, Any]]]:
    """The verdict runs at each variant's chosen setting, and the selection (one record per trial: variant, setting,
    seed, status ``finished``/``stopped early``/MLflow's, step reached, final val_loss, chosen). Not a sweep: as given."""
    frame = runs.frame
    if "phase" not in frame or not (frame.phase == "selection").any():
        return runs, []
    selection = []
    for r in frame.loc[frame.phase == "selection"].to_dict("records"):
        hist = runs.history(r["run_id"], SELECTION_METRIC)
        status = "finished" if r["status"] == "FINISHED" else "stopped early" if r["stopped_early"] else r["status"].lower()
        last = float(hist.value.iloc[-1]) if len(hist) else math.nan
        selection.append(
            dict(variant=r["variant"], setting=r["setting"], seed=r["seed"], status=status, step=_step(hist), val_loss=last)
        )
    best: dict[str, tuple[float, str]] = {}
    for s in selection:
        if (
            s["status"] == "finished"
            and not math.isnan(s["val_loss"])
            and s["val_loss"] < best.get(s["variant"], (math.inf, ""))[0]
        ):
            best[s["variant"]] = (s["val_loss"], s["setting"])
    for s in selection:
        s["chosen"] = best.get(s["variant"], (0, None))[1] == s["setting"]
    chosen = frame.variant.map({v: setting for v, (_, setting) in best.items()})
    keep = (frame.phase == "verdict") & (frame.setting == chosen)
    return replace(runs, frame=frame.loc[keep].reset_index(drop=True)), selection


def _step(hist: pd.DataFrame) -> int | None:
    return int(hist.step.iloc[-1]) if len(hist) else None


def chosen_settings(selection: list[dict[str, Any]]) -> dict[str, str]:
    """Variant -> its chosen setting."""
    return {s["variant"]: s["setting"] for s in selection if s["chosen"]}


def selection_note(selection: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    """The lines that say how the settings were chosen and what the verdict is over."""
    if not selection:
        return []
    first = selection[0]["seed"]
    verdict_seeds = ", ".join(str(s) for s in seeds) or "none"
    lines = [
        f"Each variant at its own best setting (column 'setting'), chosen on seed {first}'s final {SELECTION_METRIC}; "
        f"the comparison is over the other seeds ({verdict_seeds}) at that setting, so the selection does not bias it."
    ]
    by_variant: dict[str, list[str]] = {}
    for s in selection:
        value = "" if math.isnan(s["val_loss"]) else f" {s['val_loss']:.4f}"
        when = "before its first evaluation" if s["step"] is None else f"at step {s['step']}"
        how = " (chosen)" if s["chosen"] else "" if s["status"] == "finished" else f" ({s['status']} {when})"
        by_variant.setdefault(s["variant"], []).append(f"{s['setting']}{value}{how}")
    lines.append(
        f"Selection (seed {first}, {SELECTION_METRIC}): " + "; ".join(f"{v}: {', '.join(t)}" for v, t in by_variant.items()) + "."
    )
    return lines


def selection_markdown(selection: list[dict[str, Any]]) -> str:
    """The selection as a Markdown table: variant, setting, status, step, val_loss, chosen."""
    lines = ["| variant | setting | status | step | val_loss | chosen |", "|:---|:---|:---|---:|---:|:---|"]
    for s in selection:
        loss = "" if math.isnan(s["val_loss"]) else f"{s['val_loss']:.4f}"
        lines.append(
            f"| {s['variant']} | {s['setting']} | {s['status']} | {s['step'] or ''} | {loss} | {'✓' if s['chosen'] else ''} |"
        )
    return "\n".join(lines) + "\n"
