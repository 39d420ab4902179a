"""Compare the variants of an experiment from its MLflow runs.

One row per variant: size, tokens seen, wall time, throughput, final and best value of a metric,
perplexity and the difference to the baseline variant. With several seeds every figure is a mean
with its 95% confidence interval (Student t), and the difference to the baseline is paired over the
seeds both variants ran: paired t-test p-value, its Holm adjustment over all variants compared, the
minimal detectable difference (80% power) and a verdict, ``better`` / ``worse`` when the adjusted
p-value is below 5% (family-wise), else ``no clear difference`` (see :mod:`gpt2exp.report.stats`).
With one seed per variant no verdict is possible: the table says so and how to add seeds.

Everything comes from the MLflow store: the latest parent run of the experiment (or a given one),
its nested child runs (tags ``gpt2exp.variant`` / ``gpt2exp.seed``), their params and metric
histories. Wall time is measured on the metric timestamps (see :meth:`Runs.clock`), not on the
runs' start/end times: the driver creates every child run before the first one trains and ends
them all together, so those times span the whole experiment."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gpt2exp.errors import Gpt2expError
from gpt2exp.report.stats import ALPHA, POWER, holm, mdd, mean_ci, paired_p_value, verdict
from gpt2exp.tracking.store import check_store

FORMATS = ("table", "markdown", "csv", "json")
HIGHER_IS_BETTER = ("tokens_per_sec", "mfu", "tokens_seen", "accuracy")  # any other metric: lower is better
SEEDS_ADVICE = "Run at least 3 seeds: `train.seeds: [1, 2, 3]` in the spec, or `--set 'train.seeds=[1,2,3]'`."


class ReportError(Gpt2expError, ValueError):
    """A comparison that cannot be made: the message is one line, fit for the terminal."""


def lower_is_better(metric: str) -> bool:
    return not any(word in metric for word in HIGHER_IS_BETTER)


# ------------------------------------------------------------------------------------ loading
@dataclass
class Runs:
    """The child runs of one parent run, with cached metric histories."""

    client: MlflowClient
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_id: str
    frame: pd.DataFrame  # one row per child run, in creation order: run_id, run_name, variant, seed, status, ...
    variants: list[str]  # the spec's order (else order of first appearance)
    baseline: str | None  # the spec's ``baseline:`` (None: the first variant)
    _history: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict, repr=False)

    def history(self, run_id: str, key: str) -> pd.DataFrame:
        """``step, value, timestamp`` of one metric, one row per step (a step logged twice, by a
        checkpoint or a resumed attempt, keeps its last value)."""
        if (run_id, key) not in self._history:
            rows = [(m.step, m.value, m.timestamp) for m in self.client.get_metric_history(run_id, key)]
            df = pd.DataFrame(rows, columns=["step", "value", "timestamp"])
            df = df.sort_values(["step", "timestamp"], kind="stable").drop_duplicates("step", keep="last")
            self._history[(run_id, key)] = df.reset_index(drop=True)
        return self._history[(run_id, key)]

    def metrics(self) -> list[str]:
        """Metrics logged by at least one child run."""
        return sorted(set().union(*self.frame["metrics"])) if len(self.frame) else []

    def clock(self, run_id: str) -> tuple[float, float]:
        """(start, end) of a run's training in ms since the epoch, from its metric timestamps: the
        end is its last ``tokens_seen`` record; the start is the first record's time less the time
        its tokens took at the throughput it logged (the runs' own start times are when the driver
        created them, all before the first job trains). Falls back to the run's start/end time."""
        row = self.frame.loc[self.frame.run_id == run_id].iloc[0]
        tokens, tps = self.history(run_id, "tokens_seen"), self.history(run_id, "tokens_per_sec")
        if tokens.empty:
            return float(row.start_time), float(row.end_time if pd.notna(row.end_time) else row.start_time)
        first, end = tokens.iloc[0], float(tokens.timestamp.max())
        rate = tps.loc[tps.step == first.step, "value"]
        if len(rate) and rate.iloc[0] > 0:
            start = first.timestamp - 1000.0 * first.value / rate.iloc[0]
        elif len(tokens) > 1 and tokens.value.iloc[1] > first.value:  # extrapolate the first interval
            second = tokens.iloc[1]
            start = first.timestamp - (second.timestamp - first.timestamp) * first.value / (second.value - first.value)
        else:
            start = float(row.start_time)
        return max(float(start), float(row.start_time)), end

    def curve(self, run_id: str, key: str) -> pd.DataFrame:
        """One metric against ``step``, ``tokens`` (tokens seen) and ``elapsed_s`` (training time)."""
        df = self.history(run_id, key).copy()
        row = self.frame.loc[self.frame.run_id == run_id].iloc[0]
        seen = self.history(run_id, "tokens_seen").set_index("step")["value"]
        df["tokens"] = df.step.map(seen)
        if df.tokens.isna().any() and row.tokens_per_step:
            df["tokens"] = df.tokens.fillna(df.step * row.tokens_per_step)
        start, _ = self.clock(run_id)
        df["elapsed_s"] = (df.timestamp - start) / 1000.0
        return df


