"""The house rules of CONTRIBUTING.md, checked on the real import graph (grimp, the graph import-linter uses):
the layer contracts in pyproject.toml hold, no module imports one that imports it back (imports inside
functions count; those under ``if TYPE_CHECKING`` do not), and no module grows past 400 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2exp"
MAX_LINES = 400


def test_the_layer_contracts_hold() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("gpt2exp", exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    cycles = [
        f"{a} -> {b} -> ... -> {a}"
        for a in modules
        for b in graph.find_modules_directly_imported_by(a)
        if b != "gpt2exp" and not a.startswith(f"{b}.") and graph.chain_exists(importer=b, imported=a)
    ]
    assert not cycles, "\n".join(cycles)


def test_no_module_over_400_lines() -> None:
    sizes = {str(f.relative_to(PACKAGE.parent)): len(f.read_text().splitlines()) for f in PACKAGE.rglob("*.py")}
    assert not {f: n for f, n in sizes.items() if n > MAX_LINES}, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
