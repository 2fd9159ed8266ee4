"""Peak GPU memory of a fine-tuning run, estimated without a GPU.

The real transformers + PEFT training program runs on the meta device (shapes, no values) while a dispatch mode
records every allocation and free (`tracer`); what the meta device cannot show, the fused CUDA attention kernel
and cuBLAS workspaces, is added by stand-ins (`kernels`, `training`); the optimizer steps as its library steps it
(`optimizers`: torch AdamW / SGD, transformers Adafactor, bitsandbytes 8-bit AdamW, PEFT's LoRA-FA); the event
trace is replayed through a model of PyTorch's CUDA caching allocator (`allocator`) to get peak allocated and
peak reserved bytes.

Decoder layers repeat, so by default a few layers are traced and their allocations repeated to the model's
depth (`synthesis`); `exact=True` traces every layer, and tests check both replay to the same peaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.estimator.estimable import check_estimable, peft_type_of, stand_in_notes, untraceable
from peftpick.types import Architecture, LossKernel, MemoryEstimate, Optimizer, Quant, Trainer, TrainingShape

OPTIMIZERS = tuple(member.value for member in Optimizer)  # see estimator/optimizers.py for how each is traced

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class _Point:
    peak_allocated: int
    peak_reserved: int
    breakdown: dict[str, int]
    trainable: int
    total: int
    saved_bytes: int
    peak_phase: str
    lengthened: bool
    optimizer_state: int = 0  # bytes of the optimizer's state after its first step
    paged_state: int = 0  # of which in CUDA unified memory (bitsandbytes' paged optimizers)
    layout: dict | None = None  # estimator.sharding.ParameterLayout's JSON form


def estimate(
    model: Any,
    adapter: Any = "lora",
    *,
    batch_size: int = 4,
    seq_len: int = 768,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    dtype: str | None = None,
    rank: int | None = None,
    targets: list[str] | None = None,
    exact: bool = False,
    quant: str = "none",
    loss: str = "stock",
    trainer: str = "plain",
) -> MemoryEstimate:
    """Estimate peak allocated and reserved GPU memory of training `model` with `adapter`.

    model: registry name, local folder or config.json path, hub id, or a transformers PretrainedConfig.
    adapter: a peft.PeftConfig, a path to adapter_config.json (or its folder), "full", or a method name
        ("lora", "dora", "oft", ...; `rank` and `targets` override the method's defaults for this model).
    quant: the frozen base quantized by bitsandbytes: "4bit" (NF4, double quantization), "4bit-no-dq", "8bit".
    loss: "stock" (the model's own), "liger" (Liger's fused linear cross-entropy) or "chunked" (TRL's chunked
        log-prob LM head). trainer: "plain" (a loop that keeps the output), "hf" (transformers' Trainer) or
        "trl" (TRL's SFTTrainer, whose fused LM head is the chunked loss).
    """
    from peftpick.knowledge.architectures import resolve_model

    arch = resolve_model(model)
    if arch.denoiser is None:
        from peftpick.knowledge.architectures import check_seq_len

        check_seq_len(arch, seq_len if isinstance(seq_len, int) else 0)
    shape = _validated_shape(batch_size, seq_len, gradient_checkpointing, optimizer, dtype or arch.dtype, quant,
                             loss, trainer)
    peft_config = resolve_adapter(adapter, arch, rank=rank, targets=targets)
    if shape.optimizer == "lora-fa" and (peft_config is None or getattr(peft_config, "peft_type", None) != "LORA"):
        raise PeftpickError(
            "the LoRA-FA optimizer needs a LoRA adapter",
            "pass a LoRA adapter (--method lora) or use another --optimizer (adamw, adamw-8bit, sgd, ...)",
        )
    from peftpick.workloads import workload_of

    # a denoiser's step is traced by its workload's estimator (estimator.diffusion), at the model's usual resolution
    return workload_of(arch).hook("estimate")(arch, peft_config, shape, exact=exact)


def estimate_architecture(arch: Architecture, peft_config: Any, shape: TrainingShape, exact: bool = False) -> MemoryEstimate:
    """Estimate for an already resolved architecture and PEFT config (None = full fine-tuning). A quantized
    base (`shape.quant`) is traced as bitsandbytes builds it where bitsandbytes is installed, else modelled."""
    from peftpick.estimator import quantized

    if shape.quant != "none" and peft_config is None:
        raise PeftpickError(f"full fine-tuning cannot train a {shape.quant} quantized base (its weights are frozen "
                            "integers)", "drop --quant, or pick an adapter method (--method lora)")
    if shape.loss == "liger":
        from peftpick.estimator.liger_models import liger_model_types

        types, source = liger_model_types()
        if arch.model_type not in types:
            raise PeftpickError(f"Liger's kernels do not patch {arch.model_type!r} models ({source})",
                                "use --loss chunked (TRL's chunked LM head) or --loss stock")
    check_estimable(peft_config, arch)
    untraced = quantized.why_not_traced(shape.quant)
    if untraced is not None:
        bf16 = estimate_architecture(arch, peft_config, dataclasses.replace(shape, quant="none"), exact)
        return quantized.modelled(dataclasses.replace(bf16, shape=shape), arch, untraced)
    point = _trace_point(arch, peft_config, shape, exact)
    return MemoryEstimate(
        peak_allocated_bytes=point.peak_allocated,
        peak_reserved_bytes=point.peak_reserved,
        breakdown=point.breakdown,
        trainable_params=point.trainable,
        total_params=point.total,
        adapter_file_bytes=point.saved_bytes,
        shape=shape,
        assumptions=_assumptions(arch, shape, point.lengthened, point) + stand_in_notes(peft_config),
        layout=point.layout or {},
    )


# ------------------------------------------------------------------------------------------ inputs


def _validated_shape(batch_size, seq_len, gradient_checkpointing, optimizer, dtype, quant="none", loss="stock",
                     trainer="plain") -> TrainingShape:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PeftpickError(f"batch size must be a positive whole number, got {batch_size!r}", "pass e.g. --batch-size 4")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise PeftpickError(f"sequence length must be a whole number of at least 2, got {seq_len!r}", "pass e.g. --seq-len 768")
    if optimizer not in OPTIMIZERS:
        raise PeftpickError(f"unknown optimizer {optimizer!r}", f"pass --optimizer as one of: {', '.join(OPTIMIZERS)}")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise PeftpickError(f"unsupported dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
    for value, kind, option, what in ((quant, Quant, "--quant", "quantization"), (loss, LossKernel, "--loss", "loss"),
                                      (trainer, Trainer, "--trainer", "trainer")):
        names = [member.value for member in kind]
        if value not in names:
            raise PeftpickError(f"unknown {what} {value!r}", f"pass {option} as one of: {', '.join(names)}")
    if trainer == "trl":
        if loss == "liger":
            raise PeftpickError("TRL's SFTTrainer computes the loss with its own fused LM head and refuses Liger's "
                                "fused cross-entropy (trl 1.16.0 sft_trainer.py)",
                                "drop --loss liger with --trainer trl (its chunked head is used), or use --trainer hf")
        loss = "chunked"  # SFTTrainer always adds its fused (chunked) LM head
    return TrainingShape(
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=bool(gradient_checkpointing),
        optimizer=optimizer,
        dtype=dtype,
        quant=quant,
        loss=loss,
        trainer=trainer,
    )


def resolve_adapter(adapter: Any, arch: Architecture, rank: int | None = None, targets: list[str] | None = None):
    """A peft.PeftConfig for `adapter` (see `estimate`), or None for full fine-tuning."""
    import peft

    if isinstance(adapter, peft.PeftConfig):
        return adapter
    if adapter is None or (isinstance(adapter, str) and adapter.lower() == "full"):
        return None
    if isinstance(adapter, Path) or (isinstance(adapter, str) and (adapter.endswith(".json") or Path(adapter).is_dir())):
        return load_adapter_config(Path(adapter))
    if isinstance(adapter, str):
        from peftpick.methods import build_candidate

        candidate = build_candidate(adapter, arch, rank=rank, targets=targets)
        return candidate.peft_config()
    raise PeftpickError(
        f"cannot use {adapter!r} as an adapter",
        "pass a method name (lora, dora, ...), 'full', a path to adapter_config.json, or a peft.PeftConfig",
    )


def load_adapter_config(path: Path):
    """Read adapter_config.json (or the folder holding it) into a peft.PeftConfig, every field checked against
    the PEFT config class first (`peftpick.adapters.files.read_adapter_config`)."""
    from peftpick.adapters.files import read_adapter_config

    _raw, config = read_adapter_config(path)
    return config


# ------------------------------------------------------------------------------------------ tracing


def layer_period(arch: Architecture) -> int:
    """Smallest p with the per-layer attention pattern repeating every p layers (1 for uniform models)."""
    layer_types = arch.config.get("layer_types")
    if not isinstance(layer_types, list) or not layer_types:
        return 1
    n = len(layer_types)
    for p in range(1, n + 1):
        if all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return n


def _irregular_layers(arch: Architecture) -> bool:
    """Models whose layers differ other than by attention pattern cannot be extrapolated from a few layers:
    dense-then-MoE, and what `layer_differences` names (per-layer FFN widths, key/value-shared tail layers)."""
    from peftpick.knowledge.architectures import layer_differences

    config = arch.config
    return bool(config.get("first_k_dense_replace") or config.get("mlp_only_layers")
                or config.get("decoder_sparse_step", 1) not in (None, 1) or layer_differences(arch))


# Units of layers traced before lengthening. The template (unit 2) must sit between two ordinary units: the
# first unit (no gradient to its input) and the last (fed by the final norm) allocate differently.
TRACED_UNITS = 4
TEMPLATE_UNIT = 1
# Peaks are taken over three optimizer steps (state appears at the first; the second shows what the first
# leaves behind); two are traced and the third repeats the second.
TRACED_STEPS = 2


def _trace_point(arch: Architecture, peft_config: Any, shape: TrainingShape, exact: bool) -> _Point:
    import copy

    import torch

    from peftpick.estimator.replay import replay
    from peftpick.estimator.synthesis import lengthen, repeat_last_step
    from peftpick.estimator.training import TrainingProgram
    from peftpick.knowledge.architectures import build_config

    period = layer_period(arch)
    units = arch.num_layers // period
    lengthened = not (exact or units <= TRACED_UNITS or arch.num_layers % period or _irregular_layers(arch))
    # get_peft_model fills in fields of the config it is given; keep the caller's copy untouched
    peft_config = copy.deepcopy(peft_config)
    if lengthened and peft_type_of(peft_config) == "ADAPTION_PROMPT":
        # adapter_layers counts from the top: all of them repeat like any layer; fewer leave the lower layers
        # plain, which a few repeated layers cannot show, so every layer is traced
        if peft_config.adapter_layers == arch.num_layers:
            peft_config.adapter_layers = TRACED_UNITS * period
        else:
            lengthened = False
    depth = TRACED_UNITS * period if lengthened else arch.num_layers
    program = TrainingProgram(
        config=build_config(arch, num_hidden_layers=depth),
        peft_config=peft_config,
        batch_size=shape.batch_size,
        seq_len=shape.seq_len,
        gradient_checkpointing=shape.gradient_checkpointing,
        optimizer=shape.optimizer,
        dtype=getattr(torch, shape.dtype),
        steps=TRACED_STEPS,
        quant=shape.quant,
        loss=shape.loss,
        trainer=shape.trainer,
    )
    trace, counts = _traced(arch, program, period)
    third = repeat_last_step(trace, TRACED_STEPS)
    if third is None:  # the two steps differ (rare): trace the third for real
        trace, counts = _traced(arch, dataclasses.replace(program, steps=TRACED_STEPS + 1), period)
    else:
        trace = third
    extra = units - TRACED_UNITS if lengthened else 0
    if extra:
        trace = lengthen(trace, TRACED_UNITS, units, TEMPLATE_UNIT)
    result = replay(trace)

    def total(kind: str) -> int:
        per_unit = counts[kind]
        return sum(per_unit.values()) + extra * per_unit.get(TEMPLATE_UNIT, 0)

    from peftpick.estimator.sharding import ParameterLayout

    template = range(TEMPLATE_UNIT * period, (TEMPLATE_UNIT + 1) * period)
    layout = ParameterLayout.from_traced(counts["layout"], repeated=template, extra_copies=extra)
    return _Point(result.peak_allocated, result.peak_reserved, result.breakdown, total("trainable"),
                  total("total"), total("saved_bytes"), result.peak_phase, lengthened,
                  total("optimizer_state"), total("paged_state"),
                  {**layout.to_json(), "optimizer_state": total("optimizer_state"),
                   "layer_class": counts["layout"].get("layer_class", "")})


def _traced(arch: Architecture, program: Any, period: int):
    """`trace_training`, with what goes wrong inside the traced program as one PeftpickError."""
    from peftpick.estimator.training import trace_training

    try:
        with _quiet():
            return trace_training(program, period)
    except (PeftpickError, KeyboardInterrupt):
        raise
    except ValueError as error:
        message = " ".join(str(error).split())
        if "not found in the base model" in message or "Target module" in message:
            from peftpick.knowledge.targets import linear_module_names

            names = sorted({n for names in linear_module_names(arch).values() for n in names})
            raise PeftpickError(
                f"the adapter's target modules are not in {arch.name}: {message}",
                f"target modules that exist in this architecture: {', '.join(names)}",
            ) from None
        raise untraceable(program.peft_config, error) from None
    except Exception as error:  # noqa: BLE001 - whatever PEFT or torch raise on meta, the user gets one line
        raise untraceable(program.peft_config, error) from None


@contextlib.contextmanager
def _quiet():
    """Silence what transformers and PEFT say while the meta model trains (deprecation notices, "use_cache is
    incompatible with gradient checkpointing", BOFT's CUDA-extension build attempt): it is about the traced
    program, not the user's run. Restores the previous warning filters and transformers verbosity."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


_LOOPS = {
    "plain": "a plain loop that keeps the model output (logits) until the next step: out = model(...); "
             "out.loss.backward()",
    "hf": "transformers' Trainer: the output is local to compute_loss, so the logits are freed before backward "
          "(trainer.py training_step); its fused AdamW's temporaries are not modelled",
    "trl": "TRL's SFTTrainer (1.16.0): the loss comes from its fused LM head, the output is freed before backward; "
           "with a quantized base the adapter is cast to bf16 and prepare_model_for_kbit_training is not called",
}
_LOSSES = {
    "stock": "the model's own loss: full logits, upcast to float32 for the cross-entropy",
    "liger": "Liger's fused linear cross-entropy: no full logits, one chunk at a time (a stand-in with the "
             "allocations of liger-kernel 0.8.5 ops/fused_linear_cross_entropy.py; Triton does not run on meta)",
    "chunked": "TRL's chunked log-prob LM head: 4096-token x 32768-vocabulary tiles (a stand-in with the "
               "allocations of trl 1.16.0 kernels/chunked_logprob.py)",
}


def _assumptions(arch: Architecture, shape: TrainingShape, lengthened: bool, point: _Point | None = None) -> tuple[str, ...]:
    from peftpick.estimator import optimizers

    bnb_version = optimizers.bitsandbytes_version() if shape.optimizer in optimizers.EIGHT_BIT else None
    optimizer_note = optimizers.describe(shape.optimizer, point.optimizer_state if point else 0,
                                         point.paged_state if point else 0, bnb_version)
    attention = arch.config.get("_attn_implementation") or "transformers' default attention for the architecture"
    notes = [
        "one CUDA GPU with PyTorch's caching allocator (default settings); figures are bytes as torch.cuda reports them",
        f"{shape.dtype} base weights; adapter weights as PEFT creates them (float32 by default)",
        f"every sequence filled to {shape.seq_len} tokens with labels on every token, batch {shape.batch_size}",
        f"{attention}; SDPA runs as a fused (flash / cuDNN) kernel",
        optimizer_note,
        "gradient checkpointing " + ("on (use_reentrant=False)" if shape.gradient_checkpointing else "off"),
        _LOOPS[shape.trainer],
        _LOSSES[shape.loss],
        "peak over 3 optimizer steps (optimizer state appears at the first)",
        ("a few layers traced, their allocations repeated to the full depth" if lengthened else "every layer traced"),
    ]
    if shape.quant != "none":
        from peftpick.estimator import quantized

        notes[1] = quantized.describe(shape.quant, shape.dtype)
    return tuple(notes)
