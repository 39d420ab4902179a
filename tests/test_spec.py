"""Experiment specs: loading, overrides, variant expansion, and errors a user can act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpt2exp import ExperimentSpec, ModelSpec, SpecError, load_spec
from gpt2exp.cli import app

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides)
    return info.value.lines()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_shipped_experiments_validate(path: Path) -> None:
    spec = load_spec(path)
    assert len(spec.expand()) >= 2
    assert spec.baseline_name in [v.name for v in spec.expand()]
    assert len(set(spec.train.run_seeds)) >= 3  # a verdict needs seeds


def test_gqa_grid_expands_to_named_validated_variants() -> None:
    spec = load_spec(REPO / "experiments" / "gqa_vs_mha.yaml")
    variants = spec.expand()
    assert [v.name for v in variants] == ["n_kv_head=8", "n_kv_head=2", "n_kv_head=1"]
    assert [v.spec.model.attention_kind for v in variants] == ["MHA", "GQA-2", "MQA"]
    assert all(v.spec.model.n_layer == spec.model.n_layer for v in variants)
    assert all(not v.spec.variants and not v.spec.grid for v in variants)


def test_variants_cross_grid_and_override_base(tmp_path: Path) -> None:
    spec = load_spec(
        write(
            tmp_path,
            """
name: t
model: {n_layer: 2, n_head: 4, n_embd: 64, block_size: 64}
train: {max_steps: 5}
variants:
  - {name: small, set: {model.n_layer: 1}}
  - {name: windowed, set: {model.sliding_window: 16}}
