"""Which adapter configs the meta-device trace can estimate, and how a failure is said.

`check_estimable` runs before any tracing: a method the trace cannot follow (`UNESTIMABLE`) or adapter settings
that do not fit the model are one PeftpickError with a fix. A trace that fails anyway becomes one line naming the
method (`untraceable`). `stand_in_notes` are the assumptions of the methods whose set-up needs the base weights'
values, which the trace replaces (estimator.training).
"""

from __future__ import annotations

from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import Architecture

# PEFT methods whose training step the meta-device trace cannot follow, with why. Consulted before tracing
# (`check_estimable`); anything else that fails inside the trace becomes one line too (`untraceable`).
# (FRoD, once listed here, is traced with the stand-ins of estimator/frod.py.)
UNESTIMABLE: dict[str, str] = {}
_UNESTIMABLE_FIX = ("measure it with a short real run on a GPU (torch.cuda.max_memory_reserved), or estimate a method "
                    "peftpick traces, e.g. --method lora")

# Adapter config fields that size tensors PEFT builds: a width (at most the model's widest layer), a count of
# prompt tokens (at most the context), or a count of other things. A larger value is a typo or fuzz, and PEFT
# would try to allocate it on the CPU while building the adapter.
_WIDTH_FIELDS = ("r", "init_r", "target_r", "oft_block_size", "boft_block_size", "boft_block_num", "block_size",
                 "vector_length", "subspace_rank", "num_subspaces", "topk", "token_dim", "encoder_hidden_size")
_TOKEN_FIELDS = ("num_virtual_tokens", "adapter_len")
_MAX_TOKENS = 1 << 20
_MIN_WIDTH_LIMIT = 1024
_MAX_VECTORS = 1 << 20


def peft_type_of(peft_config: Any) -> str | None:
    value = getattr(peft_config, "peft_type", None)
    return None if value is None else str(getattr(value, "value", value))


def method_label(peft_config: Any) -> str:
    peft_type = peft_type_of(peft_config)
    if peft_type == "LORA" and isinstance(getattr(peft_config, "init_lora_weights", None), str):
        return f"LoRA with init_lora_weights={peft_config.init_lora_weights!r}"
    return f"the PEFT method {peft_type or type(peft_config).__name__}"


def check_estimable(peft_config: Any, arch: Architecture) -> None:
    """PeftpickError before any tracing for a method the trace cannot run (`UNESTIMABLE`) and for adapter settings
    that do not fit the model (sizes beyond its widest layer or context, AdaptionPrompt layers it lacks)."""
    if peft_config is None:
        return
    peft_type = peft_type_of(peft_config)
    if peft_type in UNESTIMABLE:
        raise PeftpickError(f"{peft_type} cannot be estimated: {UNESTIMABLE[peft_type]}", _UNESTIMABLE_FIX)
    label = method_label(peft_config)
    # tiny test models still take the methods' default widths (VeRA's r=256)
    widest = max(arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim, _MIN_WIDTH_LIMIT)
    tokens = min(_MAX_TOKENS, context_limit) if (context_limit := _context(arch)) else _MAX_TOKENS
    limits = {**{name: (widest, f"{widest:,} (the widest layer of {arch.name})") for name in _WIDTH_FIELDS},
              **{name: (tokens, f"{tokens:,} tokens") for name in _TOKEN_FIELDS},
              "n_frequency": (widest * widest, f"{widest * widest:,} (the entries of a {widest:,}-square weight)"),
              "num_vectors": (_MAX_VECTORS, f"{_MAX_VECTORS:,}")}
    for name, (limit, what) in limits.items():
        values = [(name, getattr(peft_config, name, None))]
        pattern = getattr(peft_config, "rank_pattern", None) if name == "r" else None
        if isinstance(pattern, dict):
            values += [(f"rank_pattern[{key!r}]", value) for key, value in pattern.items()]
        for field, value in values:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if value != value or value < 0 or value > limit:
                why = "not a number" if value != value else "negative" if value < 0 else "beyond " + what
                raise PeftpickError(f"{label}: {field} = {value!r} is {why}", f"set {field} between 1 and {limit:,}")
    if peft_type == "ADAPTION_PROMPT":
        layers = getattr(peft_config, "adapter_layers", None)
        if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= arch.num_layers:
            raise PeftpickError(f"AdaptionPrompt's adapter_layers is {layers!r}, but {arch.name} has "
                                f"{arch.num_layers} layers (it counts from the top)",
                                f"set adapter_layers between 1 and {arch.num_layers}")
        length = getattr(peft_config, "adapter_len", None)
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise PeftpickError(f"AdaptionPrompt's adapter_len is {length!r}",
                                "set adapter_len, e.g. 10 (prompt tokens)")


def stand_in_notes(peft_config: Any) -> tuple[str, ...]:
    """What the trace does in place of a method's set-up steps that need the base weights' values
    (`estimator.training`), as assumptions of the estimate."""
    peft_type = peft_type_of(peft_config)
    if peft_type == "ADAMSS":
        return ("AdaMSS: the k-means clusters of each weight's singular vectors (which need the weights' values) are "
                "taken as equal runs of rows; trainable parameters are exact where every subspace has at least "
                "subspace_rank rows, the split of the per-subspace activations is not",)
    if peft_type == "WAVEFT":
        return ("WaveFT: every spectrum index falls inside the padded weight, as randperm over the weight makes them",)
    if peft_type == "LORA" and getattr(peft_config, "kasa_config", None) is not None:
        return ("KaSA: the one-time SVD truncation of each base weight before training is not traced (it keeps the "
                "weight's shape; its transient copies at set-up are not in the peak)",)
    if peft_type == "FROD":
        from peftpick.estimator.frod import notes

        return notes(peft_config, moved_after_wrapping=False)
    if peft_type == "LORA" and getattr(peft_config, "init_lora_weights", None) == "mica":
        return ("MiCA: lora_B (the base weight's minor singular vectors, frozen) is built with its shape only",)
    return ()


def _context(arch: Architecture) -> int | None:
    from peftpick.knowledge.architectures import context_length

    return context_length(arch)


def untraceable(peft_config: Any, error: BaseException) -> PeftpickError:
    """The one line for a trace that failed: the method, and the error's first line."""
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
    return PeftpickError(f"{method_label(peft_config)} cannot be estimated: building or training it on the meta "
                         f"device failed ({reason})", _UNESTIMABLE_FIX)
