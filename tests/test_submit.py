"""``gpt2exp submit`` and ``gpt2exp jobs`` against a real Ray head started by the suite on 127.0.0.1 and a real
MLflow server: the quickstart runs as a Ray Job and its runs land in the server; a job that fails reports
FAILED with its error; a wrong address is a one-line error within seconds, a head that is still starting is
waited for. The rules a cluster puts on an experiment (GPUs, shared output, reachable MLflow) are checked without
a cluster, on described nodes; what the package holds (never secrets) is listed by ``--dry-run`` without one.

The Ray head is stopped by its own process id and the ids of its descendants (not ``ray stop``, which would
stop every Ray of this user on the machine, other test sessions' included)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from gpt2exp.jobs.connection import Node, SubmitError, connect, resolve_address
from gpt2exp.jobs.follow import error_line
from gpt2exp.jobs.package import SPEC_DIR, build_package, effective_spec_yaml
from gpt2exp.jobs.rules import absolute_store, check_fit, check_output, check_tracking
from gpt2exp.jobs.submit import entrypoint, new_submission_id
from gpt2exp.spec import load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
CLI_TIMEOUT_S = 300


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI_ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}


def cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m gpt2exp.cli ARGS`` from the project root (the folder that ``submit`` uploads)."""
    return subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", *args],
        cwd=ROOT,
        env=CLI_ENV | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _needs_cli() -> None:
    from gpt2exp.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    if "submit" not in names:
        pytest.skip("gpt2exp/cli/ has no `submit` command yet (paste the submit/jobs commands)")


