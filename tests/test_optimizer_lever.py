"""The optimizer as a planning lever and as the user's choice: 8-bit AdamW where only it fits, --optimizer for
every method, and the plan's optimizer carried into the report, the snippet and the trainer's arguments."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.estimator import estimate
from peftpick.recommender.planning import CONTEXT_RESERVE_BYTES, FIT_HEADROOM
from peftpick.types import GIB

MODEL = "qwen2.5-0.5b"
SHAPE = {"seq_len": 64, "batch_size": 2}


def _need_gib(optimizer: str) -> float:
    """GiB full fine-tuning needs in the planner's most frugal setting (micro-batch 1, checkpointing)."""
    est = estimate(MODEL, "full", batch_size=1, seq_len=SHAPE["seq_len"], gradient_checkpointing=True,
                   optimizer=optimizer)
    return (est.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB


@pytest.fixture(scope="module")
def needs():
    return {name: _need_gib(name) for name in ("adamw", "adamw-8bit")}


def test_full_fine_tuning_that_fits_only_with_8bit_adamw_is_planned_with_it(needs):
    assert needs["adamw-8bit"] < needs["adamw"]
    vram = needs["adamw-8bit"] / (1 - FIT_HEADROOM) * 1.001  # fits with 8-bit AdamW; AdamW needs more
    assert needs["adamw"] > vram
    rec = peftpick.recommend(MODEL, vram, "vllm", methods=["full"], workers=1, **SHAPE)
    plan = rec.best.plan
    assert plan.fit == "fits" and plan.optimizer == "adamw-8bit"
    # bf16 weights: AdamW keeps two bf16 moments per weight, 8-bit AdamW two bytes (+ absmax per 256)
    params = plan.estimate.trainable_params
    assert 0.95 * 2 * params < plan.optimizer_saving_bytes <= 2 * params
    assert "8-bit AdamW" in rec.verdict and f"{plan.optimizer_saving_bytes / GIB:.1f} GiB" in rec.verdict
    arguments = rec.best.training_arguments("out", use_cpu=True, bf16=False).to_dict()
    assert arguments["optim"] == "adamw_bnb_8bit"
    document = peftpick.report.to_dict(rec)
    assert "bitsandbytes.optim.AdamW8bit(" in document["peft_snippet"]
    assert document["ranked"][0]["plan"]["optimizer"] == "adamw-8bit"
    assert document["ranked"][0]["plan"]["optimizer_saving_bytes"] == plan.optimizer_saving_bytes


def test_a_chosen_optimizer_is_kept_even_where_it_does_not_fit(needs):
    vram = needs["adamw-8bit"] / (1 - FIT_HEADROOM) * 1.001
    rec = peftpick.recommend(MODEL, vram, "vllm", methods=["full"], workers=1, optimizer="adamw", **SHAPE)
    assert not rec.ranked
    (excluded,) = [e for e in rec.excluded if e.method == "full"]
    assert excluded.constraint == "memory" and "8-bit" not in excluded.reason


def test_adapters_that_fit_with_adamw_are_not_switched():
    rec = peftpick.recommend(MODEL, 24, "vllm", methods=["lora", "lora-fa"], workers=1, **SHAPE)
    assert {r.method: r.plan.optimizer for r in rec.ranked} == {"lora": "adamw", "lora-fa": "lora-fa"}
    assert all(r.plan.optimizer_saving_bytes is None for r in rec.ranked)


def test_optimizer_option_applies_to_every_method_but_lora_fa(tmp_path):
    result = CliRunner().invoke(app, ["--model", MODEL, "--vram", "24", "--seq-len", "64", "--batch-size", "2",
                                      "--methods", "lora,lora-fa,ia3", "--optimizer", "sgd", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["request"]["optimizer"] == "sgd"
    optimizers = {r["method"]: r["plan"]["optimizer"] for r in document["ranked"]}
    assert optimizers == {"lora": "sgd", "ia3": "sgd", "lora-fa": "lora-fa"}
    rec = peftpick.recommend(MODEL, 24, "vllm", methods=["lora"], workers=1, optimizer="sgd", **SHAPE)
    snippet = peftpick.report.peft_snippet(rec.best)
    assert "torch.optim.SGD(" in snippet and "momentum=0.9" in snippet and "optimizer: SGD" in snippet
    # the Trainer builds the SGD the estimate traced (its "sgd" alone has no momentum)
    from transformers import Trainer

    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        rec.best.training_arguments("out", use_cpu=True, bf16=False))
    assert optimizer_class.__name__ == "SGD" and kwargs["momentum"] == 0.9
    # SGD keeps one momentum buffer per trainable weight, AdamW two: the estimates say so
    adamw = estimate(MODEL, "lora", optimizer="adamw", **SHAPE)
    sgd = estimate(MODEL, "lora", optimizer="sgd", **SHAPE)
    assert sgd.breakdown["optimizer"] * 2 == adamw.breakdown["optimizer"]


@pytest.mark.parametrize("value, words", [("rmsprop", "unknown --optimizer 'rmsprop'"),
                                          ("lora-fa", "LoRA-FA's optimizer trains LoRA adapters only")])
def test_bad_optimizer_is_one_line_with_exit_code_2(value, words):
    result = CliRunner().invoke(app, ["--model", MODEL, "--vram", "24", "--optimizer", value])
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output


def _traced_optimizers(vram: float, **kwargs) -> tuple[list[str], object]:
    from peftpick.recommender import planning

    estimated: list[str] = []
    original = planning._default_estimator

    def counting(arch, config, shape):
        estimated.append(shape.optimizer)
        return original(arch, config, shape)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planning, "_default_estimator", counting)
        rec = peftpick.recommend(MODEL, vram, "vllm", methods=["full"], workers=1, **SHAPE, **kwargs)
    return estimated, rec


def test_full_fine_tuning_is_not_traced_where_weights_gradients_and_the_least_optimizer_state_cannot_fit():
    """Weights + gradients (2 + 2 bytes per bf16 weight) + the state of the least optimizer the plan may use
    (8-bit AdamW with the lever: 2 bytes; a fixed AdamW: two bf16 moments, 4 bytes) exceed the VRAM: nothing is
    traced. Adafactor bounds nothing beyond weights and gradients, so at the same VRAM it is traced."""
    from peftpick.workloads import workload_of
    from peftpick.knowledge.architectures import resolve_model

    params = int(workload_of(resolve_model(MODEL)).hook("count_parameters")(resolve_model(MODEL)))
    def vram(bytes_per_weight: float) -> float:
        return (bytes_per_weight * params + CONTEXT_RESERVE_BYTES) / GIB

    between = vram(5)  # above weights + gradients, below them + 8-bit state
    estimated, rec = _traced_optimizers(between)
    assert estimated == [] and not rec.ranked
    reason = next(e.reason for e in rec.excluded if e.method == "full")
    assert "weights, gradients and 8-bit AdamW's two moments alone, not traced" in reason
    assert f"needs more than {vram(6):.1f} GiB" in reason
    estimated, _ = _traced_optimizers(vram(7), optimizer="adamw")  # below 2 + 2 + 4 bytes
    assert estimated == []
    estimated, _ = _traced_optimizers(between, optimizer="adafactor")
    assert estimated and set(estimated) == {"adafactor"}
