"""The runs a comparison reads: the child runs of one parent run in MLflow, with their params, tags
and cached metric histories, and the per-run figures (final and best metric, tokens, training time).

Everything comes from the MLflow store: the latest parent run of the experiment (or a given one),
its nested child runs (tags ``gpt2exp.variant`` / ``gpt2exp.seed`` / ``gpt2exp.variant_index``), their
params and metric histories. Wall time is measured on the metric timestamps (see :meth:`Runs.clock`),
not on the runs' start/end times: the driver creates every child run before the first one trains and
ends them all together, so those times span the whole experiment."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gpt2exp.errors import Gpt2expError
from gpt2exp.spec.sections import split_context
from gpt2exp.tracking.runs import PHASE, ROLE, SETTING, STOPPED_EARLY, VARIANT_INDEX, store_uri
from gpt2exp.tracking.store import check_store
from gpt2exp.training.job import BENCH_METRICS

HIGHER_IS_BETTER = ("tokens_per_sec", "mfu", "tokens_seen", "accuracy")  # any other metric: lower is better


class ReportError(Gpt2expError, ValueError):
    """A comparison that cannot be made: the message is one line, fit for the terminal."""


def lower_is_better(metric: str) -> bool:
    return not any(word in metric for word in HIGHER_IS_BETTER)


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
        tokens, tps = self.history(run_id, "tokens_seen"), self.history(run_id, "tokens_per_sec_during_training")
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


def variant_order(variants: list[str], index: dict[str, int]) -> list[str]:
    """``variants`` (in order of first appearance) sorted by their place in the spec (the child runs' tag
    ``gpt2exp.variant_index``); variants without one (runs made by hand or by an older gpt2exp) follow, as they came."""
    return sorted(variants, key=lambda v: (v not in index, index.get(v, 0)))


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
    if groups := [r.info.run_id for r in children if r.data.tags.get(ROLE) == "variant"]:  # a sweep: trials in variant runs
        children = [
            trial
            for group in groups
            for trial in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{group}'", max_results=50000)
        ]
    rows, index = [], {}
    for r in children:
        tags, params = r.data.tags, r.data.params
        seed = tags.get("gpt2exp.seed", params.get("train.seed"))
        batch, block = params.get("train.batch_size"), params.get("model.block_size")
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
                kv_bytes_per_token=float(params.get("kv_bytes_per_token", math.nan)),
                tokens_per_step=int(batch) * int(block) if batch is not None and block is not None else None,
                baseline=params.get("baseline"),
                metrics=set(r.data.metrics),
                setting=tags.get(SETTING),
                phase=tags.get(PHASE),
                stopped_early=tags.get(STOPPED_EARLY) == "true",
            )
        )
        if (place := tags.get(VARIANT_INDEX, "")).isdigit():
            index.setdefault(rows[-1]["variant"], int(place))
    frame = pd.DataFrame(rows).sort_values(["start_time", "run_name"], kind="stable").reset_index(drop=True)
    variants = variant_order(list(dict.fromkeys(frame.variant)), index)
    given = [b for b in frame.baseline.dropna() if b != "None"]  # the spec's ``baseline:``, a param of every child run
    baseline = given[0] if given else None
    return Runs(client, tracking_uri, experiment, exp.experiment_id, parent_run_id, frame, variants, baseline)


def context_keys(runs: Runs, metric: str = "val_loss") -> list[tuple[int, str]]:
    """(N, key) of each ``metric`` at context N (``eval.contexts``) some child run logged, by N: [(512, "val_loss_ctx512")]."""
    found = [(split, key) for key in runs.metrics() if (split := split_context(key))]
    return sorted((n, key) for (name, n), key in found if name == metric)


def _last(hist: pd.DataFrame) -> float:
    return float(hist.value.iloc[-1]) if len(hist) else math.nan


def per_run(runs: Runs, metric: str = "val_loss", finished_only: bool = True) -> pd.DataFrame:
    """One row per child run used in the comparison: variant, seed, params, tokens, wall_s,
    tokens_per_sec_during_training (final ``tokens_seen`` / final ``train_seconds``, the training loop's
    definition: evaluation and checkpoints excluded; NaN without ``train_seconds``), final/best ``metric``,
    perplexity, kv_bytes_per_token, the speed benchmark's figures (``BENCH_METRICS``: NaN on the runs not
    measured) and, where logged, the final ``val_loss_ctxN`` (``eval.contexts``)."""
    lower = lower_is_better(metric)
    frame = runs.frame.loc[runs.frame.status == "FINISHED"] if finished_only else runs.frame
    rows = []
    for r in frame.to_dict("records"):
        run_id = r["run_id"]
        hist = runs.history(run_id, metric)
        best = float(hist.value.min() if lower else hist.value.max()) if len(hist) else math.nan
        tokens, seconds = _last(runs.history(run_id, "tokens_seen")), _last(runs.history(run_id, "train_seconds"))
        val = _last(runs.history(run_id, "val_loss"))
        start, end = runs.clock(run_id)
        rows.append(
            {
                "variant": r["variant"],
                "seed": r["seed"],
                "run_id": run_id,
                "status": r["status"],
                "params": r["params"],
                "tokens": tokens,
                "wall_s": (end - start) / 1000.0,
                "tokens_per_sec_during_training": tokens / seconds if seconds > 0 else math.nan,
                f"final_{metric}": _last(hist),
                f"best_{metric}": best,
                "perplexity": math.exp(min(val, 700.0)),
                "kv_bytes_per_token": r["kv_bytes_per_token"],
                **{k: _last(runs.history(run_id, k)) for k in BENCH_METRICS},
                **{key: _last(runs.history(run_id, key)) for _, key in context_keys(runs)},  # val_loss at eval.contexts
            }
        )
    return pd.DataFrame(rows)


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


def default_tracking_uri(output: str | Path) -> str:
    """Where ``gpt2exp run --output DIR`` records by default: MLFLOW_TRACKING_URI, else DIR/mlflow.db."""
    return store_uri(output)
