"""Matched budgets: a FLOPs budget gives variants of different cost different step counts, a wider MLP
parameter-matches GQA to MHA, and ``gpt2exp validate`` shows what each variant costs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gpt2exp import cli
from gpt2exp.launch.plan import total_steps
from gpt2exp.model import GPT
from gpt2exp.model.size import flops_per_token, kv_bytes_per_token, num_params
from gpt2exp.spec import ExperimentSpec, ModelSpec, SpecError, load_spec, validate_spec

MODEL = {"vocab_size": 256, "block_size": 128, "n_layer": 2, "n_head": 4, "n_embd": 64}


def flops_spec(max_flops: float) -> ExperimentSpec:
    return validate_spec(
        {
            "name": "flops",
            "model": MODEL,
            "train": {"max_flops": max_flops, "batch_size": 4},
            "variants": [
                {"name": "mha", "set": {}},
                {"name": "gqa_sw", "set": {"model.n_kv_head": 2, "model.sliding_window": 32}},
            ],
        }
    )


def test_flops_budget_gives_the_cheaper_variant_more_steps() -> None:
    # by hand: N = 2 layers x (2 LN 256 + c_attn 64x192+192 + c_proj 64x64+64 + c_fc 64x256+256 + c_proj 256x64+64)
    #   + ln_f 128 + tied head 256x64 = 2 x 49,984 + 128 + 16,384 = 116,480 (MHA); GQA-2 drops 2 layers x 2 kv heads x
    #   (k, v) 2 x (64x16+16) = 8,320. FLOPs/token = 6N + 12 L H hs T: MHA 6 x 116,480 + 12x2x4x16x128 = 895,488;
    #   GQA-2 with a 32-token window 6 x 108,160 + 12x2x4x16x32 = 698,112
    mha_fpt, gqa_fpt = 895_488, 698_112
    per_step = 4 * 128  # tokens: batch x block
    spec = flops_spec(1000 * mha_fpt * per_step)
    mha, gqa = (v.spec for v in spec.expand())
    assert (flops_per_token(mha.model), flops_per_token(gqa.model)) == (mha_fpt, gqa_fpt)
    with torch.device("meta"):
        assert GPT(gqa.model).flops_per_token() == gqa_fpt
    assert total_steps(mha, 0) == 1000
    assert total_steps(gqa, 0) == round(1000 * mha_fpt / gqa_fpt) == 1283  # 28% more steps for the same FLOPs
    # the nearest step count: every variant's training FLOPs within half a step of the budget
    for v in (mha, gqa):
        assert (
            abs(total_steps(v, 0) * flops_per_token(v.model) * per_step - spec.train.max_flops)
            <= 0.5 * flops_per_token(v.model) * per_step
        )
    assert total_steps(flops_spec(1.0).expand()[0].spec, 0) == 1  # a budget below one step still trains one


@pytest.mark.parametrize("other", ["max_steps", "max_tokens", "max_epochs"])
def test_flops_budget_is_exclusive(other: str) -> None:
    with pytest.raises(
        SpecError, match=rf"train: give one budget \(max_steps, max_tokens, max_epochs or max_flops\), got {other}, max_flops"
    ):
        validate_spec({"name": "t", "train": {"max_flops": 1e15, other: 10}})


def test_wider_mlp_parameter_matches_gqa_to_mha() -> None:
    """GPT-2 small: GQA-4 drops 8 of 12 kv heads' k and v projections, 12 layers x 2 x 8 x (768x64 + 64) = 9,449,472
    parameters. A hidden unit of the MLP costs 768 (c_fc weight) + 1 (its bias) + 768 (c_proj weight) = 1,537 per
    layer, 18,444 for 12 layers: 9,449,472 / 18,444 = 512.3, so mlp_hidden = 3072 + 512 = 3584 leaves 6,144 (0.005%)."""
    mha, gqa = ModelSpec(), ModelSpec(n_kv_head=4)
    matched = ModelSpec(n_kv_head=4, mlp_hidden=3584)
    assert num_params(mha) - num_params(gqa) == 9_449_472
    assert num_params(mha) - num_params(matched) == 6_144
    assert abs(num_params(matched) / num_params(mha) - 1) < 0.01 and num_params(gqa) / num_params(mha) < 0.93
    with torch.device("meta"):
        built = GPT(matched)
    assert built.transformer.h[0].mlp.c_fc.weight.shape == (3584, 768)
    assert (built.num_params(), built.num_params(True), built.flops_per_token()) == (
        num_params(matched),
        num_params(matched, exclude_embeddings=True),
        flops_per_token(matched),
    )
    assert kv_bytes_per_token(matched) == kv_bytes_per_token(mha) // 3  # the cache stays GQA's


def test_validate_shows_what_each_variant_costs(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: cost\n"
        f"model: {json.dumps(MODEL)}\n"
        f"train: {{max_flops: {1000 * 895_488 * 512}, batch_size: 4}}\n"
        "variants:\n  - {name: mha, set: {}}\n  - {name: mqa, set: {model.n_kv_head: 1, model.mlp_hidden: 288}}\n"
    )
    result = CliRunner().invoke(cli.app, ["validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(result.output)["variants"]}
    mha, mqa = (v.spec for v in load_spec(path).expand())
    # MQA with mlp_hidden 288: 3 kv heads x 2 x (64x16+16) = 6,240 fewer per layer, 32 x (64+1+64) = 4,128 more
    assert num_params(mqa.model) == num_params(mha.model) - 2 * (6_240 - 4_128)
    for row, spec in ((rows["mha"], mha), (rows["mqa"], mqa)):
        steps = round(1000 * 895_488 / flops_per_token(spec.model))
        assert row == {
            "variant": row["variant"],
            "attention": spec.model.attention_kind,
            "positional": "learned",
            "params": num_params(spec.model),
            "non_embedding_params": num_params(spec.model, exclude_embeddings=True),
            "flops_per_token": flops_per_token(spec.model),
            "kv_bytes_per_token": 2 * 2 * spec.model.n_kv_head * 16 * 4,  # 2 (k, v) x layers x kv heads x hs x fp32
            "kv_dtype_bytes": 4,
            "steps": steps,
            "tokens": steps * 512,
            "train_flops": steps * 512 * flops_per_token(spec.model),
        }
    assert rows["mha"]["steps"] == 1000 and rows["mqa"]["kv_bytes_per_token"] == 256
    table = CliRunner().invoke(cli.app, ["validate", str(path)], terminal_width=200)
    assert table.exit_code == 0, table.output
    for text in ("non-emb.", "KV B/token (fp32)", "train FLOPs", "1,024", "256", "1,000", f"{rows['mqa']['steps']:,}"):
        assert text in table.output
    assert "FLOPs ·" in table.output and math.isfinite(rows["mqa"]["train_flops"])


def test_bf16_halves_the_kv_bytes() -> None:
    spec = validate_spec({"name": "t", "train": {"max_steps": 1, "precision": "bf16"}, "model": {"n_kv_head": 4}})
    from gpt2exp.model.size import run_kv_bytes_per_token

    assert run_kv_bytes_per_token(spec) == 2 * 12 * 4 * 64 * 2 == 12_288  # GPT-2 small GQA-4, bf16
    assert kv_bytes_per_token(ModelSpec()) == 2 * 12 * 12 * 64 * 4 == 73_728  # MHA, fp32
