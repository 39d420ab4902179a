"""MLflow tracking with a real SQLite store: run hierarchy, params, metric histories, checkpoints
as logged models, the final pyfunc model (models-from-code with no pickle in it, loaded in a fresh
process, served by MLflow's own model server, a planted pickle never run), registration with alias
``best``, and clear errors for bad model URIs."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

import gpt2exp
from gpt2exp.data.tokenizer import EOT, get_tokenizer
from gpt2exp.launch.plan import make_plan
from gpt2exp.launch.runner import run_plan, track
from gpt2exp.spec import validate_spec
from gpt2exp.tracking.dataset import dataset_input
from gpt2exp.tracking.pyfunc import generate_text, load_model
from gpt2exp.tracking.runs import SAMPLING_ENV, RunLogger, RunRef, experiment_id, using
from gpt2exp.training.checkpoint import load_final

pytestmark = pytest.mark.slow


def tiny(corpus: Path, **tracking: object) -> dict:
    return {
        "name": "trk",
        "description": "MHA against MQA on the first 200 KB of Shakespeare",
        "data": {"path": str(corpus)},
        "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 2e-2, "eval_interval": 4, "eval_tokens": 256, "log_interval": 2},
        "variants": [{"name": "mha", "set": {}}, {"name": "mqa", "set": {"model.n_kv_head": 1}}],
        "tracking": {"system_metrics": False, **tracking},
    }


@pytest.fixture(scope="module")
def corpus(corpus_head) -> Path:
    return corpus_head(200_000)


@pytest.fixture(scope="module")
def tracked(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, MlflowClient]:
    """A real run into the default store: <output>/mlflow.db, with registration."""
    out = tmp_path_factory.mktemp("out")
    plan = make_plan(validate_spec(tiny(corpus, register="trk-best")), out, show_progress=False)
    results = run_plan(plan, "local", show_progress=False).runs
    assert set(results.status) == {"completed"}, results.error.tolist()
    return plan, MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def children(plan: object, client: MlflowClient) -> dict[str, object]:
    exp = client.get_experiment_by_name("trk")
    return {
        r.data.tags["gpt2exp.variant"]: r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags
    }


def test_parent_and_one_child_per_variant_with_params(tracked: tuple[object, MlflowClient]) -> None:
    plan, client = tracked
    exp = client.get_experiment_by_name("trk")
    assert exp.artifact_location == (plan.output / "mlartifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["gpt2exp.experiment"] == "trk" and parents[0].info.status == "FINISHED"
    kids = children(plan, client)
    assert set(kids) == {"mha", "mqa"}
    for name, run in kids.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and run.data.tags["gpt2exp.seed"] == "1337"
        assert run.data.params["model.n_kv_head"] == ("2" if name == "mha" else "1")
        assert run.data.params["train.max_steps"] == "8" and int(run.data.params["n_params"]) > 1_600_000
        assert run.info.status == "FINISHED" and run.inputs.dataset_inputs
        assert "spec.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_experiment_opens_in_the_training_view_with_the_spec_description(tracked: tuple[object, MlflowClient]) -> None:
    plan, client = tracked
    exp = client.get_experiment_by_name("trk")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view the UI would guess
    assert exp.tags["mlflow.note.content"] == plan.spec.description
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["mlflow.note.content"] == plan.spec.description
    assert {r.data.tags["gpt2exp.variant"]: r.data.tags["gpt2exp.variant_index"] for r in children(plan, client).values()} == {
        "mha": "0",
        "mqa": "1",
    }


def test_an_existing_experiment_keeps_a_kind_and_note_set_in_the_ui(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("mine", tags={"mlflow.note.content": "my words"})
    assert experiment_id(client, "mine", tmp_path, "the spec's words") == exp
    tags = client.get_experiment(exp).tags
    assert tags["mlflow.note.content"] == "my words" and tags["mlflow.experimentKind"] == "custom_model_development"
    new = experiment_id(client, "new", tmp_path)  # no description: no note
    assert "mlflow.note.content" not in client.get_experiment(new).tags


def test_children_log_the_corpus_file_as_a_local_dataset(tracked: tuple[object, MlflowClient], corpus: Path) -> None:
    plan, client = tracked
    meta = json.loads((Path(plan.jobs[0].train_tokens).parent / "meta.json").read_text())
    for run in children(plan, client).values():
        (used,) = run.inputs.dataset_inputs
        dataset = used.dataset
        assert dataset.source_type == "local" and json.loads(dataset.source) == {"uri": str(corpus.absolute())}
        assert dataset.name == corpus.name and dataset.digest == meta["key"][:24]  # the token cache folder's name
        assert json.loads(dataset.profile) == {"train_tokens": meta["n_train_tokens"]}
        assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "training"}


def test_the_dataset_source_is_the_specs_path_not_the_first_tokenizer_of_that_text(corpus: Path, tmp_path: Path) -> None:
    """The token cache is keyed by content: a copy of the corpus elsewhere reuses the tokens (and their meta.json,
    which names the first path) but logs its own path."""
    make_plan(validate_spec(tiny(corpus)), tmp_path / "first", show_progress=False)  # tokenized from corpus (or before)
    copy = tmp_path / "copy.txt"
    copy.write_bytes(corpus.read_bytes())
    plan = make_plan(validate_spec(tiny(copy)), tmp_path / "out", show_progress=False)
    meta = json.loads((Path(plan.jobs[0].train_tokens).parent / "meta.json").read_text())
    assert meta["source"] != f"path:{copy}"  # the cached tokens name another path
    tracker = track(plan)  # the MLflow runs of the plan, each with its dataset input
    ref = plan.jobs[0].tracking
    assert ref is not None
    (used,) = tracker.client.get_run(ref.run_id).inputs.dataset_inputs
    assert json.loads(used.dataset.source) == {"uri": str(copy)} and used.dataset.name == "copy.txt"


def test_builtin_and_url_corpora_have_real_sources() -> None:
    from gpt2exp.data.sources import builtin_files

    builtin = dataset_input("builtin:shakespeare", "ab" * 32, 10).dataset
    folder = Path(json.loads(builtin.source)["uri"])
    assert builtin.source_type == "local" and folder.is_dir() and set(builtin_files("shakespeare")) <= set(folder.rglob("*"))
    url = dataset_input("url:https://example.org/texts/tiny.txt", "cd" * 32, 10).dataset
    assert (url.source_type, json.loads(url.source), url.name) == (
        "http",
        {"url": "https://example.org/texts/tiny.txt"},
        "tiny.txt",
    )


def test_run_logger_samples_system_metrics_with_mlflows_public_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``start_run(log_system_metrics=True)`` on the child run: sampled while the logger is open, stopped at close,
    which ends the run as ``with mlflow.start_run()`` would (FAILED when closed by an error)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sm")
    monkeypatch.delenv(SAMPLING_ENV, raising=False)
    quick = RunLogger(RunRef(uri, client.create_run(exp).info.run_id, exp), system_metrics=True)
    assert SAMPLING_ENV not in os.environ  # gpt2exp's 5 s applied to that run only
    quick.close()

    monkeypatch.setenv(SAMPLING_ENV, "0.2")  # a user's own interval wins
    run = client.create_run(exp).info.run_id
    logger = RunLogger(RunRef(uri, run, exp), system_metrics=True)
    assert mlflow.active_run().info.run_id == run
    deadline = time.monotonic() + 30
    while not any(k.startswith("system/") for k in client.get_run(run).data.metrics) and time.monotonic() < deadline:
        time.sleep(0.2)
    logger.close()
    assert mlflow.active_run() is None and client.get_run(run).info.status == "FINISHED"
    sampled = client.get_run(run).data.metrics
    assert "system/cpu_utilization_percentage" in sampled, sampled
    time.sleep(0.6)
    assert client.get_run(run).data.metrics == sampled  # stopped

    failed = client.create_run(exp).info.run_id
    with pytest.raises(ValueError):
        logger = RunLogger(RunRef(uri, failed, exp), system_metrics=False)
        try:
            raise ValueError("a training error")
        finally:
            logger.close()
    assert client.get_run(failed).info.status == "FAILED" and not client.get_run(failed).data.metrics


def test_metric_histories_match_the_run_records(tracked: tuple[object, MlflowClient]) -> None:
    plan, client = tracked
    run = children(plan, client)["mha"]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert sorted(history) == [2, 4, 6, 8]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [4, 8]
    records = pd.read_json(Path(plan.jobs[0].run_dir) / "metrics.jsonl", lines=True).query("event == 'step'")
    assert records.train_loss.round(5).tolist() == [round(history[s], 5) for s in records.step]
    status = json.loads((Path(plan.jobs[0].run_dir) / "status.json").read_text())
    assert run.data.metrics["val_loss"] == pytest.approx(status["val_loss"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss_se")) == [4, 8]
    assert run.data.metrics["val_loss_se"] == pytest.approx(status["val_loss_se"]) and status["val_loss_se"] > 0
    seconds = run.data.metrics["train_seconds"]  # one throughput: tokens trained per second of training
    assert status["tokens_per_sec_during_training"] == pytest.approx(run.data.metrics["tokens_seen"] / seconds)


def test_checkpoints_are_logged_models_findable_by_val_loss(tracked: tuple[object, MlflowClient]) -> None:
    _, client = tracked
    exp = client.get_experiment_by_name("trk")
    checkpoints = client.search_logged_models(
        [exp.experiment_id], filter_string="model_type = 'checkpoint'", order_by=[{"field_name": "metrics.val_loss"}]
    )
    assert len(checkpoints) == 2  # one mid-run checkpoint (step 4) per variant; the end writes the final model
    best = checkpoints[0]
    assert best.tags["gpt2exp.step"] == "4" and Path(best.tags["gpt2exp.checkpoint"]).is_dir()
    assert {m.key for m in best.metrics} >= {"val_loss", "train_loss"}


def test_logged_model_loads_in_a_fresh_process_with_the_same_logits(tracked: tuple[object, MlflowClient], tmp_path: Path) -> None:
    plan, client = tracked
    run = children(plan, client)["mqa"]
    model = load_final(Path(plan.jobs[1].run_dir) / "final").eval()
    idx = torch.arange(20)[None] * 7
    expected = model(idx)[0]
    script = (
        "import sys, torch, mlflow; mlflow.set_tracking_uri(sys.argv[1]);"
        "from gpt2exp.tracking.pyfunc import load_model; m, _ = load_model(sys.argv[2]);"
        "torch.save(m.eval()(torch.arange(20)[None] * 7)[0].detach(), sys.argv[3])"
    )
    out = tmp_path / "logits.pt"
    env = os.environ | {"PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", script, client.tracking_uri, f"runs:/{run.info.run_id}/model", str(out)],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    torch.testing.assert_close(torch.load(out, weights_only=True), expected.detach(), rtol=0, atol=0)


def _pickle_that_creates(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is loaded: what a tampered model could hold."""

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return open, (str(marker), "w")

    return pickle.dumps(Payload())


