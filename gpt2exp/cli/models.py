"""Models: ``generate`` and ``evaluate``, from an MLflow model or imported Hugging Face weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gpt2exp.cli.options import JsonOpt, OutputOpt, TrackingUriOpt
from gpt2exp.cli.output import console, fail, print_json

ModelUriOpt = Annotated[
    str | None, typer.Option("--model-uri", help="runs:/<id>/model, models:/<name>@best, models:/<model_id>, or a model folder.")
]


def use_store(output: Path, tracking_uri: str | None) -> str:
    """Point MLflow at --tracking-uri, else MLFLOW_TRACKING_URI, else the project's SQLite store."""
    import mlflow

    from gpt2exp.tracking.runs import store_uri
    from gpt2exp.tracking.store import check_store

    uri = store_uri(output, tracking_uri)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def open_model(
    model_uri: str | None, pretrained: str | None = None, output: Path = Path("outputs"), tracking_uri: str | None = None
):  # noqa: ANN201, RUF100
    """The model to use, from an MLflow URI / folder or imported Hugging Face weights; one-line errors."""
    from gpt2exp.data import get_tokenizer
    from gpt2exp.model import GPT

    if (model_uri is None) == (pretrained is None):
        raise fail("give exactly one model: --model-uri URI or --pretrained PATH_OR_NAME")
    try:
        if pretrained is not None:
            return GPT.from_pretrained(pretrained).eval(), get_tokenizer()
        from mlflow.exceptions import MlflowException

        from gpt2exp.tracking.pyfunc import load_model

        assert model_uri is not None  # exactly one of the two is given
        if ":/" in model_uri:
            use_store(output, tracking_uri)
        try:
            return load_model(model_uri)
        except MlflowException as e:
            raise ValueError(f"{model_uri}: {e.message.splitlines()[0]}") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise fail(str(e)) from None


def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "\n",
    model_uri: ModelUriOpt = None,
    pretrained: Annotated[str | None, typer.Option(help="Hugging Face GPT-2 folder or hub name (gpt2, ...).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 100,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1)] = 200,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    seed: Annotated[int, typer.Option()] = 1337,
    context: Annotated[
        int | None, typer.Option(min=1, help="Attend to at most this many tokens (default: the block size).")
    ] = None,
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Generate text from a model, streaming tokens to the terminal."""
    import torch

    from gpt2exp.data import EOT

    model, enc = open_model(model_uri, pretrained, output, tracking_uri)
    model.check_context(context or 0)  # before the prompt is echoed: ContextTooLong, one line
    idx = torch.tensor([enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]])  # "": from a document start
    gen = torch.Generator().manual_seed(seed)
    sys.stdout.write(prompt)
    new: list[int] = []
    shown = 0
    for tok in model.stream(idx, max_new_tokens, temperature, top_k, top_p, eos=EOT, generator=gen, context=context):
        if tok.item() == EOT:
            break
        new.append(int(tok.item()))
        text = enc.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write(enc.decode(new)[shown:] + "\n")


def evaluate(
    data: Annotated[Path, typer.Option(help="A text file, folder or glob to score.")],
    model_uri: ModelUriOpt = None,
    pretrained: Annotated[str | None, typer.Option(help="Hugging Face GPT-2 folder or hub name.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Score at most this many tokens.")] = 1_000_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    context: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Score every token with a context of about N tokens, past block_size too (not with learned positions): "
            "windows of N tokens advancing by --stride, each scoring its last stride tokens (the first window all of its "
            "own), so each token after the first window sees N-stride+1 to N tokens. Default: non-overlapping windows "
            "of the model's block_size.",
            show_default=False,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens between windows: each token sees N-stride+1 to N tokens for N/stride forwards per token. Default "
            "with --context: N/2 (N/2+1 to N tokens, two forwards per token; 1 gives exactly N); without: block_size.",
            show_default=False,
        ),
    ] = None,
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score new text with a model: loss, perplexity and tokens, same tokenizer; at the block size or at --context N."""
    import math

    from gpt2exp.model.gpt import ContextTooLong
    from gpt2exp.training.evaluate import default_stride, score_files

    model, enc = open_model(model_uri, pretrained, output, tracking_uri)
    block = model.spec.block_size
    n = context or block
    if (limit := model.max_context) is not None and n > limit:
        raise ContextTooLong(
            f"--context {n} is longer than the {limit} positions of this model's learned positions; give --context {limit} or less"
        )
    step = stride or (default_stride(n) if context else n)  # no --context: non-overlapping block_size windows
    if step > n:
        raise fail(f"--stride {step} is longer than the context {n}; give at most {n}", code=2)
    loss, se, n_tokens = score_files(model, enc, str(data), max_tokens, n, step, batch_size)
    result = dict(context=n, stride=step, block_size=block, tokens=n_tokens, loss=loss, loss_se=se, perplexity=math.exp(loss))
    if as_json:
        print_json(result)
        return
    console.print(
        f"context {n} (block {block}) · stride {step} · {n_tokens:,} tokens scored · loss {loss:.4f} ± {se:.4f} (se) · "
        f"perplexity {math.exp(loss):.2f}"
    )