def _spec_of(client: MlflowClient, parent_id: str) -> tuple[list[str], str | None]:
    """Variant names (in the spec's order) and baseline from the parent run's ``spec.yaml``."""
    try:
        import yaml

        from gpt2exp.spec import validate_spec

        with tempfile.TemporaryDirectory() as tmp:
            raw = yaml.safe_load(Path(client.download_artifacts(parent_id, "spec.yaml", tmp)).read_text())
        spec = validate_spec(raw)
        return [v.name for v in spec.expand()], spec.baseline
    except Exception:  # no spec (a run not made by gpt2exp) or one this version cannot read: use the runs
        return [], None


def load_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> Runs:
    """The child runs of ``parent_run_id``, else of the experiment's latest parent run (by start time)."""
    check_store(tracking_uri, ReportError)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise ReportError(f"no experiment {experiment!r} in {tracking_uri}; known: {', '.join(known) or 'none'}")
    if parent_run_id is None:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        if not parents:
            raise ReportError(f"experiment {experiment!r} has no runs")
        parent_run_id = parents[0].info.run_id
    else:
        try:
            client.get_run(parent_run_id)
        except MlflowException:
            raise ReportError(f"no run {parent_run_id} in {tracking_uri}") from None
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=50000
    )
    if not children:
        raise ReportError(f"experiment {experiment!r}: parent run {parent_run_id} has no child runs")
    rows = []
    for r in children:
        tags, params = r.data.tags, r.data.params
        seed = tags.get("gpt2exp.seed", params.get("train.seed"))
        per_step = [params.get("train.batch_size"), params.get("model.block_size")]
        rows.append(
            dict(
                run_id=r.info.run_id,
                run_name=r.info.run_name,
                variant=tags.get("gpt2exp.variant") or r.info.run_name,
                seed=int(seed) if seed not in (None, "None") else None,
                status=r.info.status,
                start_time=r.info.start_time,
                end_time=r.info.end_time,
                params=float(params["n_params"]) if "n_params" in params else math.nan,
                tokens_per_step=math.prod(int(p) for p in per_step) if None not in per_step else None,
                baseline=params.get("baseline"),
                metrics=set(r.data.metrics),
            )
        )
    frame = pd.DataFrame(rows).sort_values(["start_time", "run_name"], kind="stable").reset_index(drop=True)
    order, baseline = _spec_of(client, parent_run_id)
    seen = list(dict.fromkeys(frame.variant))
    variants = [v for v in order if v in seen] + [v for v in seen if v not in order]
    if baseline is None:
        given = [b for b in frame.baseline.dropna() if b != "None"]
        baseline = given[0] if given else None
    return Runs(client, tracking_uri, experiment, exp.experiment_id, parent_run_id, frame, variants, baseline)


# ------------------------------------------------------------------------------------ the table
def _last(hist: pd.DataFrame) -> float:
    return float(hist.value.iloc[-1]) if len(hist) else math.nan


