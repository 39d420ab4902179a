"""The Ray launcher on a real local Ray cluster (127.0.0.1): DDP and FSDP with 2 CPU workers follow
the single-process loss curve, FSDP's consolidated weights load into a plain GPT, and a killed
worker is replaced and training resumes from the last checkpoint; the private cluster listens on
loopback only and leaves nothing behind, even when its run is killed."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
from gpt2exp.launch.progress import read_metrics
from gpt2exp.launch.runner import run_plan
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
    return run_plan(plan, "ray", show_progress=False).runs, plan


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
    results = run_plan(plan, "ray", show_progress=False).runs
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
light = ("gpt2exp.model", "gpt2exp.model.size")  # the lazy package and the torch-free size arithmetic (plan's FLOP budget)
heavy = [m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(("gpt2exp.model", "gpt2exp.training.loop"))]
print(sorted(m for m in heavy if m not in light))
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


def _listening(processes: list[psutil.Process]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``processes``."""
    out = set()
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out |= {(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    return out


def _loopback(ip: str) -> bool:
    """``127.x``, ``::1``, or ``::ffff:127.x`` (an IPv4 loopback address on an IPv6 socket)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _of_session(temp: str) -> list[psutil.Process]:
    """Processes whose command line names the Ray temp folder ``temp`` (unique to one run)."""
    return [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_killed_run_leaves_no_ray_process_and_listened_on_loopback_only(corpus: Path, tmp_path: Path, sig: int) -> None:
    """``gpt2exp run`` with a private Ray, killed while a 2-worker DDP group trains: while it runs, every socket of
    its processes listens on loopback (the rendezvous store of rank 0 too); within 10 s of the signal the driver
    has exited (130, interrupted; SIGKILL: killed) and no process of its Ray is left (its descendants, or any
    process naming its Ray temp folder)."""
    raw = spec_for(corpus, max_steps=100000, checkpoint_interval=100000)
    raw["variants"] = [SPEC["variants"][1]]
    raw["tracking"] = {"enabled": False}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    temp = tempfile.mkdtemp(prefix="gk-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp}
    cmd = [sys.executable, "-m", "gpt2exp.cli", "run", str(spec), "--output", str(tmp_path / "out"), "--no-progress"]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not any(f.stat().st_size for f in (tmp_path / "out").rglob("metrics.jsonl")):
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        listening = _listening(tree)
        assert listening and all(_loopback(ip) for ip, _, _ in listening), sorted(listening)

        driver.send_signal(sig)
        t0 = time.monotonic()
        while (left := [p for p in {*tree, *_of_session(temp)} if _alive(p.pid)]) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        print(f"{signal.Signals(sig).name}: {len(tree)} process(es) gone in {time.monotonic() - t0:.1f} s")
        assert not left, [(p.pid, " ".join(p.cmdline())[:120]) for p in left if _alive(p.pid)]
        if sig == signal.SIGKILL:  # no handler runs: the private cluster's watchdog cleans up
            assert driver.wait(timeout=5) == -signal.SIGKILL
        else:
            assert driver.wait(timeout=5) == 130, log.read_text()[-3000:]
            assert "error: interrupted: rerun the same command to resume" in log.read_text()
    finally:
        for p in {*tree, *_of_session(temp)}:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)
