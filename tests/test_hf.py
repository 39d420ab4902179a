"""Parity with ``transformers.GPT2LMHeadModel``: import of its checkpoints, export of ours,
greedy generation, and clear errors for what cannot be converted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from gpt2exp.model import GPT
from gpt2exp.spec import ModelSpec

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB, N_POS = 50257, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, which only slow small ops on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_config(tie: bool = True, **kw: object) -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=N_POS, vocab_size=VOCAB, tie_word_embeddings=tie, **kw)


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Sizeable random values everywhere (LayerNorm scales around 1), so that a transposed or
    misplaced tensor shows in the logits instead of hiding under near-zero initial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "ln_" in name and name.endswith("weight") else noise)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, randomly initialised transformers GPT-2 (tied or untied LM head)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(tie=request.param))
    randomize_(model)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def idx() -> Tensor:
    return torch.randint(0, VOCAB, (2, N_POS), generator=torch.Generator().manual_seed(0))


def hf_logits(model: GPT2LMHeadModel, idx: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=idx, use_cache=False).logits


def our_logits(model: GPT, idx: Tensor) -> Tensor:
    with torch.no_grad():
        return model(idx)[0]


# ------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_from_pretrained_matches_transformers(hf_folder: Path, idx: Tensor, attn: str) -> None:
    hf = GPT2LMHeadModel.from_pretrained(hf_folder, attn_implementation=attn).eval()
    ours = GPT.from_pretrained(hf_folder).eval()
    assert ours.spec.n_layer == 2 and ours.spec.block_size == N_POS and ours.spec.vocab_size == VOCAB
    assert ours.spec.tie_weights == hf.config.tie_word_embeddings
    expected = hf_logits(hf, idx)
    assert expected.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(our_logits(ours, idx), expected, rtol=0, atol=1e-4)


def test_untied_head_is_loaded_separately(hf_folder: Path) -> None:
    hf = GPT2LMHeadModel.from_pretrained(hf_folder)
    ours = GPT.from_pretrained(hf_folder)
    tied = hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.transformer.wte.weight, hf.transformer.wte.weight, rtol=0, atol=0)
    if not tied:
        assert not torch.equal(ours.lm_head.weight, ours.transformer.wte.weight)


def test_from_pretrained_overrides(hf_folder: Path) -> None:
    ours = GPT.from_pretrained(hf_folder, dropout=0.1)
    assert ours.spec.dropout == 0.1


def test_old_style_checkpoint(hf_folder: Path, tmp_path: Path, idx: Tensor) -> None:
    """Keys without the ``transformer.`` prefix, causal-mask buffers, pytorch_model.bin (as in the
    original OpenAI-converted checkpoints) load too."""
    from safetensors.torch import load_file

    state = load_file(hf_folder / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS)
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(old, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    torch.testing.assert_close(our_logits(GPT.from_pretrained(tmp_path), idx), our_logits(GPT.from_pretrained(hf_folder), idx))


# ------------------------------------------------------------------------------------ export
def our_model(**spec: object) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelSpec(vocab_size=VOCAB, block_size=N_POS, n_layer=2, n_head=4, n_embd=64, **spec))
    randomize_(model, seed=1)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_pretrained_loads_in_transformers(tmp_path: Path, idx: Tensor, tie: bool) -> None:
    ours = our_model(tie_weights=tie)
    folder = ours.save_pretrained(tmp_path / "export")
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == tie
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(ours, idx), rtol=0, atol=1e-4)
    # and back
    torch.testing.assert_close(our_logits(GPT.from_pretrained(folder), idx), our_logits(ours, idx), rtol=0, atol=0)


def test_mlp_hidden_round_trips_as_n_inner(tmp_path: Path, idx: Tensor) -> None:
    """A widened MLP (mlp_hidden 96 != 4 x 64) exports as transformers' n_inner, and an n_inner checkpoint imports."""
    ours = our_model(mlp_hidden=96)
    folder = ours.save_pretrained(tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["n_inner"] == 96
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    assert hf.transformer.h[0].mlp.c_fc.weight.shape == (64, 96)  # Conv1D: (in, out)
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(ours, idx), rtol=0, atol=1e-4)
    back = GPT.from_pretrained(folder)
    assert back.spec.mlp_hidden == 96 and back.num_params() == ours.num_params()
    torch.testing.assert_close(our_logits(back, idx), our_logits(ours, idx), rtol=0, atol=0)
    theirs = GPT2LMHeadModel(hf_config(n_inner=128))  # and from transformers' side
    randomize_(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = GPT.from_pretrained(tmp_path / "theirs")
    assert loaded.spec.mlp_width == 128
    torch.testing.assert_close(our_logits(loaded, idx), hf_logits(theirs.eval(), idx), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        {"positional": "rope"},
        {"positional": "alibi"},
        {"positional": "sinusoidal"},
        {"n_kv_head": 2},
        {"n_kv_head": 1},
        {"sliding_window": 16},
        {"bias": False},
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_export_of_non_gpt2_model_is_refused(tmp_path: Path, spec: dict) -> None:
    model = our_model(**spec)
    with pytest.raises(ValueError, match="only GPT-2-shaped models export"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ errors
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        GPT.from_pretrained(tmp_path / "does-not-exist")


def test_folder_without_config(hf_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        GPT.from_pretrained(tmp_path)


def test_folder_without_weights(hf_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or pytorch_model\.bin"):
        GPT.from_pretrained(tmp_path)


def test_other_model_type(hf_folder: Path, tmp_path: Path) -> None:
    cfg = json.loads((hf_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' is not gpt2"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"activation_function": "relu"},
        {"scale_attn_by_inverse_layer_idx": True},
        {"scale_attn_weights": False},
        {"layer_norm_epsilon": 1e-3},
    ],
    ids=lambda c: next(iter(c)),
)
def test_unsupported_gpt2_options_are_refused(hf_folder: Path, tmp_path: Path, change: dict) -> None:
    """GPT-2 configs that GPT cannot reproduce fail loudly instead of loading into wrong logits."""
    cfg = json.loads((hf_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    (tmp_path / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=next(iter(change))):
        GPT.from_pretrained(tmp_path)


# -------------------------------------------------------------------------------- generation
def test_greedy_generation_matches_transformers(hf_folder: Path) -> None:
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).double().eval()
    hf.generation_config.eos_token_id = None  # generate all 20 tokens, as ours does without eos
    ours = GPT.from_pretrained(hf_folder).double().eval()
    prompt = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=20,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    got = ours.generate(prompt, 20, temperature=0, use_cache=True)
    assert got.shape == (2, 28)
    assert torch.equal(got, expected)
