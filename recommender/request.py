"""Every user-facing parameter of a recommendation is checked here, once, with a message that names the fix."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

from peftpick.errors import PeftpickError
from peftpick.types import Goal, LossKernel, Optimizer, Quant, Request, Serve, Strategy, Trainer

# The largest memory of a single accelerator on sale when this was written (AMD MI355X, 288 GB); anything
# above is a typo or the memory of several GPUs, which one training process cannot pool.
LARGEST_GPU_GIB = 288
MAX_SEQ_LEN = 1 << 20
MAX_RESOLUTION = 8192  # pixels per side; no denoiser here trains beyond 4K
MAX_FRAMES = 1025
MAX_GPUS = 16  # GPUs of one node: peftpick plans single-node runs (torchrun --standalone)
# what has something to shard on one GPU: only the CPU-offload variants
ONE_GPU_STRATEGIES = (Strategy.AUTO, Strategy.SINGLE, Strategy.FSDP2_OFFLOAD, Strategy.ZERO3_OFFLOAD)

E = TypeVar("E", bound=Enum)


def _choice(value: Any, enum: type[E], option: str) -> E:
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise PeftpickError(f"unknown {option} {value!r}", f"use one of: {choices}") from None


def _positive_int(value: Any, option: str, example: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftpickError(f"{option} must be a positive whole number, got {value!r}", f"pass e.g. {example}")
    if upper is not None and value > upper:
        raise PeftpickError(f"{option} {value} is larger than any training run uses (limit {upper})", f"pass e.g. {example}")
    return value


def validate_vram(vram_gb: Any) -> float:
    try:
        vram = float(vram_gb)
    except (TypeError, ValueError):
        raise PeftpickError(f"--vram must be a number of GiB, got {vram_gb!r}", "pass e.g. --vram 24") from None
    if not math.isfinite(vram) or vram <= 0:
        raise PeftpickError(f"--vram must be a positive number of GiB, got {vram_gb!r}", "pass e.g. --vram 24")
    if vram > LARGEST_GPU_GIB:
        raise PeftpickError(
            f"--vram {vram:g} GiB is more than any single GPU has (largest: {LARGEST_GPU_GIB} GiB)",
            "pass the memory of one GPU, and --gpus N for several",
        )
    if vram < 1:
        raise PeftpickError(
            f"--vram {vram:g} GiB is too small to train any causal LM",
            "pass the GPU memory in GiB (e.g. 16 for a 16 GB card), not in TB or as a fraction",
        )
    return vram


def validate_request(
    model: Any,
    vram_gb: Any = None,
    serve: Any = Serve.VLLM,
    multi_adapter: bool = False,
    quant: Any = Quant.NONE,
    goal: Any = Goal.BALANCED,
    seq_len: Any = 768,
    batch_size: Any = None,
    resolution: Any = None,
    frames: Any = None,
    cached_inputs: Any = True,
    loss: Any = None,
    trainer: Any = Trainer.PLAIN,
    gpus: Any = 1,
    strategy: Any = Strategy.AUTO,
    optimizer: Any = None,
) -> Request:
    """A Request with defaults filled in; vram_gb None means the detected GPU's total memory. loss None lets the
    planner pick Liger's fused cross-entropy where the stock loss does not fit without checkpointing; optimizer
    None lets it pick bitsandbytes' 8-bit AdamW for a method that fits no other way.

    resolution / frames / cached_inputs apply to diffusion denoisers (checked against the model once it is
    resolved: `validate_for_model`)."""
    if trainer in (Trainer.TRL, "trl") and loss in (LossKernel.LIGER, "liger"):
        raise PeftpickError("TRL's SFTTrainer computes the loss with its own fused LM head and refuses Liger's "
                            "fused cross-entropy (trl 1.16.0 sft_trainer.py)",
                            "drop --loss liger with --trainer trl (its chunked head is used), or use --trainer hf")
    if model is None or (isinstance(model, str) and not model.strip()):
        raise PeftpickError("no model given", "pass --model with a bundled name (peftpick models), a local folder or a hub id")
    vram_source = "given"
    if vram_gb is None:
        vram_gb, vram_source = _gpu_of_model(model)
    if vram_gb is None:
        from peftpick.probes.device import detect_gpu

        gpu = detect_gpu()
        if gpu is None:
            raise PeftpickError(
                "no GPU found to read the memory size from",
                "pass --vram with the GPU memory in GiB, e.g. --vram 24",
            )
        vram_gb = gpu.total_gib
        vram_source = f"detected: {gpu.name}"
    return Request(
        model=model if isinstance(model, str) else getattr(model, "name_or_path", None) or type(model).__name__,
        vram_gib=validate_vram(vram_gb),
        serve=_choice(serve if serve is not None else Serve.VLLM, Serve, "--serve"),
        serve_given=serve is not None,
        multi_adapter=bool(multi_adapter),
        quant=_choice(quant, Quant, "--quant"),
        goal=_choice(goal, Goal, "--goal"),
        seq_len=_positive_int(seq_len, "--seq-len", "--seq-len 768", MAX_SEQ_LEN),
        batch_size=_positive_int(batch_size if batch_size is not None else 4, "--batch-size", "--batch-size 4", 4096),
        batch_given=batch_size is not None,
        vram_source=vram_source,
        resolution=None if resolution is None else _positive_int(resolution, "--resolution", "--resolution 1024",
                                                                 MAX_RESOLUTION),
        frames=None if frames is None else _positive_int(frames, "--frames", "--frames 81", MAX_FRAMES),
        cached_inputs=bool(cached_inputs),
        loss=None if loss is None else _choice(loss, LossKernel, "--loss"),
        trainer=_choice(trainer, Trainer, "--trainer"),
        optimizer=_optimizer_choice(optimizer),
        **validate_gpus(gpus, strategy, quant),
    )


def _optimizer_choice(optimizer: Any) -> Optimizer | None:
    """The optimizer every method trains with; LoRA-FA is a method of its own (--methods lora-fa), not a choice
    for the others."""
    if optimizer is None:
        return None
    chosen = _choice(optimizer, Optimizer, "--optimizer")
    if chosen is Optimizer.LORA_FA:
        raise PeftpickError("LoRA-FA's optimizer trains LoRA adapters only, and it is a candidate of its own",
                            "drop --optimizer (LoRA-FA is ranked as a method), or pick adamw, adamw-8bit, "
                            "paged-adamw-8bit, adafactor or sgd")
    return chosen


def validate_gpus(gpus: Any, strategy: Any, quant: Any = Quant.NONE) -> dict[str, Any]:
    """`gpus` and `strategy` of a request, checked together (and against --quant)."""
    gpus = _positive_int(gpus, "--gpus", "--gpus 4", MAX_GPUS)
    strategy = _choice(strategy, Strategy, "--strategy")
    quant = _choice(quant, Quant, "--quant")
    if gpus == 1 and strategy not in ONE_GPU_STRATEGIES:
        raise PeftpickError(f"--strategy {strategy.value} spreads training over several GPUs, and --gpus is 1",
                            "pass --gpus N, or --strategy fsdp2-offload / zero3-offload to offload to the CPU on one GPU")
    if gpus > 1 and strategy is Strategy.SINGLE:
        raise PeftpickError(f"--strategy single trains on one GPU, and --gpus is {gpus}",
                            "drop --strategy (auto picks one) or pass --gpus 1")
    if quant is not Quant.NONE and strategy not in (Strategy.AUTO, Strategy.SINGLE, Strategy.DDP):
        raise PeftpickError(f"sharding a {quant.value} quantized base with {strategy.value} is not modelled",
                            "drop --quant for a sharded plan, or use --strategy ddp (each GPU holds the quantized model)")
    from peftpick.estimator.sharding import DEEPSPEED

    if strategy in DEEPSPEED and not deepspeed_installed():
        raise PeftpickError(f"--strategy {strategy.value} trains with DeepSpeed, which is not installed here",
                            "pip install deepspeed (it needs CUDA and a compiler on the training machine), "
                            "or use --strategy fsdp2 (PyTorch's own sharding)")
    return {"gpus": gpus, "strategy": strategy}


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def strategies_for(request: Request) -> tuple[Strategy, ...]:
    """The strategies the planner may choose from for `request`, cheapest first."""
    from peftpick.estimator.sharding import available_strategies

    if request.strategy is not Strategy.AUTO:
        return (request.strategy,)
    return available_strategies(request.gpus, request.quant.value, deepspeed_installed())


def _gpu_of_model(model: Any) -> tuple[float | None, str]:
    """The memory of the CUDA GPU a loaded model sits on (None when it is not a model on a GPU)."""
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None, "given"
    device = next((p.device for p in parameters() if p.device.type == "cuda"), None)
    if device is None:
        return None, "given"
    import torch

    properties = torch.cuda.get_device_properties(device)
    return properties.total_memory / 2**30, f"detected: {properties.name} (the model's GPU, {device})"


def validate_for_model(request: Request, arch) -> Request:
    """The request's checks that depend on the model: the serving stack must suit its kind, an image model's
    resolution must be a multiple of its latent patch, --frames is for video models only, --seq-len is for
    language models. Fills in the denoiser's usual resolution and frames."""
    import dataclasses

    from peftpick.workloads import check_serve, workload_of

    if not request.serve_given:
        request = dataclasses.replace(request, serve=workload_of(arch).default_serve)
    if not request.batch_given:
        request = dataclasses.replace(request, batch_size=workload_of(arch).default_batch_size)
    check_serve(arch, request.serve)
    denoiser = arch.denoiser
    if denoiser is not None and (request.gpus > 1 or request.strategy not in (Strategy.AUTO, Strategy.SINGLE)):
        raise PeftpickError(f"multi-GPU plans are for language models, and {arch.name} is a denoiser",
                            "drop --gpus and --strategy (plan one GPU), or pass a language model")
    if denoiser is None:
        for option, value in (("--resolution", request.resolution), ("--frames", request.frames)):
            if value is not None:
                raise PeftpickError(f"{option} is for image and video models, and {arch.name} is a language model",
                                    "drop it (use --seq-len for the training sequence length)")
        from peftpick.knowledge.architectures import check_seq_len

        check_seq_len(arch, request.seq_len)
        if request.loss is LossKernel.LIGER:
            from peftpick.estimator.liger_models import liger_model_types

            types, source = liger_model_types()
            if arch.model_type not in types:
                raise PeftpickError(f"Liger's kernels do not patch {arch.model_type!r} models ({source})",
                                    "use --loss chunked (TRL's chunked LM head) or --loss stock")
        return request
    if request.loss is not None or request.trainer is not Trainer.PLAIN:
        raise PeftpickError(f"--loss and --trainer are for language models, and {arch.name} is a denoiser",
                            "drop them (the denoiser's loop is the diffusers training script's)")
    from peftpick.knowledge.denoisers import checked_geometry

    resolution, frames = checked_geometry(arch, request.resolution, request.frames)
    return dataclasses.replace(request, resolution=resolution, frames=frames)
