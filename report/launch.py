"""How to launch a multi-GPU plan: the command line, the accelerate (and DeepSpeed) config file it reads, and
what saving the adapter needs so that one adapter file comes out for serving.

The accelerate config keys are those `accelerate launch` reads (accelerate 1.15.0 commands/config/cluster.py and
utils/launch.py prepare_multi_gpu_env / prepare_deepspeed_cmd_env); tests/test_launch.py loads the file with
accelerate's own config reader and launch-environment builder. The DeepSpeed JSON's keys are DeepSpeed 0.19.6's
(deepspeed/runtime/zero/config.py), the bucket sizes the ones transformers fills in for "auto"
(estimator.sharding.zero_buckets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from peftpick.types import RankedCandidate, Recommendation, Strategy

TRAIN_SCRIPT = "train.py"  # the user's training script (the report's snippet, or --emit's)
ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "ds_config.json"


@dataclass(frozen=True)
class LaunchFile:
    name: str
    language: str  # "yaml" / "json"
    text: str


@dataclass(frozen=True)
class Launch:
    command: str
    files: tuple[LaunchFile, ...]
    saving: str  # how the trained adapter becomes one file for serving


def launch_for(ranked: RankedCandidate, rec: Recommendation) -> Launch | None:
    """The launch of `ranked`'s plan; None for a single-GPU plan (`python train.py`)."""
    plan = ranked.plan
    strategy = Strategy(plan.strategy)
    if strategy is Strategy.SINGLE:
        return None
    gpus = plan.gpus
    command = f"accelerate launch --config_file {ACCELERATE_CONFIG} {TRAIN_SCRIPT}"
    if strategy is Strategy.DDP:
        config = _accelerate_yaml("MULTI_GPU", gpus, {})
        return Launch(command + f"\n# or, without accelerate: torchrun --standalone --nproc_per_node {gpus} "
                      f"{TRAIN_SCRIPT}", (LaunchFile(ACCELERATE_CONFIG, "yaml", config),),
                      "every GPU holds the whole adapter: save it from rank 0 (the Trainer does) with "
                      "save_pretrained, as on one GPU")
    if strategy in (Strategy.FSDP2, Strategy.FSDP2_OFFLOAD):
        # without a class name accelerate wraps the model's _no_split_modules
        layer_class = ranked.estimate.layout.get("layer_class")
        fsdp = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"fsdp_transformer_layer_cls_to_wrap": layer_class} if layer_class else {}),
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": strategy is Strategy.FSDP2_OFFLOAD,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": plan.gradient_checkpointing,
        }
        return Launch(command, (LaunchFile(ACCELERATE_CONFIG, "yaml", _accelerate_yaml("FSDP", gpus, {"fsdp_config": fsdp})),),
                      "FULL_STATE_DICT gathers the sharded adapter on rank 0 when saving, so save_pretrained "
                      "(trainer.save_model()) writes one adapter_model.safetensors; a checkpoint saved as "
                      "SHARDED_STATE_DICT becomes one file with `accelerate merge-weights CHECKPOINT_DIR OUT_DIR`"
                      + (" (gradient checkpointing is set in the config: do not also call "
                         "gradient_checkpointing_enable)" if plan.gradient_checkpointing else ""))
    stage3 = strategy in (Strategy.ZERO3, Strategy.ZERO3_OFFLOAD)
    offload = strategy in (Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OFFLOAD)
    from peftpick.estimator.sharding import zero_buckets

    buckets = zero_buckets(rec.architecture)
    zero: dict = {"stage": 3 if stage3 else 2, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": buckets["reduce_bucket_size"]}
    if stage3:
        zero.update({"stage3_prefetch_bucket_size": buckets["stage3_prefetch_bucket_size"],
                     "stage3_param_persistence_threshold": buckets["stage3_param_persistence_threshold"],
                     "stage3_gather_16bit_weights_on_model_save": True})
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    deepspeed = {
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.gradient_accumulation,
        "gradient_clipping": 1.0,
    }
    accelerate = _accelerate_yaml("DEEPSPEED", gpus, {"deepspeed_config": {
        "deepspeed_config_file": DEEPSPEED_CONFIG, "zero3_init_flag": stage3}})
    saving = ("stage3_gather_16bit_weights_on_model_save gathers the partitioned adapter when saving, so "
              "save_pretrained writes one file; a ZeRO checkpoint alone becomes one with DeepSpeed's "
              "zero_to_fp32.py (saved beside it)" if stage3 else
              "ZeRO-2 keeps the weights whole on every GPU: save the adapter from rank 0 with save_pretrained")
    return Launch(command + f"\n# or: deepspeed --num_gpus {gpus} {TRAIN_SCRIPT} --deepspeed {DEEPSPEED_CONFIG}",
                  (LaunchFile(ACCELERATE_CONFIG, "yaml", accelerate),
                   LaunchFile(DEEPSPEED_CONFIG, "json", json.dumps(deepspeed, indent=2) + "\n")), saving)


def _accelerate_yaml(distributed_type: str, gpus: int, extra: dict) -> str:
    import yaml  # PyYAML: a requirement of transformers and accelerate

    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": distributed_type,
              "mixed_precision": "no" if distributed_type != "DEEPSPEED" else "bf16",
              "machine_rank": 0, "num_machines": 1, "num_processes": gpus, "rdzv_backend": "static",
              "same_network": True, "use_cpu": False, **extra}
    return yaml.safe_dump(config, sort_keys=False)
