"""Property-based: whatever a careless or hostile user types (specs, pipeline files, ``--set`` values,
model URIs), the CLI answers with exit code 0, 1 or 2, and a failure is one ``error:`` line or only
``FILE: path: reason`` lines, never a traceback, within 10 s. Deterministic (``derandomize``), so
every CI run tries the same cases; the counts at the end show that most cases are refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gpt2exp import cli

pytestmark = pytest.mark.filterwarnings("ignore")

BASE: dict[str, Any] = {
    "name": "fuzz",
    "model": {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
    "train": {"max_steps": 2, "batch_size": 2},
    "grid": {"model.n_kv_head": [2, 1]},
}
FIELDS = [
    *(f"model.{k}" for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "positional")),
    *(f"model.{k}" for k in ("rope_theta", "sliding_window", "dropout", "bias", "tie_weights")),
    *(f"train.{k}" for k in ("max_steps", "max_tokens", "max_epochs", "batch_size", "micro_batch_size", "lr", "min_lr")),
    *(f"train.{k}" for k in ("warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "eval_tokens")),
    *(f"train.{k}" for k in ("seed", "seeds", "precision", "lr_schedule")),
    *(f"parallel.{k}" for k in ("launcher", "strategy", "num_workers", "gpus_per_worker", "peak_flops")),
    *(f"data.{k}" for k in ("path", "builtin", "val_fraction")),
    "name",
    "baseline",
    "variants",
    "grid",
    "grid.model.n_layer",
    "nonsense.field",
    "model.nonsense",
]
BAD_VALUES = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e30, -1, 0, 2**64, -(2**63), "..", ".", "", "x" * 300]),
    st.sampled_from([[], {}, [1, 1], [[1]], {"a": {"b": 1}}, None, True, "1e16", "/etc/passwd", "../../x"]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=4),
)
RUNNER = CliRunner()


def run_cli(*args: str) -> tuple[int, str]:
    """Invoke the CLI in this process; check the one-error-path contract; return (exit code, stderr)."""
    t0 = time.perf_counter()
    result = RUNNER.invoke(cli.app, list(args))
    assert time.perf_counter() - t0 < 10, args
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, (args, result.stderr)
    return result.exit_code, result.stderr


def one_error(file: Path, code: int, stderr: str) -> None:
    """A failure is one ``error:`` line, or ``FILE: ...`` lines naming the file."""
    if code == 0:
        return
    lines = stderr.strip().splitlines()
    assert lines, "a failure must say why"
    assert (len(lines) == 1 and lines[0].startswith("error: ")) or all(line.startswith(f"{file}: ") for line in lines), stderr


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = tree
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
    node[last] = value
    return tree


def dump(tree: Any) -> str:
    try:
        return yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        return repr(tree)


SPEC_TEXTS = st.one_of(
    st.builds(
        lambda path, value: dump(set_path(yaml.safe_load(yaml.safe_dump(BASE)), path, value)), st.sampled_from(FIELDS), BAD_VALUES
    ),
    st.text(max_size=200),
    st.builds(lambda n, open_: "a: " + open_ * n, st.integers(min_value=50, max_value=5000), st.sampled_from(["[", "{b: "])),
    st.builds(lambda key: f"name: a\n{key}: 1\n{key}: 2\ntrain: {{max_steps: 1}}\n", st.sampled_from(["name", "model", "x"])),
)
SPEC_BYTES = st.binary(max_size=300)
SETS = st.builds(
    lambda path, value: f"{path}={value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()}",
    st.sampled_from([*FIELDS, "", "=", "a..b", "model."]),
    st.one_of(BAD_VALUES, st.sampled_from(["[1", "{a: ", "!!python/object:os.system", "*x", "&a [*a]", "'"])),
)
PIPELINE_FIELDS = [
    "name",
    "stages",
    "stages.0",
    "tracking_uri",
    "stages.0.kind",
    "stages.0.name",
    "stages.1.spec",
    "stages.1.set",
]
MODEL_URIS = st.one_of(
    st.sampled_from(["runs:/", "runs:/x/model", "models:/", "models:/x@best", "models:/m-123", "s3://bucket/model"]),
    st.sampled_from(["gs://b/m", "file:///nonexistent", "http://127.0.0.1:1/x", "dbfs:/x", "", " ", "../../etc"]),
    st.builds(
        lambda scheme, rest: scheme + rest,
        st.sampled_from(["runs:/", "models:/", "", "/tmp/", "mlflow-artifacts:/"]),
        st.text(max_size=40),
    ),
)

FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
COUNTS: dict[str, list[int]] = {}


def count(kind: str, code: int) -> None:
    COUNTS.setdefault(kind, []).append(code)


@FUZZ
@given(text=SPEC_TEXTS)
def test_spec_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    code, stderr = run_cli("validate", str(path))
    one_error(path, code, stderr)
    count("spec", code)


@settings(FUZZ, max_examples=60)
@given(data=SPEC_BYTES)
def test_binary_spec_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    code, stderr = run_cli("validate", str(path))
    one_error(path, code, stderr)
    count("bytes", code)


@FUZZ
@given(item=SETS)
def test_set_values(tmp_path: Path, item: str) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    code, stderr = run_cli("validate", str(path), "--set", item)
    one_error(path, code, stderr)
    count("--set", code)


@settings(FUZZ, max_examples=100)
@given(where=st.sampled_from(PIPELINE_FIELDS), value=BAD_VALUES)
def test_pipeline_files(tmp_path: Path, where: str, value: Any) -> None:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(BASE))
    pipeline: dict[str, Any] = {
        "name": "fz",
        "stages": [{"name": "data", "kind": "prepare"}, {"name": "train", "kind": "run", "spec": "exp.yaml", "data": "data"}],
    }
    node: Any = pipeline
    *parents, last = where.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    path = tmp_path / "pipe.yaml"
    path.write_text(dump(pipeline))
    code, stderr = run_cli("pipeline", "status", str(path), "--output", str(tmp_path / "out"))
    one_error(path, code, stderr)
    count("pipeline", code)


@settings(FUZZ, max_examples=60)
@given(uri=MODEL_URIS)
def test_model_uris(tmp_path: Path, uri: str) -> None:
    code, stderr = run_cli(
        "generate", "--model-uri", uri, "--prompt", "ROMEO:", "--max-new-tokens", "1", "--output", str(tmp_path)
    )
    one_error(tmp_path, code, stderr)
    assert code != 0, uri  # no such model anywhere
    count("model uri", code)


def test_most_fuzzed_inputs_are_refused() -> None:
    """Runs after the fuzzers (file order): the corpus is mostly bad input, and bad input is refused."""
    total = sum(len(v) for v in COUNTS.values())
    if total == 0:
        pytest.skip("run with the fuzz tests")
    refused = sum(code != 0 for v in COUNTS.values() for code in v)
    print({k: f"{sum(c != 0 for c in v)}/{len(v)} refused" for k, v in COUNTS.items()})
    assert total >= 500 and refused / total > 0.8, COUNTS
