"""The README holds on a fresh checkout: every ``gpt2exp`` command in its shell blocks is one the CLI accepts
(subcommand, options, choices, arguments; parsed by the real Typer app without running it), every spec and
pipeline file it names validates, and the cheap commands (validate, schema) run for real. The commands that
train (the quick start, then compare, generate and evaluate with the model it registers) are run for real by
``.ci/readme``, which CI runs after the tests."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer._click.exceptions import UsageError  # Typer's own click: the errors its parser raises

from gpt2exp.cli import app

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {  # what the README writes for a value the reader fills in
    "ID": "gpt2exp-quickstart-20260101-000000",
    "SPEC": "experiments/quickstart.yaml",
    "PIPELINE": "pipelines/attention_study.yaml",
    "runs:/<id>/model": "runs:/0123456789abcdef0123456789abcdef/model",
}


def readme_commands(text: str) -> list[str]:
    """The ``gpt2exp ...`` (and ``torchrun ... -m gpt2exp.cli ...``) command lines of the README's shell blocks,
    continuation lines joined, comments and ``[optional ...]`` parts removed, ``a|b`` choices as their first."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            line = re.sub(r"\s*\[[^\]]*\]", "", line)  # [--launcher local|ray] [--set k=v ...]: optional
            line = re.sub(r"(\S+)\|\S+", r"\1", line)
            if line.startswith("ID=$("):
                line = line.removeprefix("ID=$(").removesuffix(")")
            if line.startswith("gpt2exp ") or " -m gpt2exp.cli " in line:
                commands.append(line)
    return commands


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def _argv(command: str) -> list[str]:
    words = shlex.split(command.split(" > ")[0])
    words = words[words.index("gpt2exp.cli") + 1 :] if "gpt2exp.cli" in words else words[1:]
    return [PLACEHOLDERS.get(w, w) for w in words]


def test_the_readme_has_the_commands_it_should() -> None:
    assert len(COMMANDS) >= 25
    firsts = {_argv(c)[0] for c in COMMANDS}
    assert {"run", "validate", "compare", "generate", "evaluate", "ui", "submit", "jobs", "pipeline"} <= firsts


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command: str) -> None:
    """Each command line parses against the real CLI: its subcommands exist, its options exist and take the
    values given, its arguments are all there."""
    cmd, name, args, ctx = typer.main.get_command(app), "gpt2exp", _argv(command), None
    while True:
        try:
            ctx = cmd.make_context(name, args, parent=ctx)  # raises on an unknown option, a bad choice, a missing argument
        except typer.Exit as e:  # an eager option that did its work (--version)
            assert e.exit_code == 0, command
            return
        if not hasattr(cmd, "commands"):
            break
        name, *args = [*ctx._protected_args, *ctx.args]  # a group: on to its subcommand
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"{command}: no command {name!r}"
        cmd = sub
    assert not ctx.args, f"{command}: arguments left over: {ctx.args}"


def test_a_wrong_command_does_not_parse() -> None:
    """The check above has teeth: an unknown option, a bad choice, a missing argument are refused."""
    for wrong in ("gpt2exp run experiments/quickstart.yaml --bogus", "gpt2exp jobs nosuch", "gpt2exp run"):
        with pytest.raises((UsageError, AssertionError)):
            test_every_readme_command_parses(wrong)


def _files_named() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"\b((?:experiments|pipelines|examples)/[\w.-]+\.ya?ml)\b", text)))


@pytest.mark.parametrize("path", _files_named())
def test_every_spec_and_pipeline_the_readme_names_exists_and_validates(path: str) -> None:
    from gpt2exp.pipeline.spec import load_pipeline
    from gpt2exp.spec import load_spec

    file = ROOT / path
    assert file.is_file(), f"README names {path}, which does not exist"
    if "kind: kuberay" in file.read_text() or path.endswith(("ray-cluster.yaml", "kuberay-cluster.yaml")):
        return  # a Ray cluster definition, not a spec
    (load_pipeline if path.startswith("pipelines/") else load_spec)(file)


def test_the_cheap_readme_commands_run(tmp_path: Path) -> None:
    """validate and schema, exactly as written, from the repository root."""
    ran = 0
    for command in COMMANDS:
        argv = _argv(command)
        if argv[0] in ("validate", "schema") or argv[:2] == ["pipeline", "schema"]:
            done = subprocess.run(
                [sys.executable, "-m", "gpt2exp.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
            assert done.stdout.strip(), command
            ran += 1
    assert ran >= 4
