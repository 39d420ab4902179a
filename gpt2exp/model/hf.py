"""Hugging Face GPT-2 checkpoints in and out.

A GPT-2 folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``). Its
attention and MLP weights are ``Conv1D`` (stored as (in, out), transposed relative to
``nn.Linear``), ``lm_head.weight`` is usually absent (tied to ``wte``), and keys may or may not
carry the ``transformer.`` prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from gpt2exp.errors import Gpt2expError
from gpt2exp.spec import ModelSpec

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) not in HUB_NAMES and not re.fullmatch(r"[\w-]+/[\w.-]+", str(name_or_path)):
        raise FileNotFoundError(
            f"{name_or_path}: not a checkpoint folder (config.json + model.safetensors) nor a hub name ({', '.join(HUB_NAMES)})"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"loading {name_or_path!r} from the hub needs `pip install huggingface_hub`") from None
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, ...
        raise Gpt2expError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}); "
            "pass a local folder with config.json and model.safetensors instead"
        ) from None


def load_hf_checkpoint(name_or_path: str | Path) -> tuple[ModelSpec, dict[str, Tensor]]:
    """ModelSpec and a state dict in GPT's layout from a Hugging Face GPT-2 checkpoint."""
    folder = _resolve(name_or_path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{folder}: model_type {cfg.get('model_type')!r} is not gpt2")
    unsupported = [  # GPT-2 options GPT does not implement: loading would silently change the logits
        f"{key}={cfg[key]!r}"
        for key, ok in (
            ("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")),
            ("layer_norm_epsilon", lambda v: v == 1e-5),
            ("scale_attn_weights", lambda v: v),
            ("scale_attn_by_inverse_layer_idx", lambda v: not v),
        )
        if key in cfg and not ok(cfg[key])
    ]
    if unsupported:
        raise ValueError(f"{folder}: GPT cannot reproduce this GPT-2 configuration: {', '.join(unsupported)}")
    spec = ModelSpec(
        vocab_size=cfg["vocab_size"],
        block_size=cfg["n_positions"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        mlp_hidden=cfg.get("n_inner"),  # None: 4 x n_embd, as in transformers
        positional="learned",
        bias=True,
        tie_weights=cfg.get("tie_word_embeddings", True),
        dropout=0.0,
    )
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        raw = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").exists():
        raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers
            continue
        key = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        state[key] = value.t().contiguous() if key.endswith(_CONV1D) else value
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    return spec, state


def save_hf_checkpoint(s: ModelSpec, weights: dict[str, Tensor], path: str | Path) -> Path:
    """Write a model of spec ``s`` (learned positions, multi-head, no window) with its state dict ``weights``
    as a Hugging Face GPT-2 folder."""
    from safetensors.torch import save_file

    if s.positional != "learned" or s.n_kv_head != s.n_head or s.sliding_window or not s.bias:
        raise ValueError(
            f"only GPT-2-shaped models export to Hugging Face GPT-2 (learned positions, multi-head, bias, no window); "
            f"this one is {s.attention_kind} with {s.positional} positions"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in weights.items():
        if key == "lm_head.weight" and s.tie_weights:
            continue
        state[key] = (value.t() if key.endswith(_CONV1D) else value).detach().cpu().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": s.vocab_size,
        "n_positions": s.block_size,
        "n_ctx": s.block_size,
        "n_embd": s.n_embd,
        "n_layer": s.n_layer,
        "n_head": s.n_head,
        "n_inner": s.mlp_hidden,
        "layer_norm_epsilon": 1e-5,
        "attn_pdrop": s.dropout,
        "embd_pdrop": s.dropout,
        "resid_pdrop": s.dropout,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": s.tie_weights,
        "scale_attn_weights": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
