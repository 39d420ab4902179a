"""Experiment specs: typed, validated, written as YAML under ``experiments/``.

An :class:`ExperimentSpec` is a base configuration (data, model, train, parallel, tracking) plus
variants that override it. ``load_spec`` reads YAML, applies ``--set a.b=value`` overrides and
validates the base and every expanded variant, so a bad spec fails before anything starts with
``SpecError`` lines of the form ``FILE: field.path: reason``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gpt2exp.errors import INPUT, Gpt2expError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,99}$"
MAX_RUNS = 1000  # variants x seeds of one experiment
MAX_YAML_BYTES = 1 << 20  # specs and pipelines are small text files


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an experiment, variant, pipeline or stage (it names folders), or None."""
    if re.fullmatch(NAME_PATTERN, name):
        return None
    if len(name) > 100:
        return f"a name is at most 100 characters, this one has {len(name):,} ({name[:40]!r}...)"
    return f"{name!r} is not a name: a letter or digit, then letters, digits and _ . , = + - (at most 100 characters)"


def _check_name(name: str) -> str:
    if problem := name_problem(name):
        raise ValueError(problem)
    return name


Name = Annotated[str, AfterValidator(_check_name), Field(json_schema_extra={"pattern": NAME_PATTERN})]
Seed = Annotated[int, Field(ge=0, lt=2**32, description="A random seed in [0, 2**32): numpy and torch take it as it is.")]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated, numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------- model
class ModelSpec(Strict):
    """GPT-2 family architecture. Defaults are GPT-2 small (124M)."""

    vocab_size: int = Field(
        default=50257, gt=0, le=2**20, description="Token vocabulary (50257 for GPT-2 BPE; 50304 pads to a multiple of 64)."
    )
    block_size: int = Field(default=1024, gt=0, le=2**20, description="Maximum context length in tokens.")
    n_layer: int = Field(default=12, gt=0, le=1000)
    n_head: int = Field(default=12, gt=0, le=1024, description="Query heads.")
    n_kv_head: int | None = Field(
        default=None,
        gt=0,
        le=1024,
        description="Key/value heads: n_head = multi-head, a divisor = grouped-query, 1 = multi-query (default n_head).",
    )
    n_embd: int = Field(default=768, gt=0, le=2**16)
    positional: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"
    rope_theta: float = Field(default=10000.0, gt=0, le=1e10, description="RoPE base frequency.")
    sliding_window: int | None = Field(
        default=None, gt=0, description="Each token sees at most the last W tokens (itself included)."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = Field(default=True, description="Biases in Linear layers and LayerNorms (GPT-2: true).")
    tie_weights: bool = Field(default=True, description="Share the token embedding with the LM head.")

    @field_validator("n_kv_head")
    @classmethod
    def _kv_divides_heads(cls, v: int | None, info: ValidationInfo) -> int | None:
        n_head = info.data.get("n_head")
        if v is not None and n_head and n_head % v:
            divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
            raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={v}; use one of {divisors}")
        return v

    @field_validator("n_embd")
    @classmethod
    def _embd_divides(cls, v: int, info: ValidationInfo) -> int:
        n_head = info.data.get("n_head")
        if n_head and v % n_head:
            raise ValueError(f"n_embd={v} is not divisible by n_head={n_head}; pick n_embd as a multiple of n_head")
        return v

    @field_validator("positional")
    @classmethod
    def _rope_even(cls, v: str, info: ValidationInfo) -> str:
        n_embd, n_head = info.data.get("n_embd"), info.data.get("n_head")
        if v == "rope" and n_embd and n_head and (n_embd // n_head) % 2:
            raise ValueError(f"rope needs an even head size, got n_embd/n_head = {n_embd}/{n_head} = {n_embd // n_head}")
        return v

    @field_validator("sliding_window")
    @classmethod
    def _window_fits(cls, v: int | None, info: ValidationInfo) -> int | None:
        block = info.data.get("block_size")
        if v is not None and block and v > block:
            raise ValueError(f"sliding_window={v} is larger than block_size={block}; use a window <= block_size or none")
        return v

    @model_validator(mode="after")
    def _default_kv_heads(self) -> ModelSpec:
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        return self

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_kind(self) -> str:
        """Human label: MHA, GQA-4 (4 kv heads) or MQA, with ``+SW<W>`` for a sliding window."""
        kv = self.n_kv_head or self.n_head
        kind = "MHA" if kv == self.n_head else "MQA" if kv == 1 else f"GQA-{kv}"
        return kind + (f"+SW{self.sliding_window}" if self.sliding_window else "")


# ----------------------------------------------------------------------------------------- data
class DataSpec(Strict):
    """Where the training text comes from. Exactly one of path, url, hf_dataset, builtin."""

    path: str | None = Field(default=None, description="A text file, a folder of text files or a glob.")
    url: str | None = Field(default=None, description="A text file to download once into the cache (needs network).")
    hf_dataset: str | None = Field(default=None, description="A Hugging Face dataset name (optional extra, needs network).")
    hf_split: str = "train"
    hf_text_field: str = "text"
    builtin: Literal["shakespeare"] | None = Field(default=None, description="A small corpus installed with the package.")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5, description="Share of the tokens held out for validation.")
    cache_dir: str | None = Field(default=None, description="Token cache folder (default: ~/.cache/gpt2exp/tokens).")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("path", "url", "hf_dataset", "builtin") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one data source, got {', '.join(given)}")
        if not given:
            object.__setattr__(self, "builtin", "shakespeare")
        return self

    @property
    def source(self) -> str:
        """The one source as ``kind:value``, for display and cache keys."""
        for k in ("path", "url", "hf_dataset", "builtin"):
            if (v := getattr(self, k)) is not None:
                return f"{k}:{v}"
        raise AssertionError("unreachable: validated to have one source")


# ---------------------------------------------------------------------------------------- train
class TrainSpec(Strict):
    """Optimisation and budget. ``batch_size`` is global (sequences per optimizer step)."""

    max_steps: int | None = Field(default=None, gt=0, le=10**9, description="Budget in optimizer steps.")
    max_tokens: int | None = Field(default=None, gt=0, le=10**15, description="Budget in training tokens (converted to steps).")
    max_epochs: float | None = Field(default=None, gt=0, le=10**6, description="Budget in passes over the training split.")
    batch_size: int = Field(
        default=8, gt=0, le=2**20, description="Global batch: sequences per optimizer step, whatever the worker count."
    )
    micro_batch_size: int | None = Field(
        default=None, gt=0, le=2**20, description="Sequences per forward pass on one worker (default: batch_size / workers)."
    )
    lr: float = Field(default=6e-4, gt=0, le=10)
    min_lr: float | None = Field(default=None, ge=0, description="Floor of the schedule (default lr/10).")
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0, le=10**9)
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.95, gt=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0, le=1e6, description="Max global gradient norm (null: no clipping).")
    eval_interval: int = Field(default=100, gt=0, le=10**9, description="Evaluate every N steps (and at the end).")
    eval_tokens: int = Field(
        default=8192,
        gt=0,
        le=10**15,
        description="Tokens scored by each evaluation during training: a fixed sample of the validation windows.",
    )
    final_eval_tokens: int | None = Field(
        default=None,
        gt=0,
        le=10**15,
        description="Tokens scored by the final evaluation (default: a quarter of the training tokens, at least "
        "eval_tokens, at most the whole validation split; a forward pass costs about a third of a training step, "
        "so this adds under 10% to the run).",
    )
    log_interval: int = Field(default=10, gt=0, le=10**9)
    checkpoint_interval: int | None = Field(
        default=None, gt=0, le=10**9, description="Checkpoint every N steps (default: eval_interval)."
    )
    seed: Seed = 1337
    seeds: list[Seed] | None = Field(default=None, min_length=1, description="Run every variant once per seed (distinct seeds).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, fp32 on CPU."
    )
    compile: bool = False

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v and (dupes := sorted(s for s, n in Counter(v).items() if n > 1)):
            raise ValueError(f"seeds {dupes} are given more than once; give each seed once")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSpec:
        given = [k for k in ("max_steps", "max_tokens", "max_epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget (max_steps, max_tokens or max_epochs), got {', '.join(given)}")
        if not given:
            raise ValueError("no budget: set train.max_steps, train.max_tokens or train.max_epochs")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}")
        return self

    @property
    def run_seeds(self) -> list[int]:
        return self.seeds or [self.seed]

    def final_eval_budget(self, train_tokens: int) -> int:
        """Tokens the final evaluation scores (capped later by the validation split) for a run of ``train_tokens``."""
        return self.final_eval_tokens or max(self.eval_tokens, train_tokens // 4)


# ------------------------------------------------------------------------------------- parallel
class ParallelSpec(Strict):
    """How a variant is executed: launcher, data-parallel strategy and workers."""

    launcher: Literal["local", "ray"] = Field(default="local", description="local: this process (or torchrun); ray: Ray Train.")
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    num_workers: int = Field(default=1, gt=0, le=10_000)
    use_gpu: bool = False
    gpus_per_worker: float = Field(default=1.0, gt=0, le=1024)
    cpus_per_worker: int | None = Field(
        default=None, gt=0, le=10_000, description="Default: the node's CPUs shared among workers."
    )
    max_concurrent: int | None = Field(
        default=None, gt=0, le=10_000, description="Variants running at once (default: as many as fit)."
    )
    max_failures: int = Field(
        default=0, ge=0, le=1000, description="Restarts of a crashed worker group from its last checkpoint."
    )
    peak_flops: float | None = Field(
        default=None, gt=0, le=1e18, description="Peak FLOP/s of one device for MFU (default: known-GPU table)."
    )

    @field_validator("num_workers")
    @classmethod
    def _workers_fit_strategy(cls, v: int, info: ValidationInfo) -> int:
        strategy, launcher = info.data.get("strategy"), info.data.get("launcher")
        if strategy == "fsdp" and v < 2:
            raise ValueError("fsdp shards over workers and needs num_workers >= 2; use strategy: ddp or none for one worker")
        if strategy == "none" and v > 1:
            raise ValueError(f"num_workers={v} needs a data-parallel strategy: set parallel.strategy to ddp or fsdp")
        if launcher == "local" and v > 1 and v != int(os.environ.get("WORLD_SIZE", 1)):  # torchrun sets WORLD_SIZE
            raise ValueError(f"launcher local runs one process; for num_workers={v} use launcher: ray (or torchrun)")
        return v


# ------------------------------------------------------------------------------------- tracking
with warnings.catch_warnings():  # `register` shadows ABCMeta.register on the class, not on instances
    warnings.filterwarnings("ignore", message='Field name "register"')

    class TrackingSpec(Strict):
        """MLflow tracking."""

        enabled: bool = True
        tracking_uri: str | None = Field(
            default=None, description="Default: MLFLOW_TRACKING_URI, else SQLite in the output folder."
        )
        experiment_name: str | None = Field(default=None, description="MLflow experiment (default: the spec's name).")
        register: str | None = Field(default=None, description="Register the best variant's model under this name, alias 'best'.")
        log_checkpoints: bool = True
        system_metrics: bool = True


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
    variants: list[VariantSpec] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted path -> values (numbers, strings, true/false, null); crossed with variants."
    )
    baseline: str | None = Field(default=None, description="Variant the others are compared to (default: the first).")

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
        problems += [f"{where}: {msg}" for where, key in paths if (msg := _path_problem(key))]
        problems += self._expansion_problems()
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
        if (runs := math.prod(sizes)) > MAX_RUNS:
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
            grid_name = ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in grid_set.items())
            name = "+".join(p for p in (vname, grid_name) if p) or "base"
            out.append((name, {**vset, **grid_set}))
        return out

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.expand()[0].name


