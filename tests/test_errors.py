"""Bad input of every kind ends in one ``error:`` line (or ``FILE: path: reason`` lines), exit code 1
or 2 and no traceback; numbers, names and expansions are bounded; sizes come from the spec alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gpt2exp import cli
from gpt2exp.cli import experiment
from gpt2exp.errors import Gpt2expError, check_inside
from gpt2exp.spec import ModelSpec

OK = "name: t\ntrain: {max_steps: 1}\n"


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def check(result: Result | subprocess.CompletedProcess[str], expected: str, code: int = 2, file: Path | None = None) -> None:
    """Exit ``code``, no traceback, and on stderr one ``error:`` line (or only ``FILE: ...`` lines when
    ``file`` is given) that says ``expected``."""
    if isinstance(result, Result):
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        rc, stdout = result.exit_code, result.stdout
    else:
        rc, stdout = result.returncode, result.stdout
    lines = result.stderr.strip().splitlines()
    assert rc == code and "Traceback" not in stdout + result.stderr, (rc, result.stderr)
    if file is None:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    else:
        assert lines and all(line.startswith(f"{file}: ") for line in lines), result.stderr
    assert expected in result.stderr, result.stderr


def invoke(*args: str) -> Result:
    """The CLI in this process: ``app`` is what ``gpt2exp`` (``cli.main``) runs, its group the one error path."""
    return CliRunner().invoke(cli.app, list(args))


def validate(path: Path, expected: str, *sets: str) -> None:
    check(invoke("validate", str(path), *(a for s in sets for a in ("--set", s))), expected, file=path)


# ------------------------------------------------------------------------------ reading files
def test_binary_spec(tmp_path: Path) -> None:
    validate(write(tmp_path, bytes(range(256)) * 4), "not UTF-8 text")


def test_non_utf8_spec(tmp_path: Path) -> None:
    validate(write(tmp_path, "name: t\ndescription: café\n".encode("latin-1")), "line 2: not UTF-8 text (byte 0xe9")


def test_nul_bytes_in_utf8_spec(tmp_path: Path) -> None:
    validate(write(tmp_path, b"name: t\x00\n"), "line 1: invalid YAML: unacceptable character #x0000")


def test_bad_set_value_names_the_item(tmp_path: Path) -> None:
    validate(write(tmp_path, OK), "--set: 'model.n_layer=[1': invalid YAML", "model.n_layer=[1")


def test_yaml_nested_1000_levels(tmp_path: Path) -> None:
    validate(write(tmp_path, OK + "description: " + "[" * 1000 + "]" * 1000 + "\n"), "invalid YAML: nested too deeply")


def test_duplicate_keys_are_refused_with_their_lines(tmp_path: Path) -> None:
    validate(
        write(tmp_path, OK + "model: {n_layer: 2}\nmodel: {n_layer: 3}\n"),
        "line 4, column 1: invalid YAML: duplicate key 'model' (first on line 3)",
    )
    validate(write(tmp_path, OK + "model: {n_layer: 2, n_layer: 3}\n"), "duplicate key 'n_layer'")


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    base = "name: t\ntrain: &t {max_steps: 1, lr: 0.001}\nvariants:\n  - {name: a, set: {train.lr: 0.002}}\n"
    path = write(tmp_path, base + "x: {<<: *t, lr: 0.003}\n")
    check(invoke("validate", str(path)), "x: unknown field", file=path)  # and no "duplicate key"


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    validate(tmp_path / "a.yaml", "cannot read it: Too many levels of symbolic links")


def test_unreadable_spec(tmp_path: Path) -> None:
    path = write(tmp_path, OK)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: chmod does not stop reading")
    validate(path, "cannot read it: Permission denied")


def test_folder_and_missing_spec(tmp_path: Path) -> None:
    validate(tmp_path, "not a regular file")
    validate(tmp_path / "nope.yaml", "no such file")


def test_fifo_spec_returns_at_once(tmp_path: Path) -> None:
    """Through ``python -m gpt2exp.cli``, the real entry point: a FIFO must not block the read."""
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "validate", str(fifo)], capture_output=True, text=True, timeout=10
    )
    check(proc, "not a regular file (a folder, FIFO or device?)", file=fifo)


def test_bad_pipeline_files(tmp_path: Path) -> None:
    stages = "stages: [{name: p, kind: prepare}]\n"
    for text, expected in [
        (b"\xff\xfe", "not UTF-8 text"),
        ("name: p\nname: q\n" + stages, "duplicate key 'name'"),
        ("name: '..'\n" + stages, "'..' is not a name"),
        ("name: p\nstages: [{name: p, kind: generate, model: x, seed: -1}]\n", "stages.0.generate.seed: Input should be greater"),
    ]:
        path = write(tmp_path, text, "pipeline.yaml")
        check(invoke("pipeline", "status", str(path), "--output", str(tmp_path)), expected, file=path)


# ------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("train.lr", ".inf", "train.lr: Input should be a finite number"),
        ("train.lr", "1.0e+30", "train.lr: Input should be less than or equal to 10"),
        ("train.min_lr", ".nan", "train.min_lr: Input should be a finite number"),
        ("train.max_epochs", ".inf", "train.max_epochs: Input should be a finite number"),
        ("train.grad_clip", ".nan", "train.grad_clip: Input should be a finite number"),
        ("train.beta1", ".nan", "train.beta1: Input should be a finite number"),
        ("train.seed", "1.0e+30", "train.seed: "),
        ("train.seed", "4294967296", "train.seed: Input should be less than 4294967296"),
        ("train.seed", "-1", "train.seed: Input should be greater than or equal to 0"),
        ("model.rope_theta", ".inf", "model.rope_theta: Input should be a finite number"),
        ("model.dropout", ".nan", "model.dropout: Input should be a finite number"),
        ("parallel.peak_flops", ".inf", "parallel.peak_flops: Input should be a finite number"),
        ("model.n_embd", "100000000", "model.n_embd: Input should be less than or equal to 65536"),
    ],
)
def test_numbers_are_finite_and_bounded(tmp_path: Path, field: str, value: str, expected: str) -> None:
    validate(write(tmp_path, OK), expected, f"{field}={value}")


def test_inf_in_the_file(tmp_path: Path) -> None:
    validate(write(tmp_path, OK + "model: {rope_theta: .inf}\n"), "model.rope_theta: Input should be a finite number")


def test_budgets_are_capped(tmp_path: Path) -> None:
    validate(
        write(tmp_path, "name: t\ntrain: {max_tokens: 10000000000000000}\n"),
        "train.max_tokens: Input should be less than or equal to",
    )
    validate(
        write(tmp_path, "name: t\ntrain: {max_steps: 1000000001}\n"), "train.max_steps: Input should be less than or equal to"
    )


def test_huge_grid_is_refused_without_expanding(tmp_path: Path) -> None:
    values = "[" + ", ".join(str(i) for i in range(1, 1001)) + "]"
    start = time.monotonic()
    validate(
        write(tmp_path, OK + f"grid: {{model.n_layer: {values}, train.max_steps: {values}}}\n"),
        "grid: 1 x 1,000 x 1,000 x 1 (variants x grid values x seeds) = 1,000,000 runs; at most 1,000",
    )
    assert time.monotonic() - start < 10


def test_grid_with_repeated_value_is_refused(tmp_path: Path) -> None:
    validate(write(tmp_path, OK + "grid: {model.n_layer: [1, 1]}\n"), "variants: ['n_layer=1'] would each be made more than once")


def test_empty_grid_list_is_refused(tmp_path: Path) -> None:
    validate(write(tmp_path, OK + "grid: {model.n_layer: []}\n"), "grid.model.n_layer: no values")


def test_duplicate_seeds_are_refused(tmp_path: Path) -> None:
    validate(
        write(tmp_path, "name: t\ntrain: {max_steps: 1, seeds: [1, 2, 1]}\n"), "train.seeds: seeds [1] are given more than once"
    )


@pytest.mark.parametrize("name", [".", "..", "a" * 300, "-x", "a/b"])
def test_bad_names(tmp_path: Path, name: str) -> None:
    validate(write(tmp_path, f"name: '{name}'\ntrain: {{max_steps: 1}}\n"), "name: ")
    validate(write(tmp_path, OK + f"variants: [{{name: '{name}'}}]\n"), "variants.0.name: ")


def test_long_grid_made_name_asks_for_explicit_variants(tmp_path: Path) -> None:
    validate(write(tmp_path, OK + f"grid: {{data.path: [{'x' * 120}]}}\n"), "name the variants explicitly")


def test_check_inside(tmp_path: Path) -> None:
    assert check_inside(tmp_path, tmp_path / "exp" / "runs") == (tmp_path / "exp" / "runs").resolve()
    (tmp_path / "out").symlink_to("/")
    for path in (tmp_path / ".." / "x", tmp_path / "out" / "etc"):
        with pytest.raises(Gpt2expError, match="leads outside the output folder") as info:
            check_inside(tmp_path, path)
        assert info.value.code == 2


# -------------------------------------------------------------------------------- validate size
@pytest.mark.parametrize("model", ["{n_layer: 1000000}", "{n_embd: 1000000000000, n_head: 1}"])
def test_validate_refuses_absurd_models_at_once(tmp_path: Path, model: str) -> None:
    start = time.monotonic()
    validate(write(tmp_path, OK + f"model: {model}\n"), "Input should be less than or equal to")
    assert time.monotonic() - start < 10


def test_validate_largest_model_is_computed_not_built(tmp_path: Path) -> None:
    from gpt2exp.model.size import num_params

    largest = {"n_layer": 1000, "n_head": 1024, "n_embd": 2**16, "block_size": 2**20}  # 51.5T parameters
    start = time.monotonic()
    result = invoke("validate", str(write(tmp_path, OK + f"model: {largest}\n".replace("'", ""))))
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start < 10
    assert f"{num_params(ModelSpec(**largest)):,}" in result.output


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"tie_weights": False},
        {"n_kv_head": 2, "bias": False},
        {"n_kv_head": 1, "positional": "rope", "sliding_window": 8},
        {"positional": "sinusoidal", "tie_weights": False},
        {"positional": "alibi", "bias": False},
        {"positional": "none", "sliding_window": 16},
        {"mlp_hidden": 48},
        {"n_kv_head": 1, "mlp_hidden": 200, "bias": False, "tie_weights": False},
    ],
)
def test_analytic_size_equals_the_built_model(model: dict) -> None:
    import torch

    from gpt2exp.model import GPT
    from gpt2exp.model.size import flops_per_token, num_params

    spec = ModelSpec(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": 101, **model})
    with torch.device("meta"):
        gpt = GPT(spec)
    assert (num_params(spec), num_params(spec, exclude_embeddings=True)) == (gpt.num_params(), gpt.num_params(True))
    assert flops_per_token(spec) == gpt.flops_per_token()


# ------------------------------------------------------------------------------- the error path
def raising(exc: BaseException) -> Callable[..., None]:
    def load_spec(*_: object, **__: object) -> None:
        raise exc

    return load_spec


def failing_torch_load(tmp_path: Path) -> Exception:
    import torch

    path = write(tmp_path, b"not a checkpoint", "garbled.pt")
    try:
        torch.load(path)
    except Exception as e:  # whatever torch raises
        return e
    raise AssertionError("torch loaded garbage")


def test_library_and_os_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from safetensors import SafetensorError

    cases = [
        (PermissionError(13, "Permission denied", "/out/x"), 1, "error: /out/x: Permission denied"),
        (MlflowException("RESOURCE_DOES_NOT_EXIST: no run\nmore"), 1, "error: MlflowException: RESOURCE_DOES_NOT_EXIST: no run"),
        (SafetensorError("Error while deserializing header: header too large"), 1, "error: SafetensorError: Error while"),
        (failing_torch_load(tmp_path), 1, "error: UnpicklingError: "),
        (Gpt2expError("bad input", 2), 2, "error: bad input"),
        (
            ValueError("a bug [bold]x[/]\nline 2"),
            1,
            "error: unexpected ValueError: a bug [bold]x[/] (GPT2EXP_DEBUG=1 shows the traceback)",
        ),
    ]
    for exc, code, expected in cases:
        monkeypatch.setattr(experiment, "load_spec", raising(exc))
        result = invoke("validate", "x.yaml")
        check(result, expected, code)
        assert ("unexpected" in result.stderr) == expected.startswith("error: unexpected"), result.stderr


def test_ctrl_c_is_one_line_and_130(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experiment, "load_spec", raising(KeyboardInterrupt()))
    result = invoke("validate", "x.yaml")
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted"


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experiment, "load_spec", raising(RuntimeError("boom")))
    monkeypatch.setenv("GPT2EXP_DEBUG", "1")
    result = invoke("validate", "x.yaml")
    assert isinstance(result.exception, RuntimeError) and result.stderr == ""


def test_usage_errors_stay_typer_s() -> None:
    result = invoke("validate", "--bogus")
    assert result.exit_code == 2 and "No such option: --bogus" in result.output and "unexpected" not in result.output


def test_an_unreachable_tracking_server_is_one_line_within_seconds() -> None:
    t0 = time.perf_counter()
    check(invoke("compare", "x", "--tracking-uri", "http://127.0.0.1:1"), "no MLflow server answers", code=1)
    assert time.perf_counter() - t0 < 10  # MLflow's own client retries for minutes


def test_an_empty_prompt_starts_from_a_document_boundary(tmp_path: Path) -> None:
    from gpt2exp.model import GPT
    from gpt2exp.training.checkpoint import save_final

    spec = ModelSpec(vocab_size=50304, block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_final(tmp_path / "m", GPT(spec, seed=0), spec)
    result = invoke("generate", "--model-uri", str(tmp_path / "m"), "--prompt", "", "--max-new-tokens", "3", "--temperature", "0")
    assert result.exit_code == 0 and result.exception is None, (result.stderr, result.exception)