def test_logged_model_is_code_and_a_planted_pickle_never_runs(tracked: tuple[object, MlflowClient], tmp_path: Path) -> None:
    plan, client = tracked
    run = children(plan, client)["mha"]
    with using(client.tracking_uri):
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "dl")))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "MLmodel",
        "artifacts/model.safetensors",
        "artifacts/model_spec.json",
        "conda.yaml",
        "pyfunc_model.py",
        "python_env.yaml",
        "registered_model_meta",  # YAML, written by MLflow's download
        "requirements.txt",
    ]
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and not flavor.get("code")

    proof, pwned = tmp_path / "proof", tmp_path / "pwned"
    pickle.loads(_pickle_that_creates(proof))
    assert proof.exists()  # the payload does run when unpickled
    (folder / "python_model.pkl").write_bytes(_pickle_that_creates(pwned))  # where the cloudpickled class used to be
    out = mlflow.pyfunc.load_model(str(folder)).predict(
        pd.DataFrame({"prompt": ["ROMEO:"]}), params={"max_new_tokens": 4, "temperature": 0.0}
    )
    assert isinstance(out[0], str) and load_model(str(folder))[0].spec.n_embd == 32
    assert not pwned.exists()
    # MLmodel turned back to the pickle format: gpt2exp's own loading still reads only the weights and the spec
    del flavor["model_code_path"]
    flavor |= {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert load_model(str(folder))[0].spec.n_embd == 32 and not pwned.exists()


def test_pyfunc_in_a_fresh_process_gives_the_greedy_tokens_of_the_model_in_memory(
    tracked: tuple[object, MlflowClient], tmp_path: Path
) -> None:
    plan, client = tracked
    run = children(plan, client)["mqa"]
    model, tokenizer = load_final(Path(plan.jobs[1].run_dir) / "final").eval(), get_tokenizer()
    prompts, expected = ["ROMEO:", "To be"], []
    for prompt in prompts:
        idx = torch.tensor([tokenizer.encode(prompt)])
        tokens = model.generate(idx, 8, temperature=0.0, eos=EOT)[0, idx.size(1) :].tolist()
        expected.append(tokenizer.decode([t for t in tokens if t != EOT]))
    script = (
        "import json, sys, mlflow, pandas as pd; mlflow.set_tracking_uri(sys.argv[1]);"
        "m = mlflow.pyfunc.load_model(sys.argv[2]);"
        "out = m.predict(pd.DataFrame({'prompt': json.loads(sys.argv[3])}), params={'max_new_tokens': 8, 'temperature': 0.0});"
        "print(json.dumps({'out': list(out), 'gpt2exp': sys.modules['gpt2exp'].__file__}))"
    )
    env = os.environ | {"PYTHONPATH": "", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}  # MLflow refuses pickled models
    proc = subprocess.run(
        [sys.executable, "-c", script, client.tracking_uri, f"runs:/{run.info.run_id}/model", json.dumps(prompts)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.splitlines()[-1])
    assert answer["out"] == expected and all(expected)
    assert answer["gpt2exp"] == gpt2exp.__file__  # the installed package, no copy from the model


def test_pyfunc_generates_text_and_the_registered_best_resolves(tracked: tuple[object, MlflowClient]) -> None:
    plan, client = tracked
    kids = children(plan, client)
    best_variant = min(kids, key=lambda v: kids[v].data.metrics["val_loss"])
    version = client.get_model_version_by_alias("trk-best", "best")
    assert version.run_id == kids[best_variant].info.run_id
    with using(client.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model("models:/trk-best@best")
    out = pyfunc.predict(pd.DataFrame({"prompt": ["ROMEO:", "To be"]}), params={"max_new_tokens": 6, "temperature": 0.0})
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    again = pyfunc.predict(pd.DataFrame({"prompt": ["ROMEO:"]}), params={"max_new_tokens": 6, "temperature": 0.0})
    assert again[0] == out[0]  # greedy is deterministic
    model, tokenizer = pyfunc.unwrap_python_model().model, get_tokenizer()  # the signature declares context: it is honoured
    short = pyfunc.predict(pd.DataFrame({"prompt": ["ROMEO:"]}), params={"max_new_tokens": 6, "temperature": 0.0, "context": 2})
    assert short[0] == generate_text(model, tokenizer, ["ROMEO:"], 6, 0.0, None, None, 0, context=2)[0]
    with pytest.raises(ValueError, match="context must be at least 1 token, not 0"):  # it reaches the model
        pyfunc.predict(pd.DataFrame({"prompt": ["ROMEO:"]}), params={"max_new_tokens": 1, "context": 0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_model_server_answers_invocations(tracked: tuple[object, MlflowClient], tmp_path: Path) -> None:
    plan, client = tracked
    run = children(plan, client)["mha"]
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH: the venv's, even when not activated
    env = os.environ | {"MLFLOW_TRACKING_URI": client.tracking_uri, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"runs:/{run.info.run_id}/model",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        body = json.dumps(
            {
                "dataframe_split": {"columns": ["prompt"], "data": [["ROMEO:"]]},
                "params": {"max_new_tokens": 5, "temperature": 0.0},
            }
        ).encode()
        deadline, answer = time.monotonic() + 90, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                time.sleep(0.5)
        assert answer is not None, "the model server never answered"
        assert isinstance(answer["predictions"][0], str) and answer["predictions"][0]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("runs:/0123456789abcdef/model", "not found"),
        ("/no/such/folder", "neither a model folder nor an MLflow model URI"),
        ("models:/nope@best", "nope"),
    ],
)
def test_bad_model_uris_are_one_clear_line(tracked: tuple[object, MlflowClient], uri: str, expected: str) -> None:
    plan, _ = tracked
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2exp.cli",
            "generate",
            "--model-uri",
            uri,
            "--output",
            str(plan.output),
            "--max-new-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_run_logs_into_a_real_mlflow_server_and_a_rerun_adds_no_runs(corpus: Path, tmp_path: Path) -> None:
    from gpt2exp.tracking.ui import mlflow_server

    store = f"sqlite:///{tmp_path / 'server.db'}"
    MlflowClient(store).search_experiments()  # the server's store, created before the server (one process)
    with mlflow_server(store, tmp_path / "artifacts") as url:
        raw = tiny(corpus, tracking_uri=url)
        plan = make_plan(validate_spec(raw), tmp_path / "out", show_progress=False)
        assert set(run_plan(plan, "local", show_progress=False).runs.status) == {"completed"}
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("trk")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
        kid = next(r for r in runs if r.data.tags.get("gpt2exp.variant") == "mqa")
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "val_loss")] == [4, 8]
        model_id = client.search_logged_models([exp.experiment_id], filter_string="name = 'model'")[0].model_id
        with using(url):
            assert load_model(f"models:/{model_id}")[0].spec.n_embd == 32
        again = run_plan(make_plan(validate_spec(raw), tmp_path / "out", show_progress=False), "local", show_progress=False).runs
        assert set(again.status) == {"completed"} and len(client.search_runs([exp.experiment_id])) == 3


def test_evaluate_scores_unseen_text(tracked: tuple[object, MlflowClient], corpus_path: Path, tmp_path: Path) -> None:
    plan, client = tracked
    unseen = tmp_path / "unseen.txt"
    unseen.write_bytes(corpus_path.read_bytes()[-20_000:])  # the end of the works: never in the 200 KB head
    run = children(plan, client)["mha"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2exp.cli",
            "evaluate",
            "--model-uri",
            f"runs:/{run.info.run_id}/model",
            "--data",
            str(unseen),
            "--output",
            str(plan.output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    loss = float(proc.stdout.split("loss ")[1].split()[0])
    assert 4.0 < loss < math.log(50257) and "tokens scored" in proc.stdout


def test_log_checkpoints_false_logs_the_final_model_only(corpus: Path, tmp_path: Path) -> None:
    """``tracking.log_checkpoints: false``: no checkpoint logged models, the final model all the same."""
    raw = tiny(corpus, log_checkpoints=False) | {"variants": [{"name": "mha", "set": {}}]}
    raw["train"] |= {"seeds": [1]}
    results = run_plan(make_plan(validate_spec(raw), tmp_path / "out", show_progress=False), "local", show_progress=False).runs
    assert results.status.tolist() == ["completed"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trk")
    models = client.search_logged_models([exp.experiment_id])
    assert [m.name for m in models] == ["model"]  # checkpoints were written (a resume uses them) but not logged
