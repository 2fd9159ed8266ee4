"""The training stack of a probe: the optimizer, the storage of the frozen base, the loss kernel and the training
loop, each built as the memory estimate (peftpick.estimator) models it, so that what a probe measures is the plan's
own stack and never a bf16 / AdamW / stock-loss stand-in for it.

The four `TrainingShape` fields and what a probe runs for them:

- optimizer (estimator/optimizers.py): "adamw" torch.optim.AdamW(foreach=True); "sgd" torch.optim.SGD(momentum
  0.9, foreach=True); "adafactor" transformers Adafactor(scale_parameter=False, relative_step=False,
  warmup_init=False, fixed lr); "adamw-8bit" / "paged-adamw-8bit" bitsandbytes AdamW8bit / PagedAdamW8bit (on the
  CPU bitsandbytes keeps a paged optimizer's state unpaged, and says so); "lora-fa" PEFT's create_lorafa_optimizer.
  The same optimizer object is handed to transformers' Trainer / TRL's SFTTrainer (`optimizers=`), so its class
  is the estimate's whatever the loop.
- quant (estimator/quantized.py): the base's linear layers, the output head kept, swapped for bitsandbytes
  Linear4bit (NF4, with or without double quantization) or Linear8bitLt as from_pretrained(quantization_config=
  BitsAndBytesConfig(...)) does (pretrained weights: that very call), then peft.prepare_model_for_kbit_training
  (not for TRL's SFTTrainer, which does not call it and casts the adapter to bf16 instead).
- loss (estimator/losses.py): "liger" Liger's fused linear cross-entropy, applied to the model instance with every
  other Liger kernel off (the estimate models the loss kernel only); it needs CUDA (Triton), so a CPU probe
  computes the stock loss and its record says so. "chunked" TRL's fused LM head (trl.trainer.utils.add_fused_lm_head,
  the chunked log-prob kernel; Triton on CUDA, TRL's torch tiles elsewhere).
- trainer: "plain" the worker's own loop (estimator/training.py); "hf" transformers' Trainer and "trl" TRL's
  SFTTrainer run the steps (max_steps, the probe's micro-batch and accumulation, constant learning rate, no
  logging or saving, no autocast: the base is already in the setting's dtype). Under torchrun (multi-GPU probes)
  the trainers are not run: the worker's loop reproduces what the estimate models for them (the model output
  freed before backward; TRL's chunked loss) and the record says "modelled".

Refusals (`refusal`) happen in the parent before a worker starts; fallbacks (`runnable`) change the setting a
probe runs and add a note; the worker reports what it ran (`Stack.record`), which the result's `shape` and notes
carry. `differences` says where a probe's stack and an estimate's differ, so that they are never compared silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peftpick.types import LossKernel, Optimizer, Quant, Trainer, TrainingShape

STACK_FIELDS = ("optimizer", "quant", "loss", "trainer")
OPTIMIZERS = tuple(member.value for member in Optimizer)
QUANTS = tuple(member.value for member in Quant)
LOSSES = tuple(member.value for member in LossKernel)
TRAINERS = tuple(member.value for member in Trainer)
EIGHT_BIT = ("adamw-8bit", "paged-adamw-8bit")
SGD_MOMENTUM = 0.9  # as estimator/optimizers.py
# what each option means, for the record and the notes
QUANT_WORDS = {"none": "unquantized base", "4bit": "bitsandbytes NF4 4-bit base with double quantization (Linear4bit)",
               "4bit-no-dq": "bitsandbytes NF4 4-bit base, float32 absmax (Linear4bit)",
               "8bit": "bitsandbytes LLM.int8 base (Linear8bitLt)"}
LOSS_WORDS = {"stock": "the model's own loss (full logits)",
              "liger": "Liger's fused linear cross-entropy (liger_kernel, no full logits)",
              "chunked": "TRL's chunked LM head (trl add_fused_lm_head, no full logits)"}
LIGER_NEEDS_CUDA = ("Liger's fused linear cross-entropy needs CUDA (its kernels are Triton): this CPU probe computed "
                    "the stock loss instead (the same loss values; speed is the stock loss's)")


def default_for(name: str) -> str:
    return {"optimizer": "adamw", "quant": "none", "loss": "stock", "trainer": "plain"}[name]


def check_names(optimizer: str | None = None, quant: str = "none", loss: str = "stock", trainer: str = "plain") -> None:
    """Raise PeftpickError for a value that is not one of the TrainingShape options."""
    from peftpick.errors import PeftpickError

    for value, names, option in ((optimizer, OPTIMIZERS, "--optimizer"), (quant, QUANTS, "--quant"),
                                 (loss, LOSSES, "--loss"), (trainer, TRAINERS, "--trainer")):
        if value is not None and value not in names:
            raise PeftpickError(f"unknown {option.removeprefix('--')} {value!r}",
                                f"pass {option} as one of: {', '.join(names)}")


def settled(shape: TrainingShape, candidate_optimizer: str) -> TrainingShape:
    """`shape` with its stack checked and completed as the estimator completes it: the candidate's own LoRA-FA
    optimizer where the setting names plain AdamW (a setting made without the candidate in mind), and TRL's
    chunked loss with --trainer trl (SFTTrainer always adds its fused LM head; it refuses Liger's)."""
    from peftpick.errors import PeftpickError

    check_names(shape.optimizer, shape.quant, shape.loss, shape.trainer)
    optimizer = shape.optimizer
    if candidate_optimizer == "lora-fa" and optimizer == "adamw":
        optimizer = "lora-fa"
    loss = shape.loss
    if shape.trainer == "trl":
        if loss == "liger":
            raise PeftpickError("TRL's SFTTrainer computes the loss with its own fused LM head and refuses Liger's "
                                "fused cross-entropy (trl 1.16.0 sft_trainer.py)",
                                "drop --loss liger with --trainer trl (its chunked head is used), or use --trainer hf")
        loss = "chunked"
    return dataclasses.replace(shape, optimizer=optimizer, loss=loss)


def stack_of(shape: TrainingShape) -> dict[str, str]:
    return {name: str(getattr(shape, name)) for name in STACK_FIELDS}


def differences(probed: TrainingShape, estimated: TrainingShape) -> list[str]:
    """Where the stack a probe ran differs from the one an estimate assumed, e.g. ["loss: stock, not liger"]."""
    return [f"{name}: {getattr(probed, name)}, not {getattr(estimated, name)}" for name in STACK_FIELDS
            if str(getattr(probed, name)) != str(getattr(estimated, name))]


def libraries(shape: TrainingShape) -> tuple[str, ...]:
    """The libraries beside torch / transformers / peft whose versions change what a probe of `shape` runs."""
    names = []
    if shape.quant != "none" or shape.optimizer in EIGHT_BIT:
        names.append("bitsandbytes")
    if shape.loss == "liger":
        names.append("liger-kernel")
    if shape.loss == "chunked" or shape.trainer == "trl":
        names.append("trl")
    if shape.trainer in ("hf", "trl"):
        names.append("accelerate")
    return tuple(names)


# ------------------------------------------------------------------------------------------- parent side


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def causal_lm_refusal(arch: Any, candidate: Any, shape: TrainingShape, device: str, world_size: int = 1) -> str | None:
    """Why a causal LM's probe cannot run `shape`'s stack here (None: it can), before a worker starts."""
    if shape.quant != "none":
        if candidate.peft_config_class is None:
            return (f"full fine-tuning cannot train a {shape.quant} quantized base (its weights are frozen integers); "
                    "the estimator refuses it too")
        if not _installed("bitsandbytes"):
            return f"a {shape.quant} base needs bitsandbytes: pip install bitsandbytes"
        if world_size > 1:
            return ("multi-GPU probes shard the model with FSDP2, and a bitsandbytes-quantized base is planned with "
                    "data parallelism only (its shards are not modelled): probe it on one GPU")
    if shape.trainer in ("hf", "trl") and world_size == 1 and device.startswith("cuda:") and device != "cuda:0":
        trainer = "transformers' Trainer" if shape.trainer == "hf" else "TRL's SFTTrainer"
        return (f"{trainer} trains on the first visible GPU, not {device}: probe with --device cuda and "
                f"CUDA_VISIBLE_DEVICES={device.split(':')[1]}")
    if shape.optimizer in EIGHT_BIT and not _installed("bitsandbytes"):
        return f"the {shape.optimizer} optimizer is bitsandbytes': pip install bitsandbytes"
    if shape.optimizer == "lora-fa" and candidate.peft_type != "LORA":
        return f"{candidate.display_name} is not a LoRA adapter, and the LoRA-FA optimizer needs one"
    if shape.loss == "chunked" or shape.trainer == "trl":
        if not _installed("trl"):
            return f"{'TRL' if shape.trainer == 'trl' else 'the chunked loss'} needs TRL: pip install trl"
    if shape.trainer == "trl" and candidate.peft_config_class is not None and _targets_output_head(candidate):
        return "TRL's SFTTrainer refuses an adapter on lm_head (its fused LM head reads lm_head.weight directly)"
    if shape.loss == "liger":
        from peftpick.estimator.liger_models import liger_model_types

        types, source = liger_model_types()
        if arch.model_type not in types:
            return f"Liger's kernels do not patch {arch.model_type!r} models ({source})"
        if device.startswith("cuda") and not _installed("liger_kernel"):
            return "Liger's fused linear cross-entropy needs liger-kernel: pip install liger-kernel"
    return None


def _targets_output_head(candidate: Any) -> bool:
    targets = candidate.peft_kwargs.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or ())
    return any(name == "lm_head" or str(name).endswith(".lm_head") for name in names) or \
        "lm_head" in (candidate.peft_kwargs.get("modules_to_save") or ())