# ------------------------------------------------------------------------------------ a Ray head
def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to ``ray start --block`` (it stops the processes it started), then SIGKILL what is left of
    its process tree, by id."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def running_head(ready: bool = True) -> Iterator[tuple[str, subprocess.Popen]]:
    """``ray start --head`` on 127.0.0.1 with 2 CPUs, free ports and its own temp folder (so no other
    ``ray.init()`` on this machine joins it); yields the dashboard URL and the ``ray start`` process once the
    head lists its node and answers the Jobs API (``ready``), or as soon as ``ray start`` is started."""
    temp = tempfile.mkdtemp(prefix="gx-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    dashboard = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        "--num-cpus=2",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    env = os.environ | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # on SIGTERM stop at once (the default drains for 30 s)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
    }
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while ready:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                cluster = connect(url)
                if cluster.nodes():  # the state API lists the head node and the Jobs API answers: ready
                    cluster.client  # noqa: B018
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head at {url} listed no node within 120 s")
            time.sleep(0.5)
        yield url, proc
    finally:
        _stop_tree(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A head that is up (see ``running_head``), for the module."""
    _needs_cli()
    with running_head() as (url, _):
        yield url


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (one worker, loopback) with a SQLite store and served artifacts."""
    from mlflow import MlflowClient

    from gpt2exp.tracking.ui import mlflow_server

    folder = tmp_path_factory.mktemp("mlflow")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(store).search_experiments()  # creates the empty store that the server will serve
    with mlflow_server(store, artifacts=folder / "artifacts") as url:
        yield url


def tiny(corpus: Path, *more: str) -> list[str]:
    """--set arguments that shrink the quickstart to seconds."""
    sets = [
        "train.max_steps=6",
        "train.eval_interval=3",
        "train.eval_tokens=256",
        "train.seeds=[1]",
        "model.n_layer=1",
        "tracking.system_metrics=false",
        "data.builtin=null",
        f"data.path={corpus}",
        *more,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def _submitted_id(text: str) -> str:
    found = re.search(r"submitted (gpt2exp-[\w.-]+)", text)
    assert found, text
    return found.group(1)


# -------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_submit_follow_runs_the_quickstart_and_logs_to_the_mlflow_server(
    ray_head: str, mlflow_url: str, corpus_head, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "out"
    t0 = time.monotonic()
    r = cli(
        "submit",
        str(QUICKSTART),
        "--address",
        ray_head,
        "--follow",
        "--output",
        str(out),
        *tiny(corpus_head(200_000), f"tracking.tracking_uri={mlflow_url}"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sid = _submitted_id(r.stderr)
    assert re.fullmatch(r"gpt2exp-quickstart-\d{8}-\d{6}", sid)
    assert f"job {sid} SUCCEEDED" in r.stdout
    assert "results" in r.stdout and "completed" in r.stdout  # the job's own output came through --follow
    print(f"submit --follow took {time.monotonic() - t0:.1f} s")

    cluster = connect(ray_head)
    assert str(cluster.client.get_job_status(sid)) == "SUCCEEDED"
    info = cluster.client.get_job_info(sid)
    assert info.metadata["gpt2exp.experiment"] == "quickstart"
    assert info.metadata["gpt2exp.tracking_uri"] == mlflow_url

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1 and len(children) == 2, [(run.info.run_name, run.data.tags) for run in runs]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    assert {run.data.tags["gpt2exp.variant"] for run in children} == {"mha", "gqa"}
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all("val_loss" in run.data.metrics for run in children)
    assert (out / "quickstart" / "results.csv").is_file()  # --output: the folder as the (local) cluster sees it

    listed = cli("jobs", "list", "--address", ray_head)
    assert listed.returncode == 0, listed.stderr
    assert sid in listed.stdout and "SUCCEEDED" in listed.stdout
    as_json = json.loads(cli("jobs", "list", "--address", ray_head, "--json").stdout)
    assert {"submission_id": sid, "status": "SUCCEEDED", "experiment": "quickstart"}.items() <= next(
        j for j in as_json if j["submission_id"] == sid
    ).items()
    status = cli("jobs", "status", sid, "--address", ray_head)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{sid}: SUCCEEDED")
    assert f"MLflow: {mlflow_url}" in status.stdout


@pytest.mark.slow
def test_pipeline_submit_runs_the_whole_pipeline_as_one_job(ray_head: str, mlflow_url: str, corpus_head, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from gpt2exp.pipeline.state import PipelineRun

    small = {"train.max_steps": 6, "train.eval_interval": 3, "train.eval_tokens": 256, "train.seeds": [1], "model.n_layer": 1}
    pipeline = {
        "name": "cluster_study",
        "tracking_uri": mlflow_url,
        "stages": [
            {"name": "data", "kind": "prepare", "data": {"path": str(corpus_head(200_000))}},
            {
                "name": "train",
                "kind": "run",
                "spec": str(QUICKSTART),
                "data": "data",
                "set": small | {"tracking.system_metrics": False},
            },
            {"name": "best", "kind": "register", "model_name": "cluster-best"},
        ],
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    r = cli("pipeline", "submit", str(path), "--address", ray_head, "--follow", "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sid = _submitted_id(r.stderr)
    assert re.fullmatch(r"gpt2exp-cluster_study-\d{8}-\d{6}", sid) and f"job {sid} SUCCEEDED" in r.stdout
    assert "(cluster_study, 3 stage(s), 2 variant(s))" in r.stderr
    entry = connect(ray_head).client.get_job_info(sid).entrypoint
    assert entry.startswith(f"python -m gpt2exp.cli pipeline run .gpt2exp-submit/{sid}.yaml --launcher ray")

    run = PipelineRun.find(mlflow_url, "cluster_study")  # the stage state is in the MLflow server
    assert run is not None and [s.status for s in run.states.values()] == ["completed"] * 3
    client = MlflowClient(mlflow_url)
    parent = client.get_run(run.states["train"].output["parent_run_id"])
    assert parent.data.tags["gpt2exp.pipeline_run"] == run.run_id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.params["parallel.launcher"] for c in children} == {"ray"} and len(children) == 2
    assert client.get_model_version_by_alias("cluster-best", "best").run_id == run.states["best"].output["run_id"]


@pytest.mark.slow
def test_submit_waits_for_a_head_that_is_starting(corpus_head, tmp_path: Path) -> None:
    """Submitted as ``ray start --head`` begins, whose dashboard agent is then held stopped for 8 s: the dashboard
    refuses connections, then the head lists no node (its raylet waits for the agent); submit says once that it
    waits, and submits once the head is up."""
    _needs_cli()
    args = tiny(corpus_head(200_000), "tracking.enabled=false")
    with running_head(ready=False) as (url, head):
        t0 = time.monotonic()
        submit = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpt2exp.cli",
                "submit",
                str(QUICKSTART),
                "--address",
                url,
                "--output",
                str(tmp_path / "out"),
                *args,
            ],
            cwd=ROOT,
            env=CLI_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        agent = None
        while agent is None:
            assert time.monotonic() - t0 < 60, "no dashboard agent started"
            for p in psutil.Process(head.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any(a.endswith("dashboard/agent.py") for a in p.cmdline()):
                        agent = p
            time.sleep(0.02)
        agent.suspend()
        try:
            time.sleep(8)
        finally:
            agent.resume()
        out, err = submit.communicate(timeout=120)
        print(f"submit as ray start begins took {time.monotonic() - t0:.1f} s")
        assert submit.returncode == 0, err[-3000:]
        waiting = [line for line in err.splitlines() if line.startswith("waiting for")]
        assert len(waiting) == 1 and waiting[0].startswith(f"waiting for the Ray cluster at {url}: "), err
        assert waiting[0].endswith("(retrying for up to 60 s)")
        assert str(connect(url).client.get_job_status(out.strip())) in ("PENDING", "RUNNING", "SUCCEEDED")


@pytest.mark.slow
def test_a_failing_job_reports_failed_with_its_error(ray_head: str, corpus_head, tmp_path: Path) -> None:
    # valid as a spec, so it passes the local checks; the data file does not exist where the job runs
    r = cli(
        "submit",
        str(QUICKSTART),
        "--address",
        ray_head,
        "--follow",
        "--output",
        str(tmp_path / "out"),
        *tiny(corpus_head(200_000), "data.path=/nonexistent/corpus.txt", "tracking.enabled=false"),
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    sid = _submitted_id(r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: job {sid} FAILED (exit code 2): data.path: '/nonexistent/corpus.txt' does not exist"), last
    assert "Traceback" not in r.stderr
    assert str(connect(ray_head).client.get_job_status(sid)) == "FAILED"

    status = cli("jobs", "status", sid, "--address", ray_head)
    assert status.stdout.startswith(f"{sid}: FAILED")
    logs = cli("jobs", "logs", sid, "--address", ray_head)
    assert "does not exist" in logs.stdout


@pytest.mark.slow
def test_on_several_nodes_the_job_checks_the_shared_output_then_runs(ray_head: str, corpus_head, tmp_path: Path) -> None:
    """``--autoscaling`` applies the multi-node rules: the job's entrypoint is ``gpt2exp.jobs.checked_run``, which
    checks in the job that every node (here one) sees the output folder, then runs the experiment in that process."""
    out = tmp_path / "out"
    r = cli(
        "submit",
        str(QUICKSTART),
        "--address",
        ray_head,
        "--follow",
        "--autoscaling",
        "--output",
        str(out),
        *tiny(corpus_head(200_000), "tracking.enabled=false"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sid = _submitted_id(r.stderr)
    assert f"output {out} is shared by all 1 node(s)" in r.stdout
    assert "completed" in r.stdout and f"job {sid} SUCCEEDED" in r.stdout
    entry = connect(ray_head).client.get_job_info(sid).entrypoint
    assert entry.startswith(f"python -m gpt2exp.jobs.checked_run {out} run .gpt2exp-submit/{sid}.yaml --launcher ray")
    assert (out / "quickstart" / "results.csv").is_file()


@pytest.mark.slow
def test_jobs_stop_and_unknown_ids(ray_head: str, corpus_head, tmp_path: Path) -> None:
    r = cli(
        "submit",
        str(QUICKSTART),
        "--address",
        ray_head,
        "--output",
        str(tmp_path / "out"),
        *tiny(corpus_head(200_000), "train.max_steps=100000", "tracking.enabled=false"),
    )
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()  # without --follow: the bare id on stdout
    assert sid.startswith("gpt2exp-quickstart-")
    stop = cli("jobs", "stop", sid, "--address", ray_head)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"{sid}: STOPPED"
    follow = cli("jobs", "logs", sid, "--follow", "--address", ray_head)
    assert follow.returncode == 1 and f"job {sid} STOPPED" in follow.stderr

    missing = cli("jobs", "status", "gpt2exp-nope", "--address", ray_head)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: no job gpt2exp-nope on {ray_head} (gpt2exp jobs list shows the ids)"


def test_a_wrong_address_is_a_one_line_error_within_seconds() -> None:
    _needs_cli()
    port = _free_port()  # nobody listens there
    t0 = time.monotonic()
    r = cli("submit", str(QUICKSTART), "--address", f"http://127.0.0.1:{port}", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert took < 10, took
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: cannot reach a Ray dashboard at http://127.0.0.1:{port} (connection refused)")
    r = cli("jobs", "list", "--address", f"127.0.0.1:{port}", timeout=60)  # no scheme: http:// is assumed
    assert r.returncode == 1 and "connection refused" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_bad_spec_fails_before_any_cluster_is_contacted(tmp_path: Path) -> None:
    _needs_cli()
    r = cli("submit", str(QUICKSTART), "--address", "http://127.0.0.1:9", "--set", "model.n_head=5", timeout=60)
    assert r.returncode == 2
    assert "model.n_embd" in r.stderr and "cannot reach" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "p", "stages": [{"name": "t", "kind": "run", "spec": str(QUICKSTART), "data": "d"}]}))
    r = cli("pipeline", "submit", str(bad), "--address", "http://127.0.0.1:9", timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"{bad}: stages.0.run.data: 'd' is not the name of a stage"


# ---------------------------------------------------------------------- the rules, without a cluster
def _spec(**parallel: object):
    return validate_spec(
        {"name": "s", "train": {"max_steps": 1, "batch_size": 64}, "parallel": {"launcher": "ray", **parallel}}, "s.yaml"
    )


GPU_NODES = [
    Node("10.0.0.1", True, {"CPU": 8}),
    Node("10.0.0.2", False, {"CPU": 32, "GPU": 4}),
    Node("10.0.0.3", False, {"CPU": 32, "GPU": 4}),
]


def test_gpu_counts_must_fit_the_cluster() -> None:
    check_fit(_spec(strategy="ddp", num_workers=8, use_gpu=True), GPU_NODES)  # 8 x 1 GPU on 2 x 4 GPUs
    with pytest.raises(
        SubmitError, match=r"16 workers x 1 GPU = 16 GPUs, but the cluster has 3 node\(s\), 72 CPU\(s\), 8 GPU\(s\)"
    ):
        check_fit(_spec(strategy="ddp", num_workers=16, use_gpu=True), GPU_NODES)
    with pytest.raises(SubmitError, match=r"gpus_per_worker=6 but the largest node has 4 GPU"):
        check_fit(
            _spec(strategy="fsdp", num_workers=2, use_gpu=True, gpus_per_worker=6), [*GPU_NODES, Node("x", False, {"GPU": 4})]
        )
    with pytest.raises(SubmitError, match=r"use_gpu is true but the cluster has 1 node\(s\), 2 CPU\(s\), 0 GPU\(s\)"):
        check_fit(_spec(use_gpu=True), [Node("127.0.0.1", True, {"CPU": 2})])
    with pytest.raises(SubmitError, match=r"4 workers x 1 CPU = 4 CPUs"):
        check_fit(_spec(strategy="ddp", num_workers=4), [Node("127.0.0.1", True, {"CPU": 2})])


def test_multi_node_needs_a_reachable_mlflow_server() -> None:
    check_tracking("sqlite:////tmp/x/mlflow.db", multi_node=False)  # one node: the store is where the workers are
    check_tracking("http://10.0.0.5:5000", multi_node=True)
    for uri, why in [
        ("sqlite:////home/me/outputs/mlflow.db", "is a file on one machine; workers on other nodes can't reach it"),
        ("/home/me/mlruns", "is a file on one machine"),
        ("http://127.0.0.1:5000", "is a loopback address"),
        (None, "needs an MLflow server that every node reaches"),
    ]:
        with pytest.raises(SubmitError, match=re.escape(why)) as e:
            check_tracking(uri, multi_node=True)
        assert e.value.code == 2


def test_relative_sqlite_stores() -> None:
    assert absolute_store("sqlite:///mlflow.db", on_this_machine=True) == f"sqlite:///{Path('mlflow.db').resolve()}"
    assert absolute_store("sqlite:////abs/mlflow.db", on_this_machine=False) == "sqlite:////abs/mlflow.db"
    assert absolute_store("http://10.0.0.5:5000", on_this_machine=False) == "http://10.0.0.5:5000"
    with pytest.raises(SubmitError, match="is a relative path"):
        absolute_store("sqlite:///mlflow.db", on_this_machine=False)


def test_output_folder_rules() -> None:
    assert check_output(None, multi_node=False, on_this_machine=True) == str(Path("outputs").resolve())
    assert check_output("/mnt/shared/x", multi_node=True, on_this_machine=True) == "/mnt/shared/x"
    with pytest.raises(SubmitError, match="needs --output as an absolute path that every node mounts"):
        check_output(None, multi_node=True, on_this_machine=True)
    with pytest.raises(SubmitError, match="needs --output as an absolute path that every node mounts"):
        check_output("outputs", multi_node=True, on_this_machine=False)
    with pytest.raises(SubmitError, match="exists on the head node"):
        check_output("outputs", multi_node=False, on_this_machine=False)
    with pytest.raises(SubmitError, match="exists on the head node"):
        check_output("~/outputs", multi_node=False, on_this_machine=False)
    with pytest.raises(SubmitError, match="mount the bucket on every node"):
        check_output("s3://bucket/gpt2exp", multi_node=True, on_this_machine=False)


def test_addresses() -> None:
    assert resolve_address("head:8265/") == "http://head:8265"
    assert resolve_address("https://ray.example.com") == "https://ray.example.com"
    with pytest.raises(SubmitError, match="Ray Client address"):
        resolve_address("ray://head:10001")
    with pytest.raises(SubmitError, match="GCS port"):
        resolve_address("head:6379")


def test_the_package_holds_the_project_and_the_effective_spec(tmp_path: Path) -> None:
    """What the job gets: gpt2exp, the experiments, the effective spec; not the venv, tests or outputs."""
    spec_yaml = effective_spec_yaml(QUICKSTART, ["model.n_layer=1", "parallel.launcher=ray"])
    assert load_spec(QUICKSTART, ["model.n_layer=1", "parallel.launcher=ray"]) == validate_spec(
        __import__("yaml").safe_load(spec_yaml)
    )
    sid = new_submission_id("quickstart")
    package = build_package(ROOT, f"{sid}.yaml", spec_yaml, tmp_path / "p.zip")
    names = zipfile.ZipFile(package).namelist()
    assert f"{SPEC_DIR}/{sid}.yaml" in names
    assert {"gpt2exp/cli/__init__.py", "gpt2exp/jobs/submit.py", "experiments/quickstart.yaml"} <= set(names)
    assert not [n for n in names if n.startswith((".venv/", ".git/", "tests/", "outputs/")) or "__pycache__" in n]
    assert package.stat().st_size < 5 * 1024**2

    other = tmp_path / "elsewhere"  # a folder without the package: gpt2exp is added to the upload
    other.mkdir()
    (other / "data.txt").write_text("hello")
    names = zipfile.ZipFile(build_package(other, "s.yaml", spec_yaml, tmp_path / "q.zip")).namelist()
    assert {"data.txt", "gpt2exp/__init__.py", "gpt2exp/cli/__init__.py", f"{SPEC_DIR}/s.yaml"} <= set(names)


SECRETS = [
    ".env",
    ".env.production",
    ".ray/auth_token",
    "id_rsa",
    "keys/id_ed25519.pub",
    "server.pem",
    "tls/site.key",
    "credentials.json",
    "conf/aws_credentials",
    ".git/config",
    ".venv/bin/python",
]
KEPT = ["train.py", "data/corpus.txt", "keyboard.txt", "environment.yaml", "docs/ids.md"]


def _project(folder: Path) -> Path:
    """A project folder with secrets lying about, and an ignore file that tries to bring some back."""
    for name in [*SECRETS, *KEPT]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"contents of {name}\n")
    (folder / ".rayignore").write_text("!.env\n!id_rsa\n!*.pem\n")
    return folder


def test_the_package_never_holds_secrets(tmp_path: Path) -> None:
    folder = _project(tmp_path / "project")
    with zipfile.ZipFile(build_package(folder, "s.yaml", "name: s\n", tmp_path / "p.zip")) as z:
        names = set(z.namelist())
    assert set(KEPT) <= names
    assert not [n for n in names if any(n == s or n.startswith(s.split("/")[0] + "/") for s in SECRETS)], sorted(names)


def test_dry_run_lists_the_upload_and_the_entrypoint_without_a_cluster(tmp_path: Path) -> None:
    _needs_cli()
    folder, out = _project(tmp_path / "project"), tmp_path / "out"
    common = ["--dry-run", "--working-dir", str(folder), "--address", "http://127.0.0.1:9", "--output", str(out)]
    r = cli("submit", str(QUICKSTART), "--set", "model.n_layer=1", "--submission-id", "gpt2exp-dry", *common, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # port 9: any contact would have failed
    lines = r.stdout.splitlines()
    assert lines[:2] == [
        "dry run, nothing sent: job gpt2exp-dry (quickstart, 2 variant(s)) on a cluster of one node on this machine",
        f"entrypoint: python -m gpt2exp.cli run .gpt2exp-submit/gpt2exp-dry.yaml --launcher ray --output {out} --no-progress",
    ]
    files = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in lines[3:]}
    total = re.fullmatch(rf"upload from {re.escape(str(folder))}: (\d+) file\(s\), ([\d,]+) bytes \([\d,]+ zipped\)", lines[2])
    assert total and int(total[1]) == len(files) and int(total[2].replace(",", "")) == sum(files.values()), lines[2]
    assert {*KEPT, ".rayignore", ".gpt2exp-submit/gpt2exp-dry.yaml", "gpt2exp/cli/__init__.py"} <= set(files)
    assert files["train.py"] == len("contents of train.py\n")
    assert not set(files) & set(SECRETS)

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "stages": [{"name": "t", "kind": "run", "spec": str(QUICKSTART)}]}))
    r = cli("pipeline", "submit", str(pipeline), "--submission-id", "gpt2exp-p", "--autoscaling", *common, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == (
        f"entrypoint: python -m gpt2exp.jobs.checked_run {out} pipeline run .gpt2exp-submit/gpt2exp-p.yaml "
        f"--launcher ray --output {out} --no-progress"
    )


def test_entrypoint_is_quoted_and_checks_sharing_on_several_nodes() -> None:
    assert entrypoint(".gpt2exp-submit/a.yaml", "/out dir", check_shared=False) == (
        "python -m gpt2exp.cli run .gpt2exp-submit/a.yaml --launcher ray --output '/out dir' --no-progress"
    )
    assert entrypoint("s.yaml", "/mnt/x", check_shared=True) == (
        "python -m gpt2exp.jobs.checked_run /mnt/x run s.yaml --launcher ray --output /mnt/x --no-progress"
    )
    assert entrypoint("p.yaml", "/o", False, ["pipeline", "run"], ["--from", "a b"]) == (
        "python -m gpt2exp.cli pipeline run p.yaml --launcher ray --output /o --no-progress --from 'a b'"
    )


def test_checked_run_hands_over_to_the_cli_in_its_process(tmp_path: Path) -> None:
    """``python -m gpt2exp.jobs.checked_run OUT ARGS``: once the shared-folder check passes (stubbed here: it needs a
    cluster), ``gpt2exp ARGS`` runs in the same process, with its output and exit code; a failed check runs nothing."""
    stub = "import sys; from gpt2exp.jobs import checked_run as c; c.check_shared = lambda output: {}; sys.exit(c.main(sys.argv[1:]))"

    def checked_run(check_code: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", stub.format(check_code), str(tmp_path), *args],
            cwd=ROOT,
            env=CLI_ENV | {"COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = checked_run(0, "validate", str(QUICKSTART))
    assert ok.returncode == 0 and "quickstart: 2 variant(s)" in ok.stdout, ok.stderr
    missing = tmp_path / "nope.yaml"
    bad = checked_run(0, "validate", str(missing))
    assert bad.returncode == 2 and bad.stderr.strip() == f"{missing}: no such file"
    not_shared = checked_run(2, "validate", str(QUICKSTART))
    assert not_shared.returncode == 2 and not_shared.stdout == ""
    usage = subprocess.run([sys.executable, "-m", "gpt2exp.jobs.checked_run"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: python -m gpt2exp.jobs.checked_run OUTPUT_FOLDER")


def test_error_line_prefers_gpt2exp_errors() -> None:
    logs = "Running entrypoint\nquickstart: 2 run(s)\nerror: data.path: 'x' does not exist\n"
    assert error_line(logs, "Job entrypoint command failed with exit code 2") == "data.path: 'x' does not exist"
    assert error_line("Traceback\n  File x\nValueError: bad\n", None) == "ValueError: bad"
    assert error_line("", "runtime_env setup failed: no pip\nmore") == "runtime_env setup failed: no pip"
    logs = "Running entrypoint for job j: python -m x\nIntel oneMKL FATAL ERROR: Cannot load x.so.\n"
    assert error_line(logs, "Job entrypoint command failed with exit code 2") == "Intel oneMKL FATAL ERROR: Cannot load x.so."
