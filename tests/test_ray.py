"""The Ray launcher on a real local Ray cluster (127.0.0.1): DDP and FSDP with 2 CPU workers follow
the single-process loss curve, FSDP's consolidated weights load into a plain GPT, and a killed
worker is replaced and training resumes from the last checkpoint; the private cluster leaves nothing
behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from gpt2exp.data.loader import EvalWindows
from gpt2exp.launch.plan import make_plan
from gpt2exp.launch.runner import read_metrics, run_plan
from gpt2exp.spec import validate_spec
from gpt2exp.training.checkpoint import load_final
from gpt2exp.training.evaluate import score_windows

pytestmark = pytest.mark.slow

SPEC = {
    "name": "dp",
    "data": {"path": "CORPUS"},
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {
        "max_steps": 16,
        "batch_size": 8,
        "lr": 2e-2,
        "warmup_steps": 2,
        "eval_interval": 8,
        "eval_tokens": 256,
        "log_interval": 2,
        "checkpoint_interval": 4,
    },
    "parallel": {"launcher": "ray"},
    "variants": [
        {"name": "single", "set": {}},
        {"name": "ddp", "set": {"parallel.strategy": "ddp", "parallel.num_workers": 2}},
        {"name": "fsdp", "set": {"parallel.strategy": "fsdp", "parallel.num_workers": 2}},
    ],
}


@pytest.fixture(scope="module")
def ray_cluster() -> None:
    """A private Ray cluster on 127.0.0.1 with this machine's CPUs, as the launcher starts it."""
    import ray

    from gpt2exp.launch.cluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(corpus_head) -> Path:
    return corpus_head(300_000)


def spec_for(corpus: Path, **train: object) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(SPEC))
    raw["data"]["path"] = str(corpus)
    raw["train"].update(train)
    return raw


@pytest.fixture(scope="module")
def data_parallel(ray_cluster: None, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, object]:
    plan = make_plan(validate_spec(spec_for(corpus)), tmp_path_factory.mktemp("dp"), show_progress=False)
    return run_plan(plan, "ray", show_progress=False), plan


def test_ddp_and_fsdp_follow_the_single_process_curve(data_parallel: tuple[pd.DataFrame, object]) -> None:
    results, plan = data_parallel
    assert results.status.tolist() == ["completed"] * 3, results.error.tolist()
    curves = {job.variant: read_metrics(job).set_index("step") for job in plan.jobs}
    assert curves["single"].index.tolist() == list(range(2, 17, 2))
    for name in ("ddp", "fsdp"):
        assert curves[name].index.tolist() == curves["single"].index.tolist()
        assert (curves[name].train_loss - curves["single"].train_loss).abs().max() < 1e-3, name  # float reduction order differs
        assert (curves[name].val_loss - curves["single"].val_loss).dropna().abs().max() < 1e-3, (
            name
        )  # float reduction order differs
    assert curves["single"].train_loss.iloc[-1] < curves["single"].train_loss.iloc[0] - 1


def test_fsdp_consolidated_weights_load_into_a_plain_gpt(data_parallel: tuple[pd.DataFrame, object]) -> None:
    results, plan = data_parallel
    job = next(j for j in plan.jobs if j.variant == "fsdp")
    model = load_final(Path(job.run_dir) / "final").eval()
    loss, _ = score_windows(
        model, EvalWindows(job.val_tokens, 32), job.spec.train.final_eval_budget(16 * 8 * 32), 8, torch.device("cpu")
    )
    assert loss == pytest.approx(results.set_index("variant").val_loss["fsdp"], abs=1e-4)


def _kill_a_worker_after(checkpoint_glob: str, root: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(root.glob(checkpoint_glob)):
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
            return


def test_killed_worker_is_replaced_and_resumes(data_parallel: tuple[pd.DataFrame, object], corpus: Path, tmp_path: Path) -> None:
    raw = spec_for(corpus)
    raw["variants"] = [SPEC["variants"][1]]
    raw["parallel"]["max_failures"] = 1
    plan = make_plan(validate_spec(raw), tmp_path, show_progress=False)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after, args=("ray/*/ddp-seed1337-step_00000004", plan.out_dir, killed))
    killer.start()
    results = run_plan(plan, "ray", show_progress=False)
    killer.join()
    assert killed, "no worker was killed"
    assert results.status.tolist() == ["completed"], results.error.tolist()
    reference = data_parallel[0].set_index("variant")
    assert results.train_loss[0] == pytest.approx(reference.train_loss["ddp"], abs=1e-4)
    assert results.val_loss[0] == pytest.approx(reference.val_loss["ddp"], abs=1e-4)
    assert read_metrics(plan.jobs[0]).step.tolist()[-1] == 16
    assert not psutil.pid_exists(killed[0])


def test_workers_log_into_the_experiment_store_only(data_parallel: tuple[pd.DataFrame, object]) -> None:
    """Rank 0 runs in Ray Train's working folder: closing its MLflow logger must not create a store there."""
    import ray

    assert not list(Path(ray._private.worker._global_node.get_session_dir_path()).rglob("mlflow.db"))


OWN_CLUSTER = """
import psutil, ray
from gpt2exp.launch.cluster import ensure_ray
from gpt2exp.launch.ray import ProgressBus
ensure_ray()
ray.get(ProgressBus.remote().drain.remote())
print(*[p.pid for p in psutil.Process().children(recursive=True)])
"""


DRIVER = """
import sys
import gpt2exp.cli, gpt2exp.launch.ray, gpt2exp.launch.runner, gpt2exp.report, gpt2exp.tracking.runs
from gpt2exp.launch.torch_backend import LateTorchConfig
config = LateTorchConfig(backend="gloo")  # what the driver's fit and the controller use of it
config.backend_cls(), config.train_func_context(), config.framework
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(("gpt2exp.model", "gpt2exp.training.loop"))))
"""


def test_ray_driver_loads_no_torch() -> None:
    """The driver of a Ray run (and the Train controller, which unpickles the lane trainer's backend
    config from ``gpt2exp.launch.torch_backend``) leave torch and the model to the workers: loading
    them costs seconds of CPU on the path to the first step."""
    out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("empty", [False, True], ids=["missing", "empty"])
def test_bad_data_is_one_line_and_ray_starts_only_for_a_file(tmp_path: Path, empty: bool) -> None:
    """A data path that names nothing is a one-line error (exit 2) before Ray starts; an empty file is
    found once Ray runs beside the data preparation, and is still the only line (no Ray notices)."""
    data = tmp_path / "corpus.txt"
    if empty:
        data.write_text("")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "data": {"path": str(data)}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "ray")}
    out = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "run", str(spec), "--output", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    expected = (
        f"error: data.path {str(data)!r}: no text (1 file(s), all empty); give a non-empty UTF-8 text file"
        if empty
        else f"error: data.path: {str(data)!r} does not exist; give a text file, a folder of .txt/.md files or a glob like 'texts/*.txt'"
    )
    assert (out.stdout + out.stderr).strip().splitlines() == [expected]
    assert (tmp_path / "ray").exists() == empty  # Ray's session folder


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_private_cluster_goes_with_its_driver() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", OWN_CLUSTER], env=env, capture_output=True, text=True, timeout=300, check=True)
    pids = [int(pid) for pid in out.stdout.split()]
    assert len(pids) >= 4, out.stdout  # GCS, raylet, their helpers, the actor's worker
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"Ray processes left behind: {alive}"
