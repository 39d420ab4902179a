"""Pipeline specs: an ordered list of typed stages, written as YAML under ``pipelines/``.

Each stage has a ``name`` and a ``kind``: ``prepare`` (tokenize a dataset), ``run`` (an experiment
spec, with overrides), ``compare``, ``register`` (best variant by a metric, with an alias),
``generate`` (samples into a text artifact) and ``export`` (Hugging Face format). A stage refers to an
earlier one by name: ``run.data``, ``compare.runs``, ``register.runs``, ``generate.model``,
``export.model``. ``load_pipeline`` validates everything, the experiment specs of the run stages
included, before any stage starts; problems are ``FILE: stages.N.kind.field: reason`` lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from gpt2exp.spec import (
    DataSpec,
    ExperimentSpec,
    Name,
    Seed,
    SpecError,
    Strict,
    field_problems,
    read_yaml,
    set_dotted,
    validate_spec,
)

# stricter than Name: no "." (a stage's retries are folders <stage>.<attempt>)
StageName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class Stage(Strict):
    name: StageName = Field(description="Unique within the pipeline; later stages refer to it by this name.")

    def references(self) -> list[str]:
        """Names of the earlier stages whose outputs this stage uses."""
        return []


class PrepareStage(Stage):
    """Tokenize a dataset into the token cache (what ``run`` stages with ``data: <this stage>`` train on)."""

    kind: Literal["prepare"]
    data: DataSpec = Field(default_factory=DataSpec)


class RunStage(Stage):
    """Train every variant of an experiment spec (its MLflow runs go to the pipeline's store)."""

    kind: Literal["run"]
    spec: str | dict[str, Any] = Field(description="Experiment spec file (relative to the pipeline file) or an inline spec.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides of the spec: dotted path -> value.")
    data: StageName | None = Field(default=None, description="A prepare stage whose dataset replaces the spec's data.")
    _experiment: ExperimentSpec | None = PrivateAttr(None)

    @property
    def experiment(self) -> ExperimentSpec:
        """The validated experiment spec, overrides and data applied."""
        assert self._experiment is not None, "resolved by PipelineSpec"
        return self._experiment

    def references(self) -> list[str]:
        return [self.data] if self.data else []


class CompareStage(Stage):
    """One table and plot over the variants of one or more run stages (default: every earlier one)."""

    kind: Literal["compare"]
    runs: list[StageName] = Field(default_factory=list, description="Run stages (default: every earlier run stage).")
    metric: str = "val_loss"
    baseline: str | None = Field(default=None, description="Variant compared to (default: the first run stage's baseline).")

    def references(self) -> list[str]:
        return list(self.runs)


class RegisterStage(Stage):
    """Register the best finished variant (by ``metric``) of the run stages in MLflow's model registry."""

    kind: Literal["register"]
    runs: list[StageName] = Field(default_factory=list, description="Run stages (default: every earlier run stage).")
    model_name: str = Field(min_length=1, description="Registered model name.")
    alias: str = Field(default="best", pattern=r"^[A-Za-z0-9_-]+$")
    metric: str = "val_loss"

    def references(self) -> list[str]:
        return list(self.runs)


ModelRef = Annotated[
    str, Field(min_length=1, description="A register or run stage (its best model), or a model URI (models:/..., runs:/...).")
]


def is_stage_ref(model: str) -> bool:
    return ":" not in model and "/" not in model


class GenerateStage(Stage):
    """Sample text from a model into ``samples.txt`` (logged on the pipeline run)."""

    kind: Literal["generate"]
    model: ModelRef
    prompts: list[str] = Field(default_factory=lambda: ["\n"], min_length=1)
    samples_per_prompt: int = Field(default=1, gt=0, le=10_000)
    max_new_tokens: int = Field(default=200, gt=0, le=10**6)
    temperature: float = Field(default=0.8, ge=0.0, le=100.0)
    top_k: int | None = Field(default=200, gt=0, le=2**20)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed = 0

    def references(self) -> list[str]:
        return [self.model] if is_stage_ref(self.model) else []


class ExportStage(Stage):
    """Write a model as a Hugging Face GPT-2 folder (weights, config, tokenizer files)."""

    kind: Literal["export"]
    model: ModelRef
    folder: str | None = Field(default=None, description="Target folder (default: the stage's output folder /hf).")

    def references(self) -> list[str]:
        return [self.model] if is_stage_ref(self.model) else []


AnyStage = Annotated[
    PrepareStage | RunStage | CompareStage | RegisterStage | GenerateStage | ExportStage, Field(discriminator="kind")
]
REFERS_TO = {  # stage kind -> (the field naming earlier stages, the kinds it may name)
    "run": ("data", ("prepare",)),
    "compare": ("runs", ("run",)),
    "register": ("runs", ("run",)),
    "generate": ("model", ("register", "run")),
    "export": ("model", ("register", "run")),
}


class PipelineSpec(Strict):
    """A named, ordered list of stages and the MLflow store that records them."""

    name: Name
    description: str = ""
    tracking_uri: str | None = Field(default=None, description="Default: MLFLOW_TRACKING_URI, else SQLite in the output folder.")
    stages: list[AnyStage] = Field(min_length=1)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> PipelineSpec:
        """References point at earlier stages of the right kind; run stages' specs load and validate."""
        base, stages = Path((info.context or {}).get("base", ".")), self.stages
        problems: list[str] = []
        seen: dict[str, AnyStage] = {}
        for i, stage in enumerate(stages):
            where = f"stages.{i}.{stage.kind}"
            if stage.name in seen:
                problems.append(f"{where}.name: {stage.name!r} is already the name of an earlier stage")
            if isinstance(stage, CompareStage | RegisterStage) and not stage.runs:
                stage.runs = [s.name for s in seen.values() if s.kind == "run"]
                if not stage.runs:
                    problems.append(f"{where}.runs: no run stage before this one")
            field, allowed = REFERS_TO.get(stage.kind, ("", ()))
            for ref in stage.references():
                if ref not in seen:
                    later = any(s.name == ref for s in stages[i + 1 :])
                    problems.append(
                        f"{where}.{field}: {ref!r} "
                        + ("is a later stage; a stage can only use earlier ones" if later else "is not the name of a stage")
                    )
                elif seen[ref].kind not in allowed:
                    problems.append(f"{where}.{field}: {ref!r} is a {seen[ref].kind} stage; give a {' or '.join(allowed)} stage")
            if isinstance(stage, RunStage):
                data = seen.get(stage.data or "")
                try:
                    stage._experiment = resolve_experiment(stage, base, data.data if isinstance(data, PrepareStage) else None)
                except SpecError as e:
                    problems += [f"{where}.spec: {line}" for line in e.lines()]
            seen.setdefault(stage.name, stage)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def self_contained(self) -> dict[str, Any]:
        """The pipeline as a mapping whose run stages hold their resolved experiment inline (no file
        references, overrides applied): what a Ray Job gets."""
        raw = self.model_dump(mode="json")
        for stage, dumped in zip(self.stages, raw["stages"], strict=True):
            if isinstance(stage, RunStage):
                dumped.update(spec=stage.experiment.model_dump(mode="json"), set={})  # data: the same, applied again
        return raw


def resolve_experiment(stage: RunStage, base: Path, data: DataSpec | None) -> ExperimentSpec:
    """The run stage's experiment: the spec file (or inline spec), its ``set`` overrides, the prepare
    stage's data; tracking must be on (the pipeline finds its runs in MLflow)."""
    if isinstance(stage.spec, dict):
        raw, file = dict(stage.spec), "inline spec"
    else:
        file = base / stage.spec
        raw = read_yaml(file, "a spec is a YAML mapping with name, data, model, train, ...")
    try:
        for key, value in stage.set.items():
            set_dotted(raw, key, value)
    except ValueError as e:
        raise SpecError([("set", str(e))], file) from None
    if data is not None:
        raw["data"] = data.model_dump(mode="json", exclude_defaults=True)
    spec = validate_spec(raw, file)
    if not spec.tracking.enabled:
        raise SpecError([("tracking.enabled", "a pipeline finds its runs in MLflow; leave tracking enabled")], file)
    return spec


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline file; raise SpecError with every problem."""
    path = Path(path)
    raw = read_yaml(path, "a pipeline is a YAML mapping with name and stages")
    try:
        return PipelineSpec.model_validate(raw, context={"base": path.parent})
    except ValidationError as e:
        raise SpecError(field_problems(e, schema="gpt2exp pipeline schema"), path) from None