grid: {model.positional: [rope, alibi]}
""",
        ),
        ["model.n_head=2", "train.lr=1e-3"],
    )
    names = [v.name for v in spec.expand()]
    assert names == ["small+positional=rope", "small+positional=alibi", "windowed+positional=rope", "windowed+positional=alibi"]
    first = spec.expand()[0].spec
    assert (first.model.n_layer, first.model.n_head, first.model.positional, first.train.lr) == (1, 2, "rope", 1e-3)
    assert spec.expand()[3].spec.model.sliding_window == 16
    assert spec.expand()[3].spec.model.n_kv_head == 2  # default follows the overridden n_head


def test_no_variants_gives_base_and_defaults_are_gpt2_small(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "name: t\ntrain: {max_steps: 1}\n"))
    assert [v.name for v in spec.expand()] == ["base"]
    assert spec.model == ModelSpec() and spec.model.n_kv_head == 12
    assert spec.data.builtin == "shakespeare"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (
            "name: t\ntrain: {max_steps: 1}\nmodel: {n_kv_head: 5}\n",
            (),
            "model.n_kv_head: n_head=12 is not divisible by n_kv_head=5",
        ),
        ("name: t\ntrain: {max_steps: 1}\nmodel: {n_head: 5}\n", (), "model.n_embd: n_embd=768 is not divisible by n_head=5"),
        (
            "name: t\ntrain: {max_steps: 1}\nmodel: {n_embd: 36, n_head: 4, positional: rope}\n",
            (),
            "model.positional: rope needs an even",
        ),
        (
            "name: t\ntrain: {max_steps: 1}\nmodel: {block_size: 64, sliding_window: 65}\n",
            (),
            "model.sliding_window: sliding_window=65",
        ),
        ("name: t\ntrain: {max_steps: 1}\nparallel: {strategy: fsdp}\n", (), "parallel.num_workers: fsdp shards over workers"),
        (
            "name: t\ntrain: {max_steps: 1}\nparallel: {num_workers: 2, strategy: ddp}\n",
            (),
            "parallel.num_workers: launcher local",
        ),
        ("name: t\ntrain: {max_steps: 1, max_tokens: 5}\n", (), "train: give one budget"),
        ("name: t\ntrain: {}\n", (), "train: no budget"),
        ("name: t\ntrain: {max_steps: 1}\nmodel: {n_layers: 2}\n", (), "model.n_layers: unknown field"),
        ("name: t\ntrain: {max_steps: 1}\n", ("model.positional=xpos",), "model.positional: Input should be"),
        ("name: t\ntrain: {max_steps: 1}\n", ("model.n_layer",), "--set: 'model.n_layer' is not KEY=VALUE"),
        ("name: t\ntrain: {max_steps: 1}\ngrid: {model.nope: [1]}\n", (), "grid: 'model.nope' is not a spec field"),
        ("name: t\ntrain: {max_steps: 1}\nbaseline: zzz\n", (), "baseline: 'zzz' is not one of the variants"),
        ("name: t\ntrain: {max_steps: 1}\ndata: {path: a.txt, builtin: shakespeare}\n", (), "data: give exactly one data source"),
        ("name: t\ntrain: {max_steps: [1\n", (), "invalid YAML"),
        ("- just\n- a list\n", (), "a spec is a YAML mapping"),
    ],
)
def test_bad_specs_name_the_field_and_the_fix(tmp_path: Path, text: str, overrides: tuple[str, ...], expected: str) -> None:
    lines = problems(tmp_path, text, overrides)
    assert any(line.startswith(f"{tmp_path / 'spec.yaml'}: ") and expected in line for line in lines), lines


def test_bad_variant_is_reported_with_its_name(tmp_path: Path) -> None:
    lines = problems(tmp_path, "name: t\ntrain: {max_steps: 1}\ngrid: {model.n_kv_head: [12, 5, 7]}\n")
    assert [line.split(": ")[1] for line in lines] == [
        "variants[n_kv_head=5].model.n_kv_head",
        "variants[n_kv_head=7].model.n_kv_head",
    ]


def test_several_cross_section_problems_are_all_reported(tmp_path: Path) -> None:
    text = "name: t\ntrain: {max_steps: 1, batch_size: 6}\nparallel: {launcher: ray, strategy: ddp, num_workers: 4}\n"
    lines = problems(tmp_path, text + "grid: {model.bogus: [1]}\n")
    assert len(lines) == 2 and "train.batch_size: 6 is not a multiple" in lines[0] and "grid: 'model.bogus'" in lines[1]


def test_global_batch_is_split_over_workers_and_accumulation(tmp_path: Path) -> None:
    text = "name: t\ntrain: {max_steps: 1, batch_size: 32, micro_batch_size: 4}\nparallel: {launcher: ray, strategy: ddp, num_workers: 2}\n"
    spec = load_spec(write(tmp_path, text))
    assert (spec.micro_batch_size, spec.grad_accum_steps) == (4, 4)


def test_cli_validate_prints_variants_and_exits_zero() -> None:
    result = CliRunner().invoke(app, ["validate", str(REPO / "experiments" / "positional.yaml")])
    assert result.exit_code == 0, result.output
    for name in ("positional=learned", "positional=rope", "positional=alibi", "positional=none"):
        assert name in result.output
    assert "7,248,640" in result.output and "7,232,256" in result.output  # learned adds block_size x n_embd = 16,384


def test_cli_bad_spec_exits_2_with_one_line_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\ntrain: {max_steps: 1}\nmodel: {n_kv_head: 5}\n")
    proc = subprocess.run([sys.executable, "-m", "gpt2exp.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{path}: model.n_kv_head: n_head=12 is not divisible by n_kv_head=5; use one of [1, 2, 3, 4, 6, 12]"
    ]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_schema_is_json_schema_of_the_spec() -> None:
    result = CliRunner().invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert schema["title"] == "ExperimentSpec" and schema["additionalProperties"] is False
    assert "n_kv_head" in schema["$defs"]["ModelSpec"]["properties"]


def test_spec_round_trips_through_yaml() -> None:
    spec = load_spec(REPO / "experiments" / "gqa_vs_mha.yaml")
    again = ExperimentSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again == spec


def test_validate_imports_no_torch() -> None:
    """``gpt2exp validate`` computes sizes from the spec alone: torch (seconds to import) stays unloaded."""
    code = (
        "import sys\n"
        "from gpt2exp.cli import app\n"
        "try:\n"
        "    app(['validate', 'experiments/quickstart.yaml'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quickstart" in done.stdout and "torch loaded: False" in done.stdout
