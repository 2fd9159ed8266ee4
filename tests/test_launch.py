"""The launch files the report prints are read by the tools themselves: accelerate's config reader and launch
environment builder, and DeepSpeed's own config classes (`-m deepspeed`; CI installs DeepSpeed after the main
suite)."""

import json
import os

import pytest

import peftpick
from peftpick.recommender import request as request_module
from peftpick.report.launch import ACCELERATE_CONFIG, DEEPSPEED_CONFIG, launch_for


STRATEGIES = ("ddp", "fsdp2", "fsdp2-offload", "zero2", "zero2-offload", "zero3", "zero3-offload")


@pytest.fixture(scope="module")
def planned():
    """One recommendation per strategy (the same estimates: traced once, then read from the cache)."""
    installed = request_module.deepspeed_installed
    request_module.deepspeed_installed = lambda: True
    try:
        return {strategy: peftpick.recommend("llama-3.2-1b", 24, "vllm", gpus=2, strategy=strategy, probe=False,
                                             methods=["lora"], workers=1) for strategy in STRATEGIES}
    finally:
        request_module.deepspeed_installed = installed


def _launch(strategy: str, planned):
    rec = planned[strategy]
    assert rec.best.plan.strategy == strategy
    return rec, launch_for(rec.best, rec)


def _accelerate_environment(tmp_path, launch) -> dict[str, str]:
    """What `accelerate launch --config_file F train.py` puts in the training processes' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    for file in launch.files:
        (tmp_path / file.name).write_text(file.text)
    args = launch_command_parser().parse_args(["--config_file", str(tmp_path / ACCELERATE_CONFIG), "train.py"])
    args, _defaults, _mixed_precision = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("strategy, offload", [("fsdp2", False), ("fsdp2-offload", True)])
def test_accelerate_reads_the_fsdp2_config_as_planned(strategy, offload, tmp_path, monkeypatch, planned):
    rec, launch = _launch(strategy, planned)
    args, env = _accelerate_environment(tmp_path, launch)
    assert args.nproc_per_node == "2" and env["ACCELERATE_USE_FSDP"] == "true"
    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.activation_checkpointing == rec.best.plan.gradient_checkpointing
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == offload


def test_accelerate_reads_the_ddp_config(tmp_path, planned):
    _rec, launch = _launch("ddp", planned)
    args, env = _accelerate_environment(tmp_path, launch)
    assert args.multi_gpu and args.nproc_per_node == "2" and "ACCELERATE_USE_FSDP" not in env


@pytest.mark.parametrize("strategy", ["zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_the_deepspeed_files_name_the_planned_stage_and_batch(strategy, planned):
    rec, launch = _launch(strategy, planned)
    files = {file.name: file.text for file in launch.files}
    config = json.loads(files[DEEPSPEED_CONFIG])
    stage3 = strategy.startswith("zero3")
    assert config["zero_optimization"]["stage"] == (3 if stage3 else 2)
    assert config["train_micro_batch_size_per_gpu"] == rec.best.plan.micro_batch
    assert ("offload_optimizer" in config["zero_optimization"]) == strategy.endswith("offload")
    assert f"deepspeed_config_file: {DEEPSPEED_CONFIG}" in files[ACCELERATE_CONFIG]


@pytest.mark.deepspeed
@pytest.mark.parametrize("strategy", ["zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_deepspeed_accepts_the_config(strategy, planned):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    rec, launch = _launch(strategy, planned)
    config = json.loads(next(f.text for f in launch.files if f.name == DEEPSPEED_CONFIG))
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])  # pydantic: an unknown or mistyped key is refused
    assert int(zero.stage) == config["zero_optimization"]["stage"]
    hidden = rec.architecture.hidden_size
    assert zero.reduce_bucket_size == hidden * hidden
    if strategy.startswith("zero3"):
        assert zero.prefetch_bucket_size == int(0.9 * hidden * hidden)
        assert zero.param_persistence_threshold == 10 * hidden
        assert zero.gather_16bit_weights_on_model_save
    assert (zero.offload_optimizer is not None) == strategy.endswith("offload")
    assert (zero.offload_param is not None) == (strategy == "zero3-offload")
