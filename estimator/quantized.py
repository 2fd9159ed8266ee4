"""A bitsandbytes-quantized base model on the meta device, built as QLoRA training builds it.

`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` swaps every `nn.Linear` except the output
head (transformers' `get_keys_to_not_convert`) for bitsandbytes' `Linear4bit` or `Linear8bitLt` and quantizes
the weights as they load; `peft.prepare_model_for_kbit_training` then casts every remaining bf16/fp16
parameter (embeddings, norms, the output head) to float32. Here the same transformers and PEFT functions run on
the meta device, and bitsandbytes' own `Params4bit._quantize("meta")` makes the packed weight and its
quantization state (absmax, codebooks, the nested state of double quantization) with their real shapes, so the
trace holds exactly the tensors a real quantized model holds (tests compare them with a model quantized on the
CPU).

What a meta trace cannot see is modelled from bitsandbytes' CUDA code (`dequantization_temporaries`).
"""

from __future__ import annotations

import contextlib

import torch

# bitsandbytes 0.50 backends/cuda/ops.py: the fused 4-bit GEMM is tried only up to this many rows (tokens);
# above it (every training batch of a few sequences) _dequant_linear_fallback runs.
FUSED_GEMM_MAX_TOKENS = 1536


def available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - an install without a working backend counts as missing
        return False
    return True


def bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


_LABELS = {"8bit": "LLM.int8 (Linear8bitLt)", "4bit": "NF4 with double quantization (Linear4bit)",
           "4bit-no-dq": "NF4 (Linear4bit, float32 absmax)"}


def describe(quant: str, dtype: str) -> str:
    """The assumption line for a traced quantized base."""
    return (f"base linear layers quantized by bitsandbytes {bnb_version()} to {_LABELS[quant]} as "
            f"from_pretrained(quantization_config=...) does (the output head kept), compute dtype {dtype}; "
            "peft.prepare_model_for_kbit_training casts the other weights to float32 (\"fp32 upcasts\"); traced. "
            "Each 4-bit matmul dequantizes its weight in backward (traced) and, above "
            f"{FUSED_GEMM_MAX_TOKENS} tokens per micro-batch, in forward (bitsandbytes' CUDA fallback, modelled "
            "from backends/cuda/ops.py; at or below it the fused kernel is assumed)")


# Storage per base-weight parameter where bitsandbytes is not installed: int8, or NF4 with an fp32 absmax per
# 64 weights (double quantization: an 8-bit absmax, about 4.13 bits in all).
MODELLED_BYTES_PER_PARAM = {"8bit": 1.0, "4bit": 4.127 / 8, "4bit-no-dq": 0.5 + 4 / 64}


def why_not_traced(quant: str) -> str | None:
    """Why a quantized base is modelled instead of traced (None: it is traced, or there is none)."""
    if quant == "none":
        return None
    if not available():
        return "bitsandbytes is not installed: pip install 'peftpick[train]' to trace it"
    if quant == "8bit":
        # bitsandbytes::int8_vectorwise_quant returns the outlier columns, a data-dependent shape
        return ("LLM.int8 splits out the activation columns above its outlier threshold, a count that depends "
                "on values a meta-device trace does not have")
    return None


def modelled(estimate, arch, reason: str):
    """A bf16 estimate adjusted for a quantized base that is not traced (`reason`): the layers' linear weights
    shrink, each matmul dequantizes one weight for the time of the call. Approximate."""
    import dataclasses

    from peftpick.workloads import workload_of

    quant = estimate.shape.quant
    modules = workload_of(arch).hook("layer_modules")(arch)
    params_per_layer = sum(m.in_features * m.out_features for m in modules)
    largest = max((m.in_features * m.out_features for m in modules), default=0)
    element = 2 if estimate.shape.dtype != "float32" else 4
    saved = int(params_per_layer * arch.num_layers * (element - MODELLED_BYTES_PER_PARAM[quant]))
    transient = largest * element
    delta = transient - saved
    breakdown = dict(estimate.breakdown)
    breakdown["weights"] = max(0, breakdown["weights"] - saved)
    breakdown["overhead"] += transient
    return dataclasses.replace(
        estimate,
        peak_allocated_bytes=estimate.peak_allocated_bytes + delta,
        peak_reserved_bytes=estimate.peak_reserved_bytes + delta,
        breakdown=breakdown,
        assumptions=estimate.assumptions + (
            f"{_LABELS[quant]} bitsandbytes base: linear weights at {MODELLED_BYTES_PER_PARAM[quant]:.3g} bytes per "
            f"parameter plus one dequantized weight per matmul; modelled (an adjustment of the bf16 trace): {reason}",
        ),
    )