@dataclass(frozen=True)
class Variant:
    """One expanded variant: its name, the overrides that made it, and its validated spec."""

    name: str
    overrides: dict[str, Any]
    spec: ExperimentSpec


# ----------------------------------------------------------------------------- loading, errors
_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSpec,
    "model": ModelSpec,
    "train": TrainSpec,
    "parallel": ParallelSpec,
    "tracking": TrackingSpec,
}


def _path_problem(key: str) -> str | None:
    """Why a dotted override path names no spec field, or None when it does."""
    section, _, field = key.partition(".")
    if section not in _SECTIONS or field not in _SECTIONS[section].model_fields:
        known = ", ".join(f"{s}.<field>" for s in _SECTIONS)
        return f"{key!r} is not a spec field (expected {known})"
    return None


def _fmt(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


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
    raw = base.model_dump(exclude={"variants", "grid"}, exclude_unset=True)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return ExperimentSpec.model_validate(raw)


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
    raw = read_yaml(path, "a spec is a YAML mapping with name, data, model, train, ...")
    try:
        ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        for key, value in ov.items():
            set_dotted(raw, key, value)
    except ValueError as e:
        raise SpecError([("--set", str(e))], path) from None
    return validate_spec(raw, path)


def validate_spec(raw: dict[str, Any], file: str | Path | None = None) -> ExperimentSpec:
    """Validate a raw mapping and every variant it expands to; raise SpecError with all problems."""
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(field_problems(e), file) from None
    problems: list[tuple[str, str]] = []
    for name, ov in spec._variant_overrides():
        try:
            apply_overrides(spec, ov)
        except ValidationError as e:
            problems += field_problems(e, prefix=f"variants[{name}]")
        except ValueError as e:
            problems.append((f"variants[{name}]", str(e)))
    if spec.baseline and spec.baseline not in [n for n, _ in spec._variant_overrides()]:
        problems.append(("baseline", f"{spec.baseline!r} is not one of the variants"))
    if problems:
        raise SpecError(problems, file)
    return spec
