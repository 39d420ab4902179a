"""``gpt2exp.report``: the comparison table, its formats and the report, against a real MLflow store
filled by a tiny real experiment (two variants x three seeds) and one logged by hand (five variants,
known differences); expected numbers are recomputed here from MlflowClient, numpy and scipy."""

from __future__ import annotations

import html
import io
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from rich.console import Console
from scipy import stats

from gpt2exp.launch.plan import make_plan
from gpt2exp.launch.runner import run_plan
from gpt2exp.launch.status import read_status
from gpt2exp.report import ReportError, comparison_table, load_runs, per_run, render, rich_table, write_report
from gpt2exp.report.render import to_html
from gpt2exp.report.stats import holm, mdd
from gpt2exp.report.table import notes, summary_frame
from gpt2exp.report.write import headline_metrics, metric_names
from gpt2exp.spec import validate_spec
from gpt2exp.tracking.runs import VARIANT_INDEX, tracking_uri, using

T_975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # Student t, 97.5% quantile, 2 degrees of freedom (closed form)
SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def experiment(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the tiny experiment once; return its store URI, parent run id, plan and client."""
    tmp = tmp_path_factory.mktemp("cmp")
    corpus = tmp / "corpus.txt"
    corpus.write_bytes(corpus_path.read_bytes()[:200_000])
    raw = {
        "name": "cmp",
        "data": {"path": str(corpus), "cache_dir": str(tmp / "tokens")},
        "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {
            "max_steps": 8,
            "batch_size": 4,
            "lr": 2e-2,
            "eval_interval": 4,
            "eval_tokens": 512,
            "log_interval": 2,
            "seeds": SEEDS,
        },
        "variants": [{"name": "mha", "set": {}}, {"name": "mqa", "set": {"model.n_kv_head": 1}}],
        "tracking": {"system_metrics": False},
    }
    spec = validate_spec(raw)
    out = tmp / "out"
    plan = make_plan(spec, out, show_progress=False)
    console = Console(record=True, width=250)
    results = run_plan(plan, "local", console, show_progress=False).runs
    assert set(results.status) == {"completed"}, results
    uri = tracking_uri(spec, out)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return {
        "uri": uri,
        "parent": parents[0].info.run_id,
        "plan": plan,
        "client": client,
        "children": children,
        "tmp": tmp,
        "printed": console.export_text(),
    }


def test_run_prints_its_runs_then_the_verdicts(experiment: dict) -> None:
    """What `gpt2exp run` ends with: the table of runs, then the comparison with corrected verdicts."""
    printed = experiment["printed"]
    runs, comparison = printed.index("runs"), printed.index("val_loss by variant")
    assert runs < comparison < printed.index("Holm-corrected") < printed.index("report: ")
    assert (
        "p Holm" in printed
        and "mdd" in printed
        and ("no clear difference" in printed or "better" in printed or "worse" in printed)
    )


def expected_finals(experiment: dict, metric: str = "val_loss") -> dict[str, dict[int, tuple[float, float]]]:
    """variant -> seed -> (final, best) straight from get_metric_history: final = value at the last step."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for run in experiment["children"]:
        history = experiment["client"].get_metric_history(run.info.run_id, metric)
        last = max(history, key=lambda m: (m.step, m.timestamp))
        out.setdefault(run.data.tags["gpt2exp.variant"], {})[int(run.data.tags["gpt2exp.seed"])] = (
            last.value,
            min(m.value for m in history),
        )
    return out


@pytest.fixture(scope="module")
def table(experiment: dict) -> pd.DataFrame:
    return comparison_table(load_runs(experiment["uri"], "cmp"))


def test_one_row_per_variant_in_spec_order(experiment: dict, table: pd.DataFrame) -> None:
    assert list(table.variant) == ["mha", "mqa"]
    assert list(table.n_seeds) == [3, 3]
    params = {r.data.tags["gpt2exp.variant"]: int(r.data.params["n_params"]) for r in experiment["children"]}
    assert list(table.params) == [params["mha"], params["mqa"]] and params["mha"] > params["mqa"]
    assert list(table.tokens) == [8 * 4 * 32] * 2  # steps x batch x block
    assert table.attrs["parent_run_id"] == experiment["parent"] and table.attrs["baseline"] == "mha"


def test_final_and_best_are_the_metric_history_values(experiment: dict, table: pd.DataFrame) -> None:
    expected = expected_finals(experiment)
    runs = per_run(load_runs(experiment["uri"], "cmp"))
    for r in runs.itertuples():
        assert (r.final_val_loss, r.best_val_loss) == expected[r.variant][r.seed]
        assert r.perplexity == pytest.approx(math.exp(expected[r.variant][r.seed][0]), rel=1e-12)
    for row in table.itertuples():
        finals = [expected[row.variant][s][0] for s in SEEDS]
        bests = [expected[row.variant][s][1] for s in SEEDS]
        assert row.final_val_loss == pytest.approx(np.mean(finals), rel=1e-12)
        assert row.best_val_loss == pytest.approx(np.mean(bests), rel=1e-12)
        assert row.best_val_loss <= row.final_val_loss + 1e-12


def test_other_metric_and_best_direction(experiment: dict) -> None:
    """train_loss: lower is better (min); tokens_per_sec_during_training: higher is better (max)."""
    runs = load_runs(experiment["uri"], "cmp")
    train = comparison_table(runs, "train_loss")
    exp_train = expected_finals(experiment, "train_loss")
    assert train.best_train_loss[0] == pytest.approx(np.mean([exp_train["mha"][s][1] for s in SEEDS]), rel=1e-12)
    tps = per_run(runs, "tokens_per_sec_during_training")
    for r in tps.itertuples():
        history = experiment["client"].get_metric_history(r.run_id, "tokens_per_sec_during_training")
        assert r.best_tokens_per_sec_during_training == max(m.value for m in history)


def test_mean_ci_and_paired_difference_arithmetic(experiment: dict, table: pd.DataFrame) -> None:
    expected = expected_finals(experiment)
    for row in table.itertuples():
        finals = [expected[row.variant][s][0] for s in SEEDS]
        ci = T_975_DF2 * statistics.stdev(finals) / math.sqrt(3)
        assert row.final_val_loss_ci95 == pytest.approx(ci, rel=1e-9)
        assert row.final_val_loss_ci95 == pytest.approx(T_975_DF2 * np.std(finals, ddof=1) / np.sqrt(3), rel=1e-9)
    diffs = np.array([expected["mqa"][s][0] - expected["mha"][s][0] for s in SEEDS])
    mqa = table.set_index("variant").loc["mqa"]
    assert mqa.delta == pytest.approx(diffs.mean(), rel=1e-9, abs=1e-12)
    half = T_975_DF2 * diffs.std(ddof=1) / np.sqrt(3)
    assert mqa.delta_ci95 == pytest.approx(half, rel=1e-9)
    assert mqa.n_paired == 3
    p = stats.ttest_rel([expected["mqa"][s][0] for s in SEEDS], [expected["mha"][s][0] for s in SEEDS]).pvalue
    assert mqa.p_value == pytest.approx(p, rel=1e-9) and mqa.p_adjusted == mqa.p_value  # one comparison: Holm is the identity
    assert mqa.mdd == pytest.approx(mdd(diffs.std(ddof=1), 3, 0.05), rel=1e-9)
    assert mqa.verdict == ("no clear difference" if p >= 0.05 else "worse" if diffs.mean() > 0 else "better")


def test_baseline_row_and_verdict_column(experiment: dict, table: pd.DataFrame) -> None:
    base = table.set_index("variant").loc["mha"]
    assert base.delta == 0 and base.verdict == "baseline"
    assert "verdict" in table.columns and set(table.verdict) <= {"baseline", "better", "worse", "no clear difference"}
    assert math.isnan(base.p_value) and math.isnan(base.p_adjusted) and math.isnan(base.mdd)
    flipped = comparison_table(load_runs(experiment["uri"], "cmp"), baseline="mqa").set_index("variant")
    assert flipped.loc["mqa"].delta == 0 and flipped.loc["mqa"].verdict == "baseline"
    assert flipped.loc["mha"].delta == pytest.approx(-table.set_index("variant").loc["mqa"].delta, rel=1e-9)
    for col in ("delta_ci95", "p_value", "mdd"):
        assert flipped.loc["mha", col] == pytest.approx(table.set_index("variant").loc["mqa", col], rel=1e-9)


@pytest.fixture(scope="module")
def one_seed(experiment: dict) -> pd.DataFrame:
    runs = load_runs(experiment["uri"], "cmp")
    return comparison_table(replace(runs, frame=runs.frame[runs.frame.seed == 2]))


def test_single_seed_has_no_intervals_and_no_verdict(experiment: dict, one_seed: pd.DataFrame) -> None:
    assert list(one_seed.n_seeds) == [1, 1] and not any(c.endswith("_ci95") for c in one_seed.columns)
    assert list(one_seed.verdict) == ["baseline", "too few seeds"] and one_seed.p_value.isna().all() and one_seed.mdd.isna().all()
    expected = expected_finals(experiment)
    assert one_seed.delta[1] == pytest.approx(expected["mqa"][2][0] - expected["mha"][2][0], rel=1e-12)


def test_single_seed_outputs_say_no_verdict_and_how_to_add_seeds(one_seed: pd.DataFrame) -> None:
    advice = "Run at least 3 seeds: `train.seeds: [1, 2, 3]` in the spec, or `--set 'train.seeds=[1,2,3]'`."
    data = json.loads(render(one_seed, "json"))
    assert data["note"].startswith("One seed per variant: no verdict is possible") and data["note"].endswith(advice)
    assert [r["verdict"] for r in data["rows"]] == ["baseline", "too few seeds"]
    markdown = render(one_seed, "markdown")
    assert f"- {data['note']}" in markdown and markdown.splitlines()[0].rstrip(" |").endswith("verdict")
    assert data["note"] in notes(one_seed)  # printed under the rich table
    assert html.escape(data["note"]) in to_html(one_seed)
    assert list(pd.read_csv(io.StringIO(render(one_seed, "csv"))).verdict) == ["baseline", "too few seeds"]


def test_wall_time_from_metric_timestamps(experiment: dict) -> None:
    """Training time per run: positive, within the run's MLflow lifetime and not above the time
    the driver measured around the whole job (status.json)."""
    runs = per_run(load_runs(experiment["uri"], "cmp"))
    status = {(j.variant, j.seed): read_status(j)["wall_s"] for j in experiment["plan"].jobs}
    lifetimes = {r.info.run_id: (r.info.end_time - r.info.start_time) / 1000 for r in experiment["children"]}
    for r in runs.itertuples():
        assert 0 < r.wall_s <= lifetimes[r.run_id]
        assert r.wall_s <= status[(r.variant, r.seed)] + 0.5


def test_csv_json_markdown_parse_back(table: pd.DataFrame) -> None:
    numeric = [c for c in table.columns if c not in ("variant", "verdict")]
    back = pd.read_csv(io.StringIO(render(table, "csv")))
    assert list(back.columns) == list(table.columns) and list(back.variant) == list(table.variant)
    np.testing.assert_allclose(back[numeric].to_numpy(float), table[numeric].to_numpy(float), rtol=1e-14, equal_nan=True)
    assert list(back.verdict) == list(table.verdict)

    data = json.loads(render(table, "json"))
    assert data["metric"] == "val_loss" and data["baseline"] == "mha" and data["note"] is None
    rows = pd.DataFrame(data["rows"])
    assert list(rows.columns) == list(table.columns)
    assert list(rows.columns[-7:]) == ["delta", "delta_ci95", "n_paired", "p_value", "p_adjusted", "mdd", "verdict"]
    np.testing.assert_array_equal(rows[numeric].to_numpy(float), table[numeric].to_numpy(float))

    lines = [line for line in render(table, "markdown").splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in cells] == ["mha", "mqa"] and header[-1] == "verdict"
    col = header.index("final val_loss")
    for row, (_, expected) in zip(cells, table.iterrows(), strict=True):
        mean, half = (float(x) for x in row[col].split("±"))
        assert mean == pytest.approx(expected.final_val_loss, abs=5e-5)
        assert half == pytest.approx(expected.final_val_loss_ci95, abs=5e-5)
        assert int(row[header.index("params")].replace(",", "")) == expected.params
        assert row[-1] == expected.verdict
    assert cells[1][header.index("mdd")] == f"{table.mdd[1]:.4f}" and cells[0][header.index("p")] == ""


def test_rich_table_renders(table: pd.DataFrame) -> None:
    console = Console(record=True, width=220)
    console.print(rich_table(table))
    text = console.export_text()
    assert "mha" in text and "mqa" in text and "±" in text and "baseline" in text


def test_report_files_logged_on_parent_run(experiment: dict) -> None:
    out = experiment["tmp"] / "report_out"
    runs = load_runs(experiment["uri"], "cmp")
    paths = write_report(runs, comparison_table(runs), out)
    assert set(paths) == {"markdown", "html", "plot"} and all(p.parent == out / "report" for p in paths.values())
    assert paths["plot"].name == "val_loss.png" and paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "data:image/png;base64," in page and "mqa" in page
    md = paths["markdown"].read_text()
    assert "| variant |" in md and "![val_loss curves](val_loss.png)" in md
    logged = {Path(a.path).name for a in experiment["client"].list_artifacts(experiment["parent"], "report")}
    assert logged == {"report.md", "report.html", "val_loss.png", "comparison.json"}


def test_parent_run_holds_the_table_and_the_headline_figures(experiment: dict) -> None:
    """The table's headline as an MLflow table (written twice: replaced, not appended to) and its numbers as metrics."""
    runs = load_runs(experiment["uri"], "cmp")
    table = comparison_table(runs)
    for _ in range(2):
        write_report(runs, table, experiment["tmp"] / "report_twice")
    client = experiment["client"]
    exp_id = client.get_run(experiment["parent"]).info.experiment_id
    with using(experiment["uri"]):  # MlflowClient.load_table searches the runs through the global tracking URI
        logged = client.load_table(exp_id, "report/comparison.json", run_ids=[experiment["parent"]])
    shown = summary_frame(table)
    assert list(shown.columns) == ["variant", "final val_loss", "Δ val_loss vs mha", "p Holm", "verdict"]
    assert list(logged.columns) == list(shown.columns) and logged.astype(str).values.tolist() == shown.values.tolist()
    tags = experiment["client"].get_run(experiment["parent"]).data.tags
    assert {"path": "report/comparison.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])

    metrics = experiment["client"].get_run(experiment["parent"]).data.metrics
    rows = table.set_index("variant")
    for variant in ("mha", "mqa"):
        assert metrics[f"val_loss_mean/{variant}"] == rows.loc[variant, "final_val_loss"]
        assert metrics[f"delta_val_loss/{variant}"] == rows.loc[variant, "delta"]
    assert metrics["delta_val_loss_ci95/mqa"] == rows.loc["mqa", "delta_ci95"]
    assert metrics["p_holm/mqa"] == rows.loc["mqa", "p_adjusted"]
    assert "p_holm/mha" not in metrics and "delta_val_loss_ci95/mha" not in metrics  # the baseline's NaNs
    assert headline_metrics(table) == {k: v for k, v in metrics.items() if "/" in k}


def test_errors(experiment: dict, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no experiment 'nope'.*known: .*cmp"):
        load_runs(experiment["uri"], "nope")
    runs = load_runs(experiment["uri"], "cmp")
    with pytest.raises(ReportError, match=r"no run logged metric 'val_acc'; available: .*val_loss"):
        comparison_table(runs, "val_acc")
    with pytest.raises(ReportError, match=r"baseline 'gqa' is not a variant.*mha, mqa"):
        comparison_table(runs, baseline="gqa")
    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(ReportError, match="no MLflow store"):
        load_runs(f"sqlite:///{missing}", "cmp")
    assert not missing.exists()
    with pytest.raises(ReportError, match="unknown format"):
        render(comparison_table(runs), "xlsx")
    experiment["client"].create_experiment("empty")
    with pytest.raises(ReportError, match="experiment 'empty' has no runs") as error:
        load_runs(experiment["uri"], "empty")
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


SYNTHETIC = {  # variant -> final val_loss per seed: clearly better / worse than base, one the same, one with a single seed
    "base": [3.00, 3.10, 2.90],
    "better": [2.50, 2.62, 2.38],
    "worse": [3.20, 3.31, 3.12],
    "same": [3.01, 3.08, 2.93],
    "single": [3.05],
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SYNTHETIC logged straight to MLflow as finished child runs of one parent (no training): val_loss at
    steps 1 and 2, tokens_seen, train_seconds (not for better/seed 3) and a tokens_per_sec_during_training history that
    must not be used."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('syn') / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("syn")
    parent = client.create_run(exp, run_name="syn", start_time=1_000).info.run_id
    start = 2_000
    for variant, finals in SYNTHETIC.items():
        for seed, final in zip(SEEDS, finals, strict=False):
            tags = {"mlflow.parentRunId": parent, "gpt2exp.variant": variant, "gpt2exp.seed": str(seed)}
            run_id = client.create_run(exp, start_time=start, tags=tags, run_name=f"{variant}-{seed}").info.run_id
            metrics = [Metric("val_loss", final + 1, start + 10, 1), Metric("val_loss", final, start + 20, 2)]
            metrics += [Metric("tokens_seen", 512.0 * step, start + 10 * step, step) for step in (1, 2)]
            metrics += [Metric("tokens_per_sec_during_training", 999.0, start + 10 * step, step) for step in (1, 2)]
            if (variant, seed) != ("better", 3):
                metrics += [Metric("train_seconds", seed * step / 4, start + 10 * step, step) for step in (1, 2)]
            client.log_batch(run_id, metrics=metrics)
            client.set_terminated(run_id, end_time=start + 30)
            start += 100
    return {"uri": uri, "client": client}


def test_holm_corrected_verdicts_over_all_variants(synthetic: dict) -> None:
    table = comparison_table(load_runs(synthetic["uri"], "syn")).set_index("variant")
    assert list(table.index) == list(SYNTHETIC) and table.attrs["comparisons"] == 3 and table.attrs["note"] is None
    p = {v: stats.ttest_rel(SYNTHETIC[v], SYNTHETIC["base"]).pvalue for v in ("better", "worse", "same")}
    for v, expected in p.items():
        assert table.loc[v, "p_value"] == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(table.loc[list(p), "p_adjusted"], holm(list(p.values())), rtol=1e-9)
    assert table.loc["worse", "p_adjusted"] == pytest.approx(3 * min(p.values()), rel=1e-9)  # the smallest p, times m = 3
    for v in p:
        sd = np.std(np.subtract(SYNTHETIC[v], SYNTHETIC["base"]), ddof=1)
        assert table.loc[v, "mdd"] == pytest.approx(mdd(sd, 3, 0.05 / 3), rel=1e-9)
    assert table.loc["same", "mdd"] > abs(table.loc["same", "delta"])  # a difference that could hide
    assert dict(table.verdict) == {
        "base": "baseline",
        "better": "better",
        "worse": "worse",
        "same": "no clear difference",
        "single": "too few seeds",
    }
    assert table.loc["single", "n_paired"] == 1 and math.isnan(table.loc["single", "p_adjusted"])
    lines = notes(table)
    assert any("Holm-corrected over the 3 comparisons at 5% family-wise error" in n for n in lines)
    assert any("differences smaller than mdd could go undetected at 80% power" in n for n in lines)


def test_tokens_per_sec_is_tokens_over_train_seconds(synthetic: dict) -> None:
    per = per_run(load_runs(synthetic["uri"], "syn")).set_index(["variant", "seed"])
    for (variant, seed), r in per.iterrows():
        if (variant, seed) == ("better", 3):
            assert math.isnan(r.tokens_per_sec_during_training)  # no train_seconds logged
        else:
            assert r.tokens_per_sec_during_training == 1024.0 / (seed / 2)  # final tokens_seen / final train_seconds
    assert "evaluation excluded" in notes(comparison_table(load_runs(synthetic["uri"], "syn")))[0]


def test_tokens_per_sec_of_a_trained_run(experiment: dict) -> None:
    client = experiment["client"]
    for r in per_run(load_runs(experiment["uri"], "cmp")).itertuples():
        last = {
            k: max(client.get_metric_history(r.run_id, k), key=lambda m: m.step).value for k in ("tokens_seen", "train_seconds")
        }
        assert (
            r.tokens_per_sec_during_training == pytest.approx(last["tokens_seen"] / last["train_seconds"], rel=1e-12)
            and r.tokens_per_sec_during_training > 0
        )


def test_variant_order_is_the_child_runs_tag_not_their_order(tmp_path: Path) -> None:
    """Rows follow the ``gpt2exp.variant_index`` tag set when the runs were made (no spec.yaml is read); a variant
    without it (a run made by hand) comes after, in the order its runs were made."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("order")
    parent = client.create_run(exp, run_name="order", start_time=1_000).info.run_id
    for i, (variant, index) in enumerate([("zeta", "0"), ("hand", None), ("alpha", "2"), ("mid", "1")]):
        tags = {"mlflow.parentRunId": parent, "gpt2exp.variant": variant, "gpt2exp.seed": "1"}
        tags |= {VARIANT_INDEX: index} if index else {}
        run = client.create_run(exp, start_time=2_000 + i, tags=tags, run_name=variant).info.run_id
        client.log_batch(run, metrics=[Metric("val_loss", 3.0 + i, 2_100 + i, 1)])
        client.set_terminated(run)
    assert load_runs(uri, "order").variants == ["zeta", "mid", "alpha", "hand"]
    assert list(comparison_table(load_runs(uri, "order")).variant) == ["zeta", "mid", "alpha", "hand"]


def test_metric_names_are_valid_and_distinct_mlflow_keys(tmp_path: Path) -> None:
    """Grid variant names hold characters MLflow refuses in keys; made valid, they stay one key per variant."""
    variants = ["mqa+lr=0.001,wd=0.1", "mqa+lr=0.001_wd=0.1", "mqa_lr_0.001_wd_0.1", "exp/a", "x//y", "a:b"]
    names = metric_names(variants)
    assert names[0] == "mqa_lr_0.001_wd_0.1" and len(set(names)) == len(names) and names[3] == "exp/a"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("keys")).info.run_id
    client.log_batch(run, metrics=[Metric(f"delta_val_loss/{n}", 1.0, 0, 0) for n in names])  # MLflow refuses an invalid key
    assert len(client.get_run(run).data.metrics) == len(variants)
