"""Multi-GPU plans: the planner picks the cheapest strategy that fits, the report says how to launch it, the
single-GPU QLoRA plan stands beside it, and bad --gpus / --strategy input is one line with exit code 2."""

import json

import pytest
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.estimator import estimate
from peftpick.estimator.sharding import per_gpu
from peftpick.knowledge.architectures import resolve_model
from peftpick.recommender import request as request_module
from peftpick.types import Strategy


@pytest.fixture
def no_deepspeed(monkeypatch):
    """What auto chooses from must not depend on whether this machine has DeepSpeed."""
    monkeypatch.setattr(request_module, "deepspeed_installed", lambda: False)


@pytest.fixture(scope="module")
def seventy_b():
    request_module_installed = request_module.deepspeed_installed
    request_module.deepspeed_installed = lambda: False
    try:
        return peftpick.recommend("llama-3.1-70b", 80, "vllm", gpus=4, probe=False, methods=["lora", "rslora"],
                                  workers=2)
    finally:
        request_module.deepspeed_installed = request_module_installed


def test_seventy_b_on_four_80gb_gpus_gets_an_fsdp2_plan_that_fits(seventy_b):
    best = seventy_b.best
    assert best is not None and best.plan.strategy == "fsdp2" and best.plan.gpus == 4
    assert best.plan.fit == "fits"
    # it would not fit one GPU: the bf16 weights alone are 131 GiB
    single = peftpick.recommend("llama-3.1-70b", 80, "vllm", probe=False, methods=["lora"], workers=2)
    assert single.best is None and single.excluded[0].constraint == "memory"
    # each GPU holds a quarter of the weights, and the batch of 4 is shared: one sequence per GPU and step
    assert best.estimate.rank_state["parameters"] == pytest.approx(70.6e9 * 2 / 4, rel=0.01)
    assert best.plan.micro_batch * best.plan.gradient_accumulation * best.plan.gpus == 4


def test_the_report_prints_the_launch_command_its_config_and_the_qlora_alternative(seventy_b):
    text = seventy_b.report("markdown")
    assert "accelerate launch --config_file accelerate_config.yaml train.py" in text
    assert "fsdp_version: 2" in text and "fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer" in text
    assert "FULL_STATE_DICT" in text and "accelerate merge-weights" in text
    assert "Alternative: QLoRA on 1 GPU" in text
    alternative = seventy_b.alternative
    assert alternative.plan.fit == "fits" and alternative.plan.gpus == 1
    assert alternative.plan.estimate.shape.quant == "4bit"
    assert "QLoRA is cheaper in GPUs: 1 instead of 4" in alternative.comparison
    data = seventy_b.to_dict()
    assert data["request"]["gpus"] == 4
    plan = data["ranked"][0]["plan"]
    assert plan["strategy"] == "fsdp2" and "accelerate_config.yaml" in plan["launch"]["files"]
    assert data["alternative"]["method"] == "lora" and data["alternative"]["fit"] == "fits"
    json.dumps(data, allow_nan=False)


def test_no_sharding_when_one_gpu_is_enough(no_deepspeed):
    rec = peftpick.recommend("llama-3.2-1b", 24, "vllm", gpus=2, probe=False, methods=["lora"], workers=2)
    assert rec.best.plan.strategy == "ddp"
    assert "torchrun --standalone --nproc_per_node 2" in rec.report("markdown")


def test_a_named_strategy_is_used_even_where_a_cheaper_one_fits(no_deepspeed):
    rec = peftpick.recommend("llama-3.2-1b", 24, "vllm", gpus=2, strategy="fsdp2", probe=False, methods=["lora"],
                             workers=2)
    assert rec.best.plan.strategy == "fsdp2"
    # DDP fits too (test_no_sharding_when_one_gpu_is_enough); FSDP2 keeps half of the bf16 weights per GPU
    model_bytes = 2 * rec.best.estimate.total_params
    assert model_bytes / 2 <= rec.best.estimate.rank_state["parameters"] <= 1.01 * model_bytes / 2


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_full_fine_tuning_of_a_mixture_of_experts_differs_most_between_strategies(name):
    arch = resolve_model(name)
    single = estimate(name, "full", batch_size=1, seq_len=256, gradient_checkpointing=True)
    figures = {s: per_gpu(single, arch, 8, s).peak_allocated_bytes for s in
               (Strategy.DDP, Strategy.ZERO2, Strategy.FSDP2, Strategy.ZERO3, Strategy.ZERO3_OFFLOAD)}
    # DDP keeps everything (and a second copy of the gradients); ZeRO-2 shards the optimizer state and
    # gradients; FSDP2 and ZeRO-3 the weights too; offload leaves little more than the activations
    assert figures[Strategy.DDP] > single.peak_allocated_bytes
    assert figures[Strategy.DDP] > figures[Strategy.ZERO2] > figures[Strategy.FSDP2] > figures[Strategy.ZERO3_OFFLOAD]
    assert figures[Strategy.ZERO2] > figures[Strategy.ZERO3]
    assert figures[Strategy.DDP] > 5 * figures[Strategy.FSDP2]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("arguments, words", [
    (["--gpus", "0"], "--gpus must be a positive whole number"),
    (["--gpus", "-2"], "--gpus must be a positive whole number"),
    (["--gpus", "99"], "larger than any training run uses"),
    (["--strategy", "fsdp2"], "--strategy fsdp2 spreads training over several GPUs, and --gpus is 1"),
    (["--gpus", "4", "--strategy", "zero9"], "unknown --strategy 'zero9'"),
    (["--gpus", "4", "--strategy", "zero3"], "trains with DeepSpeed, which is not installed here"),
    (["--gpus", "4", "--strategy", "fsdp2", "--quant", "4bit"], "sharding a 4bit quantized base"),
    (["--gpus", "4", "--strategy", "single"], "--strategy single trains on one GPU"),
])
def test_bad_gpus_and_strategy_are_one_line_with_exit_code_2(arguments, words, no_deepspeed):
    result = CliRunner().invoke(app, ["--model", "llama-3.2-1b", "--vram", "24", *arguments])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_gpus_that_are_not_a_number_are_refused_by_the_parser():
    result = CliRunner().invoke(app, ["--model", "llama-3.2-1b", "--vram", "24", "--gpus", "two"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_denoiser_is_refused_a_multi_gpu_plan():
    with pytest.raises(PeftpickError, match="multi-GPU plans are for language models"):
        peftpick.recommend("flux.2-klein-4b", 24, gpus=2, probe=False)


def test_under_fsdp2_checkpointing_is_fsdps_own_and_not_also_the_models(no_deepspeed):
    rec = peftpick.recommend("llama-3.1-8b", 16, "vllm", gpus=2, strategy="fsdp2", probe=False, methods=["lora"],
                             workers=2)
    best = rec.best
    assert best.plan.strategy == "fsdp2" and best.plan.gradient_checkpointing and best.plan.fit == "fits"
    data = rec.to_dict()
    assert "fsdp_activation_checkpointing: true" in data["ranked"][0]["plan"]["launch"]["files"]["accelerate_config.yaml"]
    arguments = best.training_arguments("out", use_cpu=True, bf16=False)
    assert arguments.activation_checkpointing is False  # the model-level switch would add an all-gather in backward
    snippet = data["peft_snippet"]
    assert "gradient_checkpointing_enable" not in snippet and "FSDP's activation checkpointing" in snippet
    assert "activation_checkpointing=False" in snippet