def per_run(runs: Runs, metric: str = "val_loss", finished_only: bool = True) -> pd.DataFrame:
    """One row per child run used in the comparison: variant, seed, params, tokens, wall_s,
    tokens_per_sec (final ``tokens_seen`` / final ``train_seconds``, the training loop's definition:
    evaluation and checkpoints excluded; NaN without ``train_seconds``), final/best ``metric``, perplexity."""
    lower = lower_is_better(metric)
    frame = runs.frame[runs.frame.status == "FINISHED"] if finished_only else runs.frame
    rows = []
    for r in frame.itertuples():
        hist = runs.history(r.run_id, metric)
        best = float(hist.value.min() if lower else hist.value.max()) if len(hist) else math.nan
        tokens, seconds = _last(runs.history(r.run_id, "tokens_seen")), _last(runs.history(r.run_id, "train_seconds"))
        val = _last(runs.history(r.run_id, "val_loss"))
        start, end = runs.clock(r.run_id)
        rows.append(
            {
                "variant": r.variant,
                "seed": r.seed,
                "run_id": r.run_id,
                "status": r.status,
                "params": r.params,
                "tokens": tokens,
                "wall_s": (end - start) / 1000.0,
                "tokens_per_sec": tokens / seconds if seconds > 0 else math.nan,
                f"final_{metric}": _last(hist),
                f"best_{metric}": best,
                "perplexity": math.exp(min(val, 700.0)),
            }
        )
    return pd.DataFrame(rows)


def comparison_table(
    runs: Runs, metric: str = "val_loss", baseline: str | None = None, finished_only: bool = True
) -> pd.DataFrame:
    """One row per variant (spec order). Columns: variant, n_seeds, params, tokens, wall_s,
    tokens_per_sec, final_<metric>, best_<metric>, perplexity, delta (final metric minus the
    baseline's: mean of the paired differences over shared seeds, else difference of means), with
    more than one seed ``<column>_ci95`` (half-width of the 95% t interval) after each measured column
    and ``delta_ci95`` (paired over shared seeds); then always ``n_paired``, ``p_value`` (paired t-test),
    ``p_adjusted`` (Holm over the variants compared), ``mdd`` (minimal detectable difference at 80% power
    and the strictest Holm level) and ``verdict`` (``too few seeds`` below 2 paired seeds).

    ``df.attrs`` holds experiment, parent_run_id, metric, baseline, lower_is_better, multi_seed,
    ``comparisons`` (variants with a p-value), ``note`` (why there is no verdict and how to add seeds,
    else None) and ``excluded`` (unfinished runs left out, as ``variant/seed=N: STATUS``)."""
    available = runs.metrics()
    if metric not in available:
        shown = [m for m in available if not m.startswith("system/")]
        raise ReportError(f"no run logged metric {metric!r}; available: {', '.join(shown) or 'none'}")
    excluded = [f"{r.variant}/seed={r.seed}: {r.status}" for r in runs.frame.itertuples() if r.status != "FINISHED"]
    per = per_run(runs, metric, finished_only)
    if per.empty:
        raise ReportError(
            f"experiment {runs.experiment!r}: no finished runs ({'; '.join(excluded)}); --include-unfinished to compare them anyway"
        )
    per = per[per[f"final_{metric}"].notna()]
    if per.empty:
        raise ReportError(f"experiment {runs.experiment!r}: no finished run logged {metric!r}")
    variants = [v for v in runs.variants if v in set(per.variant)]
    baseline = baseline or runs.baseline or variants[0]
    if baseline not in variants:
        raise ReportError(f"baseline {baseline!r} is not a variant with results; variants: {', '.join(variants)}")
    lower = lower_is_better(metric)
    multi = bool(per.groupby("variant").size().max() > 1)
    final = f"final_{metric}"
    base = per[per.variant == baseline].set_index("seed")[final]
    measured = ["params", "tokens", "wall_s", "tokens_per_sec", final, f"best_{metric}", "perplexity"]
    rows, diffs = [], []
    for name in variants:
        group = per[per.variant == name]
        row: dict[str, Any] = {"variant": name, "n_seeds": len(group)}
        for col in measured:
            mean, ci, _ = mean_ci(group[col])
            row[col] = mean
            if multi and col not in ("params", "tokens"):  # the same for every seed
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
    table["p_value"] = np.where(compared, [paired_p_value(d) for d in diffs], math.nan)
    table["p_adjusted"] = holm(table.p_value)  # the baseline's NaN is left out of the family
    m = int(table.p_value.notna().sum())
    level = ALPHA / max(m, 1)  # the strictest Holm level: detectable even as the family's smallest p
    table["mdd"] = [
        mdd(d.std(ddof=1) if len(d) > 1 else math.nan, len(d), level) if c else math.nan
        for d, c in zip(diffs, compared, strict=True)
    ]
    table["verdict"] = [
        verdict(r.delta, r.p_adjusted, r.n_paired, lower) if c else "baseline"
        for r, c in zip(table.itertuples(), compared, strict=True)
    ]
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
    )
    return table


