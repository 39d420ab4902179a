"""An experiment spec: a base configuration and the variants (a list, a grid, or both) that override it;
dotted ``a.b=value`` overrides and the expansion into one validated spec per variant."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    model_validator,
)

from gpt2exp.spec.sections import (
    MAX_RUNS,
    DataSpec,
    EvalSpec,
    ModelSpec,
    Name,
    ParallelSpec,
    Strict,
    TrackingSpec,
    TrainSpec,
    name_problem,
    point_name,
)
from gpt2exp.spec.sweep import SweepSpec


# ----------------------------------------------------------------------------------- experiment
class VariantSpec(Strict):
    """A named set of overrides of the base spec, as dotted paths: ``{model.n_kv_head: 4}``."""

    name: Name
    set: dict[str, Any] = Field(default_factory=dict)


class ExperimentSpec(Strict):
    """A base configuration and the variants to compare."""

    name: Name
    description: str = ""
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    variants: list[VariantSpec] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted path -> values (numbers, strings, true/false, null); crossed with variants."
    )
    baseline: str | None = Field(default=None, description="Variant the others are compared to (default: the first).")
    sweep: SweepSpec | None = Field(default=None, description="Settings tried per variant on Ray Tune (see gpt2exp.spec.sweep).")

    @model_validator(mode="after")
    def _cross_section(self) -> ExperimentSpec:
        """Checks that span sections; every problem is reported as ``field.path: reason``."""
        t, p = self.train, self.parallel
        problems = []
        micro = t.micro_batch_size or max(1, t.batch_size // p.num_workers)
        if t.batch_size % (micro * p.num_workers):
            problems.append(
                f"train.batch_size: {t.batch_size} is not a multiple of micro_batch_size x num_workers = "
                f"{micro} x {p.num_workers}; adjust train.batch_size or train.micro_batch_size"
            )
        if p.use_gpu and p.launcher == "local" and p.gpus_per_worker != 1:
            problems.append("parallel.gpus_per_worker: the local launcher uses exactly one GPU")
        paths = [("grid", k) for k in self.grid] + [(f"variants[{v.name}].set", k) for v in self.variants for k in v.set]
        if self.sweep is not None:
            paths += [("sweep.params", k) for k in self.sweep.params]
            fixed = {k: f"variants[{v.name}].set" for v in self.variants for k in v.set} | {k: "grid" for k in self.grid}
            problems += self.sweep.problems(len(t.run_seeds), p.num_workers, self.tracking.enabled, fixed)
        problems += [f"{where}: {msg}" for where, key in paths if (msg := _path_problem(key))]
        problems += self._expansion_problems()
        problems += self._context_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _expansion_problems(self) -> list[str]:
        """Variants x grid make 1 to MAX_RUNS runs (with the seeds; counted before expanding), with distinct valid names."""
        out = [f"grid.{k}: no values; give at least one or remove {k}" for k, values in self.grid.items() if not values]
        out += [
            f"grid.{k}: {v!r} is not a single value; grid values are numbers, strings, true/false or null"
            for k, values in self.grid.items()
            for v in values
            if not isinstance(v, str | int | float | bool | None)
        ]
        if out:
            return out
        sizes = [len(self.variants) or 1, *(len(v) for v in self.grid.values()), len(self.train.run_seeds)]
        runs = math.prod(sizes)
        if self.sweep is not None:
            runs = self.sweep.n_runs(math.prod(sizes[:-1]), len(self.train.run_seeds))
        if runs > MAX_RUNS and self.sweep is not None:
            return [f"sweep: {runs:,} trials (variants x (settings + seeds - 1)); at most {MAX_RUNS:,} per experiment"]
        if runs > MAX_RUNS:
            made = " x ".join(f"{n:,}" for n in sizes)
            return [f"grid: {made} (variants x grid values x seeds) = {runs:,} runs; at most {MAX_RUNS:,} per experiment"]
        names = Counter(name for name, _ in self._variant_overrides())
        out = [
            f"variants: {problem}; name the variants explicitly under `variants:` instead of a grid"
            for name in names
            if (problem := name_problem(name))
        ]
        if dupes := sorted(n for n, count in names.items() if count > 1):
            out.append(f"variants: {dupes} would each be made more than once; give each variant and each grid value once")
        return out

    def _context_problems(self) -> list[str]:
        """Learned positions have block_size of them: a longer eval context is an error (checked on each variant; the
        base of a spec with variants runs only through them)."""
        m, longer = self.model, [n for n in self.eval.contexts if n > self.model.block_size]
        if m.positional != "learned" or not longer or self.variants or self.grid:
            return []
        fits = [n for n in self.eval.contexts if n <= m.block_size]
        return [
            f"eval.contexts: {longer} are longer than the {m.block_size} positions learned positions have (block_size); "
            f"set eval.contexts: {fits} (on this variant: `set: {{eval.contexts: {fits}}}`) or use positional rope, alibi, sinusoidal or none"
        ]

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size // self.parallel.num_workers

    @property
    def grad_accum_steps(self) -> int:
        """Micro-steps per optimizer step on each worker."""
        return self.train.batch_size // (self.micro_batch_size * self.parallel.num_workers)

    def expand(self) -> list[Variant]:
        """Variants × grid as fully validated specs (a spec with neither gives one variant, 'base')."""
        return [Variant(name, overrides, apply_overrides(self, overrides)) for name, overrides in self._variant_overrides()]

    def _variant_overrides(self) -> list[tuple[str, dict[str, Any]]]:
        listed = [(v.name, dict(v.set)) for v in self.variants] or [("", {})]
        keys = list(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) if keys else [()]
        out = []
        for (vname, vset), combo in itertools.product(listed, combos):
            grid_set = dict(zip(keys, combo, strict=True))
            grid_name = point_name(grid_set)
            name = "+".join(p for p in (vname, grid_name) if p) or "base"
            out.append((name, {**vset, **grid_set}))
        return out

    def trials(self) -> list[tuple[Variant, str, ExperimentSpec]]:
        """A sweep's (variant, setting name, validated spec) for every variant x setting (no sweep: none)."""
        settings = self.sweep.settings() if self.sweep else []
        return [(v, name, apply_overrides(self, v.overrides | values)) for v in self.expand() for name, values in settings]

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.expand()[0].name


@dataclass(frozen=True)
class Variant:
    """One expanded variant: its name, the overrides that made it, and its validated spec."""

    name: str
    overrides: dict[str, Any]
    spec: ExperimentSpec


# ---------------------------------------------------------------------------------- overrides
_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSpec,
    "model": ModelSpec,
    "train": TrainSpec,
    "parallel": ParallelSpec,
    "tracking": TrackingSpec,
    "eval": EvalSpec,
}


def _path_problem(key: str) -> str | None:
    """Why a dotted override path names no spec field, or None when it does."""
    section, _, field = key.partition(".")
    if section not in _SECTIONS or field not in _SECTIONS[section].model_fields:
        known = ", ".join(f"{s}.<field>" for s in _SECTIONS)
        return f"{key!r} is not a spec field (expected {known})"
    return None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"{key!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(base: ExperimentSpec, overrides: Mapping[str, Any]) -> ExperimentSpec:
    """The base spec (without variants) with dotted overrides applied, re-validated."""
    raw = base.model_dump(exclude={"variants", "grid", "sweep"}, exclude_unset=True)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return ExperimentSpec.model_validate(raw)
