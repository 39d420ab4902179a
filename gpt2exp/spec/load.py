"""Reading a spec: YAML (size, encoding, duplicate keys and depth checked), ``--set`` overrides, validation
of the base and every variant, and :class:`SpecError` with every problem as ``FILE: field.path: reason``."""

from __future__ import annotations

import itertools
import stat
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from gpt2exp.errors import INPUT, Gpt2expError
from gpt2exp.spec.experiment import ExperimentSpec, apply_overrides, set_dotted
from gpt2exp.spec.sections import MAX_YAML_BYTES


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        shown = repr(item if len(item) <= 80 else item[:60] + "...")
        if not eq or not key.strip():
            raise ValueError(f"{shown} is not KEY=VALUE (e.g. --set model.n_layer=4)")
        try:
            out[key.strip()] = parse_yaml(value) if value.strip() else None
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(f"{shown}: {yaml_problem(e, value)[1]}") from None
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # the base class says what is wrong with it
                continue
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (first on line {first_line[key]}); give each key once",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text to Python objects: the safe loader, duplicate keys refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only


def yaml_problem(e: yaml.YAMLError | RecursionError, text: str) -> tuple[str, str]:
    """(where, reason) for YAML that does not load: ``line L, column C`` when known, and one line of reason."""
    if isinstance(e, RecursionError):
        return "", "invalid YAML: nested too deeply; a spec is a few levels deep"
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
    elif isinstance(e, yaml.reader.ReaderError):
        where = f"line {text.count(chr(10), 0, e.position) + 1}"
    else:
        where = ""
    reason = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    return where, f"invalid YAML: {' '.join(str(reason).split())}"


class SpecError(Gpt2expError):
    """Invalid spec: a list of (field path, reason), printed one per line as ``FILE: path: reason`` (exit code 2)."""

    code = INPUT

    def __init__(self, problems: list[tuple[str, str]], file: str | Path | None = None) -> None:
        self.problems, self.file = problems, str(file) if file else None
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        prefix = f"{self.file}: " if self.file else ""
        return [f"{prefix}{path}: {reason}" if path else f"{prefix}{reason}" for path, reason in self.problems]


def field_problems(err: ValidationError, prefix: str = "", schema: str = "gpt2exp schema") -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (check the spelling; `{schema}` lists the fields)"
        for line in msg.split("\n"):  # cross-section checks report several "field.path: reason" lines
            path, reason = (loc, line) if loc or ": " not in line else line.split(": ", 1)
            out.append((".".join(p for p in (prefix, path) if p), reason))
    return out


def _read_text(path: Path) -> str:
    """A small UTF-8 text file; anything else (missing, not a regular file, unreadable, over 1 MiB,
    binary) is a SpecError. Checked before opening, so a FIFO or a device cannot block."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise SpecError([("", "not a regular file (a folder, FIFO or device?); give a YAML file")], path)
        with path.open("rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([("", "no such file")], path) from None
    except OSError as e:
        raise SpecError([("", f"cannot read it: {e.strerror or e}")], path) from None
    if len(data) > MAX_YAML_BYTES:
        raise SpecError([("", f"larger than {MAX_YAML_BYTES // 2**20} MiB; a spec is a small YAML text file")], path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        reason = f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a spec is a YAML text file"
        raise SpecError([(f"line {line}", reason)], path) from None


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (see ``_read_text`` and ``parse_yaml``); every problem is a SpecError."""
    text = _read_text(path)
    try:
        raw = parse_yaml(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise SpecError([yaml_problem(e, text)], path) from None
    if not isinstance(raw, dict):
        raise SpecError([("", what)], path)
    return raw


def load_spec(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ExperimentSpec:
    """Read, override (``a.b=value`` strings or a dict) and validate a spec, variants included."""
    path = Path(path)
    return override_and_validate(read_yaml(path, "a spec is a YAML mapping with name, data, model, train, ..."), overrides, path)


def override_and_validate(
    raw: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any] = (), file: str | Path | None = None, what: str = "--set"
) -> ExperimentSpec:
    """Apply dotted overrides to a raw spec mapping (in place) and validate it; a bad override is a ``what`` problem."""
    try:
        ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        for key, value in ov.items():
            set_dotted(raw, key, value)
    except ValueError as e:
        raise SpecError([(what, str(e))], file) from None
    return validate_spec(raw, file)


def validate_spec(raw: dict[str, Any], file: str | Path | None = None) -> ExperimentSpec:
    """Validate a raw mapping and every variant it expands to; raise SpecError with all problems."""
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(field_problems(e), file) from None
    problems: list[tuple[str, str]] = []
    settings = spec.sweep.settings() if spec.sweep else [("", {})]
    for (name, ov), (setting, values) in itertools.product(spec._variant_overrides(), settings):
        where = f"variants[{name}{'+' * bool(setting)}{setting}]"
        try:
            apply_overrides(spec, ov | values)
        except ValidationError as e:
            problems += field_problems(e, prefix=where)
        except ValueError as e:
            problems.append((where, str(e)))
    if spec.baseline and spec.baseline not in [n for n, _ in spec._variant_overrides()]:
        problems.append(("baseline", f"{spec.baseline!r} is not one of the variants"))
    if problems:
        raise SpecError(problems, file)
    return spec