# ------------------------------------------------------------------------------------ formats
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
        ("tokens/s", "tokens_per_sec", ",.0f"),
        (f"final {metric}", f"final_{metric}", digits),
        (f"best {metric}", f"best_{metric}", digits),
        ("perplexity", "perplexity", ",.2f"),
        (f"Δ {metric} vs {a['baseline']}", "delta", "+" + digits),
    ]
    out = pd.DataFrame({"variant": table.variant})
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


def notes(table: pd.DataFrame) -> list[str]:
    """The lines that say how to read the table."""
    a = table.attrs
    lines = [
        f"Δ = final {a['metric']} minus the baseline's ({a['baseline']}); "
        f"{'lower' if a['lower_is_better'] else 'higher'} is better. "
        "Wall time: training, from the metric timestamps; tokens/s: tokens trained per second of training, evaluation excluded."
    ]
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
    if a.get("note"):
        lines.append(a["note"])
    if a.get("excluded"):
        lines.append(f"Left out (not finished): {'; '.join(a['excluded'])}.")
    return lines


def _right(col: str) -> bool:
    return col not in ("variant", "verdict")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``)."""
    shown = display_frame(table)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(c) for c in shown.columns) + " |"]
    lines.append("|" + "|".join("---:" if _right(c) else ":---" for c in shown.columns) + "|")
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: numpy numbers as Python ones (exact repr), NaN as None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def to_json(table: pd.DataFrame) -> str:
    """``{"experiment", "parent_run_id", "metric", "baseline", "lower_is_better", "note", "rows": [...],
    "excluded"}``: full precision, NaN as null; ``note`` says why there is no verdict (null when there are)."""
    keys = ("experiment", "parent_run_id", "metric", "baseline", "lower_is_better", "note")
    meta = {k: table.attrs.get(k) for k in keys}
    rows = [{k: _plain(v) for k, v in rec.items()} for rec in table.to_dict("records")]
    return json.dumps({**meta, "rows": rows, "excluded": table.attrs.get("excluded", [])}, indent=1) + "\n"


def render(table: pd.DataFrame, fmt: str) -> str:
    """The table as ``markdown``, ``csv`` or ``json`` text (``table``: see :func:`rich_table`)."""
    if fmt == "markdown":
        return to_markdown(table) + "\n" + "\n".join(f"- {n}" for n in notes(table)) + "\n"
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return to_json(table)
    raise ReportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def rich_table(table: pd.DataFrame):
    """The table for the terminal (a ``rich.table.Table``); print :func:`notes` under it."""
    from rich.table import Table

    a = table.attrs
    shown = display_frame(table)
    out = Table(title=f"{a['experiment']}: {a['metric']} by variant (parent run {a['parent_run_id'][:8]})")
    for col in shown.columns:
        out.add_column(col, justify="right" if _right(col) else "left", no_wrap=col == "variant")
    style = {"better": "green", "worse": "red", "baseline": "dim"}
    for row in shown.itertuples(index=False):
        *cells, v = row
        out.add_row(*cells, f"[{style[v]}]{v}[/]" if v in style else v)
    return out


# ------------------------------------------------------------------------------------ the report
def to_html(table: pd.DataFrame, image: Path | None = None) -> str:
    """A standalone page: title, table, notes and the plot (embedded, so it shows in the MLflow UI)."""
    a = table.attrs
    shown = display_frame(table)
    head = "".join(f"<th class='{'r' if _right(c) else 'l'}'>{html.escape(c)}</th>" for c in shown.columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='{'r' if _right(c) else 'l'} {str(v).replace(' ', '-') if c == 'verdict' else ''}'>{html.escape(str(v))}</td>"
            for c, v in zip(shown.columns, row, strict=True)
        )
        + "</tr>"
        for row in shown.itertuples(index=False)
    )
    img = ""
    if image is not None and image.is_file():
        data = base64.b64encode(image.read_bytes()).decode()
        img = f"<img alt='{html.escape(a['metric'])} curves' src='data:image/png;base64,{data}'>"
    title = html.escape(f"{a['experiment']}: comparison of variants")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 0.35em 0.8em; border-bottom: 1px solid #ddd; white-space: nowrap; }}
th {{ background: #f4f4f4; }} .r {{ text-align: right; }} .l {{ text-align: left; }}
.better {{ color: #17803d; font-weight: 600; }} .worse {{ color: #b42318; font-weight: 600; }}
.meta, li {{ color: #555; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">metric {html.escape(a["metric"])} · baseline {html.escape(a["baseline"])} · parent run
<code>{html.escape(a["parent_run_id"])}</code> · {html.escape(a["tracking_uri"])} · {datetime.now():%Y-%m-%d %H:%M}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes(table))}</ul>
{img}
</body></html>
"""


