"""The package's layout: no import cycles inside ``gpt2exp.report`` and ``gpt2exp.tracking`` (imports inside
functions count too: a cycle there is hidden until the function runs), read from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gpt2exp"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports, anywhere in it (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def cycles(package: str) -> list[list[str]]:
    """Import cycles among the modules of ``package`` (a package's ``__init__`` is left out: it only re-exports)."""
    files = {module_name(p): p for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"}
    graph = {name: imports(path, set(files)) - {name} for name, path in files.items()}
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state[nxt] == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name, [name])
    return found


@pytest.mark.parametrize("package", ["report", "tracking"])
def test_no_import_cycles(package: str) -> None:
    assert cycles(package) == []


def test_the_check_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "gpt2exp" / "p"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from gpt2exp.p.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from gpt2exp.p import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "gpt2exp")
    assert cycles("p") == [["gpt2exp.p.a", "gpt2exp.p.b", "gpt2exp.p.a"]]