def quantization_config(quant: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig of QLoRA's recipe: NF4 with (4bit) or without (4bit-no-dq) double quantization, or
    LLM.int8 (8bit)."""
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=quant == "4bit")


def quantize_on_meta(model: torch.nn.Module, quant: str, compute_dtype: torch.dtype,
                     prepare: bool = True) -> torch.nn.Module:
    """Swap and quantize the linear layers of a meta-device model as from_pretrained does, then (`prepare`)
    prepare it for k-bit training as PEFT does (without enabling gradient checkpointing: the tracer does)."""
    from peft import prepare_model_for_kbit_training
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    config = quantization_config(quant, compute_dtype)
    model = replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                                    quantization_config=config)
    with _process_caches_kept():
        _quantize_layers(model, quant, compute_dtype)
    setattr(model, "is_loaded_in_8bit" if quant == "8bit" else "is_loaded_in_4bit", True)
    model.is_quantized = True
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) if prepare else model


@contextlib.contextmanager
def _process_caches_kept():
    """bitsandbytes caches its quantization map in a module-level dict on the device of the first tensor it
    quantizes: left on meta, the user's own quantization later in the process would fail."""
    import bitsandbytes.functional as functional

    before = dict(functional.name2qmap)
    try:
        yield
    finally:
        functional.name2qmap.clear()
        functional.name2qmap.update(before)


def _quantize_layers(model: torch.nn.Module, quant: str, compute_dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = torch.empty(module.out_features, module.in_features, dtype=compute_dtype, device="meta")
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=quant == "4bit",
                                              quant_type="nf4", module=module)._quantize("meta")
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # Int8Params._quantize (nn/modules.py): int8 weight CB, one float32 scale per output row SCB
            data = torch.empty(module.out_features, module.in_features, dtype=torch.int8, device="meta")
            scales = torch.empty(module.out_features, dtype=torch.float32, device="meta")
            module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scales)


def quantization_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized layer holds besides its parameters: absmax, codebooks and the nested state of a
    4-bit weight; the row scales of an 8-bit one."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    tensors = []
    if state is not None:
        tensors += [state.absmax, state.code]
        if state.state2 is not None:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    scales = getattr(weight, "SCB", None)
    if isinstance(scales, torch.Tensor):
        tensors.append(scales)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


_GEMM_4BIT = "bitsandbytes::gemm_4bit"


def dequantization_temporaries(func, args, kwargs) -> list[tuple[int, str]] | None:
    """Bytes of the buffers bitsandbytes' CUDA kernel of `func` allocates and frees within the call, where the
    meta kernel allocates only the output; None for other operators.

    gemm_4bit above FUSED_GEMM_MAX_TOKENS rows runs _dequant_linear_fallback (bitsandbytes 0.50.2
    backends/cuda/ops.py): with double quantization a float32 absmax (`empty_like(absmax_8bit, float32)`) and
    its sum with the offset, then the whole weight dequantized to the input dtype (`B_dq`), then F.linear. At or
    below it the fused kernel is assumed (bitsandbytes may still pick the fallback on some GPU architectures)."""
    if getattr(func, "namespace", None) != "bitsandbytes" or func.name() != _GEMM_4BIT:
        return None
    named = dict(zip((a.name for a in func._schema.arguments), args))
    named.update(kwargs)
    activations, weight_shape, absmax_8bit = named["A"], named["shapeB"], named.get("absmax_8bit")
    if activations.numel() // activations.shape[-1] <= FUSED_GEMM_MAX_TOKENS:
        return None
    n = 1
    for size in weight_shape:
        n *= int(size)
    buffers = []
    if isinstance(absmax_8bit, torch.Tensor):
        buffers += [(absmax_8bit.numel() * 4, "dequantization")] * 2
    buffers.append((n * activations.element_size(), "dequantization"))
    return buffers


_DEQUANTIZE = {"bitsandbytes::dequantize_4bit", "bitsandbytes::dequantize_blockwise"}


def dequantization_output(func) -> str | None:
    """The breakdown part of an operator's outputs: bitsandbytes' dequantized weights and absmax (made for
    every backward matmul of a frozen 4-bit weight) are dequantization buffers."""
    if getattr(func, "namespace", None) == "bitsandbytes" and func.name() in _DEQUANTIZE:
        return "dequantization"
    return None