def causal_lm_runnable(shape: TrainingShape, device: str) -> tuple[TrainingShape, tuple[str, ...]]:
    """The stack a causal LM's probe runs for `shape` on `device`, and a note for each change: on the CPU Liger's
    loss (Triton, CUDA only) becomes the stock loss."""
    if shape.loss == "liger" and not device.startswith("cuda"):
        return dataclasses.replace(shape, loss="stock"), (LIGER_NEEDS_CUDA,)
    return shape, ()


def plain_only_refusal(shape: TrainingShape, what: str) -> str | None:
    """For workloads whose probe runs only its own loop on an unquantized base (diffusion denoisers)."""
    wrong = [f"--{name} {getattr(shape, name)}" for name in ("quant", "loss", "trainer")
             if getattr(shape, name) != default_for(name)]
    if not wrong:
        return None
    return (f"{what} probes run their own loop with the stock loss on an unquantized base; "
            f"{', '.join(wrong)} is not probed (the estimate's figure stands)")


# ------------------------------------------------------------------------------------------- worker side


@dataclass
class Stack:
    """What a probe ran, for its record: each field's value (as TrainingShape spells it) and how it was run."""

    optimizer: str = "adamw"
    quant: str = "none"
    loss: str = "stock"
    trainer: str = "plain"
    optimizer_class: str = ""
    trainer_run: str = "plain"  # "plain", "transformers.Trainer", "trl.SFTTrainer" or "modelled"
    details: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "quant": self.quant, "loss": self.loss, "trainer": self.trainer,
                "optimizer_class": self.optimizer_class, "trainer_run": self.trainer_run,
                "details": dict(self.details), "notes": list(self.notes)}


