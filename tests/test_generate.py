"""``gpt2exp generate --context`` end to end, on a tiny RoPE model trained for a few steps on the
Shakespeare corpus with the real GPT-2 tokenizer, generating well past its block of 16 tokens. (The
pyfunc model's ``context`` param: tests/test_tracking.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from gpt2exp import cli
from gpt2exp.data import EOT, get_tokenizer
from gpt2exp.model import GPT
from gpt2exp.spec import ModelSpec
from gpt2exp.tracking.pyfunc import load_model
from gpt2exp.training.checkpoint import save_final

PROMPT, NEW, SEED = "ROMEO:", 24, 3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(corpus_head, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer RoPE model (block 16) after 10 AdamW steps on the corpus' first 20 kB, saved as final weights."""
    data = torch.tensor(get_tokenizer().encode_ordinary(corpus_head(20_000).read_text()))
    spec = ModelSpec(vocab_size=50304, block_size=16, n_layer=2, n_head=2, n_embd=32, positional="rope")
    model = GPT(spec, seed=0)
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        batch = torch.stack([data[i : i + 17] for i in torch.randint(len(data) - 17, (8,), generator=g).tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    folder = tmp_path_factory.mktemp("generate") / "model"
    save_final(folder, model, spec)
    return folder


def invoke(*args: str) -> Result:
    options = ["--prompt", PROMPT, "--max-new-tokens", str(NEW), "--temperature", "1", "--seed", str(SEED)]
    return CliRunner().invoke(cli.app, ["generate", *options, *args])


def expected(folder: Path, context: int | None) -> str:
    """What the model in memory samples (the CLI's top_k of 200), attending to ``context`` tokens."""
    model, tokenizer = load_model(str(folder))
    idx, gen = torch.tensor([tokenizer.encode(PROMPT)]), torch.Generator().manual_seed(SEED)
    tokens = model.generate(idx, NEW, 1.0, top_k=200, eos=EOT, generator=gen, context=context)[0, idx.size(1) :].tolist()
    return tokenizer.decode([t for t in tokens if t != EOT])


def test_generate_context_option(trained: Path) -> None:
    """The default context (a rolling cache past block 16) and a narrower one give the text of the model in
    memory. (A model this briefly trained hardly uses its context, so the two texts may agree with each
    other: what a context changes is tested on the model in tests/test_model.py.)"""
    for context in (None, 4):
        result = invoke("--model-uri", str(trained), *(["--context", str(context)] if context else []))
        assert result.exit_code == 0, (result.stderr, result.exception)
        assert result.stdout == PROMPT + expected(trained, context) + "\n"


def test_generate_context_past_learned_positions_is_one_line(tmp_path: Path) -> None:
    spec = ModelSpec(vocab_size=50304, block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_final(tmp_path / "m", GPT(spec, seed=0), spec)
    result = invoke("--model-uri", str(tmp_path / "m"), "--context", "17")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: 17 tokens is longer than the 16 positions a model with learned positions has (block_size=16); "
        "give at most 16 tokens of context"
    )
