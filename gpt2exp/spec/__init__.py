"""Experiment specs: typed, validated, written as YAML under ``experiments/``.

An :class:`ExperimentSpec` is a base configuration (data, model, train, parallel, tracking) plus
variants that override it. ``load_spec`` reads YAML, applies ``--set a.b=value`` overrides and
validates the base and every expanded variant, so a bad spec fails before anything starts with
``SpecError`` lines of the form ``FILE: field.path: reason``. ``sections`` holds the sections' models,
``experiment`` the spec and its variants, ``load`` the reading and the errors.
"""

from gpt2exp.spec.experiment import ExperimentSpec, Variant, VariantSpec, apply_overrides, set_dotted
from gpt2exp.spec.load import (
    SpecError,
    field_problems,
    load_spec,
    override_and_validate,
    parse_overrides,
    parse_yaml,
    read_yaml,
    validate_spec,
    yaml_problem,
)
from gpt2exp.spec.sections import (
    MAX_RUNS,
    MAX_YAML_BYTES,
    NAME_PATTERN,
    DataSpec,
    ModelSpec,
    Name,
    ParallelSpec,
    Seed,
    Strict,
    TrackingSpec,
    TrainSpec,
    name_problem,
)

__all__ = [
    "MAX_RUNS",
    "MAX_YAML_BYTES",
    "NAME_PATTERN",
    "DataSpec",
    "ExperimentSpec",
    "ModelSpec",
    "Name",
    "ParallelSpec",
    "Seed",
    "SpecError",
    "Strict",
    "TrackingSpec",
    "TrainSpec",
    "Variant",
    "VariantSpec",
    "apply_overrides",
    "field_problems",
    "load_spec",
    "name_problem",
    "override_and_validate",
    "parse_overrides",
    "parse_yaml",
    "read_yaml",
    "set_dotted",
    "validate_spec",
    "yaml_problem",
]