def write_report(runs: Runs, table: pd.DataFrame, out_dir: str | Path, log: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``<metric>.png`` of ``table`` under ``out_dir/report`` and
    (``log``) log them on the parent run under ``report/``. Returns ``{"markdown", "html", "plot"}`` paths."""
    paths = report_files(runs, Path(out_dir) / "report", table)
    if log:
        for path in paths.values():
            runs.client.log_artifact(runs.parent_id, str(path), "report")
    return paths


def print_table(console: Any, table: pd.DataFrame) -> None:
    """The table and the notes that say how to read it, on a ``rich`` console."""
    console.print(rich_table(table))
    for line in notes(table):
        console.print(line, style="dim", highlight=False, markup=False)


def report_files(runs: Runs, folder: Path, table: pd.DataFrame) -> dict[str, Path]:
    """``report.md``, ``report.html`` and ``<metric>.png`` in ``folder``: the comparison ``table`` of ``runs``
    and their curves."""
    from gpt2exp.report.plots import plot_curves

    metric = table.attrs["metric"]
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{metric.replace('/', '_')}.png"
    plot_curves(runs, metric, png, variants=list(table.variant), table=table)
    md = folder / "report.md"
    md.write_text(
        f"# {runs.experiment}: comparison of variants\n\n"
        f"Parent run `{runs.parent_id}` · metric `{metric}` · baseline `{table.attrs['baseline']}`\n\n"
        f"{render(table, 'markdown')}\n![{metric} curves]({png.name})\n"
    )
    page = folder / "report.html"
    page.write_text(to_html(table, png))
    return {"markdown": md, "html": page, "plot": png}


def combine_runs(parts: dict[str, Runs]) -> Runs:
    """Several experiments' runs as one, each variant named ``<label>/<variant>`` (one part: unchanged);
    the baseline is the first part's."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    first = next(iter(parts.values()))
    frames, variants, history = [], [], {}
    for label, runs in parts.items():
        frames.append(runs.frame.assign(variant=[f"{label}/{v}" for v in runs.frame.variant]))
        variants += [f"{label}/{v}" for v in runs.variants]
        history |= runs._history
    label = next(iter(parts))
    baseline = f"{label}/{first.baseline or first.variants[0]}"
    experiment = " + ".join(r.experiment for r in parts.values())
    frame = pd.concat(frames, ignore_index=True)
    return Runs(
        first.client, first.tracking_uri, experiment, first.experiment_id, first.parent_id, frame, variants, baseline, history
    )


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


def default_tracking_uri(output: str | Path) -> str:
    """Where ``gpt2exp run --output DIR`` records by default: MLFLOW_TRACKING_URI, else DIR/mlflow.db."""
    from gpt2exp.tracking.runs import store_uri

    return store_uri(output)