def qualified_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def make_optimizer(name: str, model: Any, trainable: list[Any], lr: float, weight_decay: float, device: Any):
    """The optimizer `name` over `trainable`, built as estimator/optimizers.py builds it; (optimizer, notes)."""
    import torch

    notes: list[str] = []
    if name == "lora-fa":
        from peft.optimizers import create_lorafa_optimizer

        config = model.peft_config["default"]
        optimizer = create_lorafa_optimizer(model, r=config.r, lora_alpha=config.lora_alpha, lr=lr,
                                            weight_decay=weight_decay, use_rslora=config.use_rslora)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, foreach=True)
    elif name == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay, foreach=True)
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(trainable, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                              weight_decay=weight_decay)
    elif name in EIGHT_BIT:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged-adamw-8bit" else bnb.optim.AdamW8bit
        optimizer = cls(trainable, lr=lr, weight_decay=weight_decay)
        if name == "paged-adamw-8bit" and torch.device(device).type != "cuda":
            notes.append("bitsandbytes keeps a paged optimizer's state unpaged on the CPU (paging is CUDA unified "
                         "memory)")
    else:
        raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(OPTIMIZERS)}")
    return optimizer, notes


def optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of the optimizer's state by dtype ("uint8", "float32", ...), each storage once."""
    import torch

    seen: set[int] = set()
    found: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.device.type == "meta":
                continue
            local = value.to_local() if hasattr(value, "to_local") else value
            pointer = local.untyped_storage().data_ptr()
            if pointer in seen:
                continue
            seen.add(pointer)
            key = str(local.dtype).removeprefix("torch.")
            found[key] = found.get(key, 0) + local.untyped_storage().nbytes()
    return found


