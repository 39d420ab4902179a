"""The sections of an experiment spec (model, data, train, parallel, tracking) as Pydantic models, with
the rules on names and seeds they share."""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

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


def point_name(values: Mapping[str, object]) -> str:
    """The name of a grid point or a sweep setting: ``{"train.lr": 0.002, "model.bias": True}`` -> ``lr=0.002,bias=true``."""
    fmt = lambda v: "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return ",".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in values.items())


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
    mlp_hidden: int | None = Field(
        default=None,
        gt=0,
        le=2**20,
        description="Hidden width of each block's MLP (default 4 x n_embd); widen it to give GQA/MQA the parameters MHA has.",
    )
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
    def mlp_width(self) -> int:
        """The MLP's hidden width: ``mlp_hidden``, else GPT-2's 4 x n_embd."""
        return self.mlp_hidden or 4 * self.n_embd

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
    hf_dataset: str | None = Field(
        default=None,
        description="A Hugging Face dataset: a Hub name (needs network), a folder saved with save_to_disk, or "
        "local .json/.jsonl/.parquet/.csv/.txt files (a file, a folder of them or a glob). Optional extra: gpt2exp[hf].",
    )
    hf_split: str = "train"
    hf_text_field: str = "text"
    hf_streaming: bool = Field(
        default=False, description="Read the dataset as a stream (IterableDataset): nothing downloaded up front."
    )
    builtin: Literal["shakespeare"] | None = Field(default=None, description="A small corpus installed with the package.")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5, description="Share of the tokens held out for validation.")
    cache_dir: str | None = Field(default=None, description="Token cache folder (default: ~/.cache/gpt2exp/tokens).")
    prepare_with: Literal["local", "ray"] = Field(
        default="local",
        description="local: tokenize on this machine's cores; ray: with Ray Data, one shard per file, on the Ray cluster "
        "(the same tokens and split; path, url or builtin sources; cache_dir on storage every node sees).",
    )

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
BUDGETS = ("max_steps", "max_tokens", "max_epochs", "max_flops")  # exactly one is given


class TrainSpec(Strict):
    """Optimisation and budget. ``batch_size`` is global (sequences per optimizer step)."""

    max_steps: int | None = Field(default=None, gt=0, le=10**9, description="Budget in optimizer steps.")
    max_tokens: int | None = Field(default=None, gt=0, le=10**15, description="Budget in training tokens (converted to steps).")
    max_epochs: float | None = Field(default=None, gt=0, le=10**6, description="Budget in passes over the training split.")
    max_flops: float | None = Field(
        default=None,
        gt=0,
        le=1e30,
        description="Budget in training FLOPs (model FLOPs per token x tokens): a costlier variant gets fewer steps.",
    )
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
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget (max_steps, max_tokens, max_epochs or max_flops), got {', '.join(given)}")
        if not given:
            raise ValueError("no budget: set train.max_steps, train.max_tokens, train.max_epochs or train.max_flops")
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


# ----------------------------------------------------------------------------------------- eval
Context = Annotated[int, Field(gt=0, le=2**20)]


class EvalSpec(Strict):
    """After training: the validation split scored at several context lengths, and the variants' speed measured."""

    contexts: list[Context] = Field(
        default_factory=list,
        max_length=64,
        description="Context lengths N (tokens) at which the final model scores the validation split: windows of N "
        "tokens advancing by N/2, so each token sees N/2+1 to N tokens; logged as val_loss@N (MLflow key val_loss_ctxN). "
        "May exceed model.block_size, except with learned positions.",
    )
    tokens: int | None = Field(
        default=None,
        gt=0,
        le=10**15,
        description="Tokens scored at each context: the validation split's last ones (at most half of it), the same at every "
        "context and for every variant (default: the final evaluation's budget).",
    )
    benchmark_rounds: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="After training, rounds of the interleaved inference/training-speed benchmark of the variants' "
        "final models (median over rounds; 0: none).",
    )

    @field_validator("contexts")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if dupes := sorted(n for n, count in Counter(v).items() if count > 1):
            raise ValueError(f"contexts {dupes} are given more than once; give each context once")
        return v


def context_metric(metric: str, context: int) -> str:
    """The MLflow key of ``metric`` at context N: ``val_loss_ctx512`` (MLflow keys cannot hold ``@``)."""
    return f"{metric}_ctx{context}"


def metric_key(name: str) -> str:
    """A metric as the user may name it (``val_loss@512``) as its MLflow key (``val_loss_ctx512``)."""
    base, at, n = name.rpartition("@")
    return context_metric(base, int(n)) if at and n.isdigit() else name


def split_context(key: str) -> tuple[str, int] | None:
    """``val_loss_ctx512`` -> ("val_loss", 512): the metric and context of a long-context key, else None."""
    match = re.fullmatch(r"(\w+?)_ctx(\d+)", key)
    return (match[1], int(match[2])) if match else None