def paged_state_bytes(optimizer: Any) -> int:
    """Bytes of a bitsandbytes paged optimizer's state in CUDA unified memory (outside torch's allocator)."""
    total = 0
    for state in optimizer.state.values():
        for key in ("state1", "state2"):
            value = state.get(key)
            if getattr(value, "is_paged", False):
                total += value.untyped_storage().nbytes()
    return total


def quantization_config(quant: str, compute_dtype: Any):
    """QLoRA's BitsAndBytesConfig, as estimator/quantized.py writes it."""
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=quant == "4bit")


def load_quantized(weights: str, quant: str, device: Any, dtype: Any, local_files_only: bool):
    """Pretrained weights loaded quantized, the user's call: from_pretrained(quantization_config=...)."""
    from transformers import AutoModelForCausalLM

    device_map: Any = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, local_files_only=local_files_only,
                                                quantization_config=quantization_config(quant, dtype),
                                                device_map=device_map)


def quantize_built(model: Any, quant: str, device: Any, dtype: Any):
    """A model built from its config (random weights, on the CPU) quantized onto `device` as from_pretrained does
    it: transformers' replace_with_bnb_linear swaps every nn.Linear except the output head
    (get_keys_to_not_convert), each swapped layer's weight is quantized by bitsandbytes on its way to the device
    (Params4bit / Int8Params, one layer in full precision at a time), and the model carries the markers
    from_pretrained sets (is_loaded_in_4bit / 8bit, hf_quantizer), which PEFT and the trainers read."""
    import bitsandbytes as bnb
    import torch
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.base import get_keys_to_not_convert

    config = quantization_config(quant, dtype)
    dense = {name: module for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    model = replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                                    quantization_config=config)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        source = dense.pop(name)
        weight = source.weight.data
        source.weight = None
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False,
                                              compress_statistics=quant == "4bit", quant_type="nf4",
                                              module=module)._quantize(device)
        else:
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)
        del weight
        if source.bias is not None:
            module.bias = torch.nn.Parameter(source.bias.data.to(device=device, dtype=dtype), requires_grad=False)
    dense.clear()
    torch.nn.Module.to(model, device)  # the rest (embeddings, norms, head, buffers); quantized weights stay as they are
    setattr(model, "is_loaded_in_8bit" if quant == "8bit" else "is_loaded_in_4bit", True)
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.hf_quantizer = AutoHfQuantizer.from_config(config)
    model.config.quantization_config = config
    return model


def quantized_summary(model: Any) -> str:
    """What the quantized base holds, e.g. "12 Linear4bit layers, Params4bit nf4, double quantization"."""
    import bitsandbytes as bnb

    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    eight = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    if four:
        state = getattr(four[0].weight, "quant_state", None)
        nested = state is not None and getattr(state, "nested", False)
        return (f"{len(four)} Linear4bit layers, {type(four[0].weight).__name__} "
                f"{getattr(state, 'quant_type', '?')}, {'double quantization' if nested else 'float32 absmax'}")
    if eight:
        return f"{len(eight)} Linear8bitLt layers, {type(eight[0].weight).__name__} int8 with row scales"
    return "no bitsandbytes layer"


def apply_liger(model: Any) -> str:
    """Liger's fused linear cross-entropy on this model instance (every other Liger kernel off); what was applied."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(f"Liger's kernels do not patch {model_type!r} models")
    flags = {name: False for name, parameter in inspect.signature(apply).parameters.items()
             if isinstance(parameter.default, bool)}
    flags["fused_linear_cross_entropy"] = True
    apply(model=model, **flags)
    return f"liger_kernel {apply.__name__}(model=..., fused_linear_cross_entropy=True, other kernels off)"


def add_chunked_head(model: Any) -> str:
    """TRL's fused (chunked) LM head on the bare model, as SFTTrainer adds it; `model(..., fused_lm_head=True)`."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs",))
    return "trl.trainer.utils.add_fused_lm_head (chunked log-prob kernel)"


def cast_adapter_like_trl(model: Any) -> None:
    """What TRL's SFTTrainer does to a quantized model's adapter (trl 1.16.0 sft_trainer.py): every trainable
    parameter but DoRA's magnitude vector to bf16."""
    import torch

    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "magnitude" not in name:
            parameter.data = parameter.data.to(torch.bfloat16)
