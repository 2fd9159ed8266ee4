"""FRoD on the meta device (estimator/frod.py): the stand-ins for its value-dependent set-up hold the tensors a
real FRoD model holds, at the same shapes and dtypes, and the trace counts on the GPU what the run keeps there.

Every real model here is built on the CPU with real (random) weights and wrapped by PEFT as is: its joint
decomposition and float64 solves run for real on these tiny shapes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import FrodConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from peftpick.estimator import estimate

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
WORKSPACES = 2 * 32 * 2**20  # training.CUBLAS_HANDLES x CUBLAS_WORKSPACE_BYTES, allocated first in the build phase


def llama(**changes) -> LlamaConfig:
    return LlamaConfig(**{**LLAMA, **changes})


def gpt2() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=64)


def frod(**kwargs) -> FrodConfig:
    return FrodConfig(task_type="CAUSAL_LM", progressbar=False, **kwargs)


def real(config, peft_config, dtype=torch.bfloat16):
    """PEFT's FRoD on a real model: CPU, random weights, the decomposition run for real."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, copy.deepcopy(peft_config))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def frod_tensors(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every FRoD tensor of a wrapped model (parameters, persistent and non-persistent buffers) by name."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name: (tuple(t.shape), t.dtype) for name, t in named if "frod_" in name}


CASES = {
    "q,v default": (llama(), frod()),
    "q,v offload, sparse 0.02": (llama(), frod(runtime_offload_base_weight=True, sparse_rate=0.02)),
    "all-linear, sparse 0.05": (llama(), frod(target_modules="all-linear", sparse_rate=0.05)),
    "no sparse part": (llama(), frod(sparse_rate=0.0)),
    "GPT-2 Conv1D": (gpt2(), frod(runtime_offload_base_weight=True)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_trainable_and_saved_bytes_equal_peft_on_real_weights(case):
    config, peft_config = case
    model = real(config, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    saved = nbytes(get_peft_model_state_dict(model).values())
    est = estimate(config, peft_config, batch_size=2, seq_len=16, exact=True)
    assert est.trainable_params == trainable
    assert est.total_params == total
    assert est.adapter_file_bytes == saved
    # the trainable vectors in float32 (autocast_adapter_dtype) are the estimate's "adapter" part
    assert est.breakdown["adapter"] == 4 * trainable


def test_save_projection_false_saves_only_the_trainable_vectors():
    peft_config = frod(save_projection=False)
    model = real(llama(), peft_config)
    est = estimate(llama(), peft_config, batch_size=2, seq_len=16, exact=True)
    assert est.adapter_file_bytes == nbytes(get_peft_model_state_dict(model).values())
    assert est.adapter_file_bytes == 4 * est.trainable_params


def _stand_in(config, peft_config, host_projections: bool, offload_on_apply: bool):
    """The wrapped model as the trace builds it: the base on meta, FRoD's set-up replaced (estimator.frod)."""
    from peftpick.estimator.frod import value_free_setup
    from peftpick.knowledge.architectures import skip_weight_init

    with torch.device("meta"), skip_weight_init():
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with value_free_setup(host_projections, offload_on_apply), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, copy.deepcopy(peft_config))
    model.to("meta")
    return model


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_stand_in_holds_the_tensors_of_real_frod(case):
    """V (in x in, base dtype) per category, COO indices (2 x nnz int64) and size, U (out x in, base dtype) per
    layer, lambda_l and the S values in float32: names, shapes and dtypes as PEFT makes them from real weights."""
    config, peft_config = case
    expected = frod_tensors(real(config, peft_config))
    for host in (True, False):
        assert frod_tensors(_stand_in(config, peft_config, host, not host)) == expected


def test_gpu_resident_frod_tensors_by_program():
    """Loaded on the GPU then wrapped, only U and the trainable vectors follow the layers (PEFT's
    _replace_module moves the `frod_`-named submodules; V, indices and size stay where FRoD made them, on the
    CPU); wrapped then moved, all of them are on the GPU."""
    peft_config = frod(runtime_offload_base_weight=True)
    model = real(llama(), peft_config)
    layer_bytes = nbytes(t for n, t in list(model.named_parameters()) + list(model.named_buffers())
                         if ".frod_U." in n or ".frod_lambda_" in n)
    shared_bytes = nbytes(t for n, t in model.named_buffers() if n.startswith("base_model.frod_"))
    for host, expected in ((True, layer_bytes), (False, layer_bytes + shared_bytes)):
        stand_in = _stand_in(llama(), peft_config, host, not host)
        on_meta = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                   for n, t in list(stand_in.named_parameters()) + list(stand_in.named_buffers())
                   if "frod_" in n and t.device.type == "meta"}
        assert sum(on_meta.values()) == expected


def _targeted_weight_bytes(config, peft_config) -> int:
    model = real(config, peft_config)
    return nbytes(m.get_base_layer().weight for m in model.modules() if hasattr(m, "frod_U"))


@pytest.mark.parametrize("offload", [True, False])
def test_trace_holds_u_and_the_trainable_vectors_and_frees_offloaded_base_weights(offload):
    """The causal-LM trace (a model loaded on the GPU, then wrapped): the build phase holds the base model plus
    exactly U and the float32 trainable vectors of the real model; with runtime_offload_base_weight the first
    forward frees exactly the targeted base weights (FRoD moves them to the CPU), and no later step brings them
    back."""
    from peftpick.estimator.tracer import ALLOC, FREE
    from peftpick.estimator.training import TrainingProgram, trace_training

    config, peft_config = llama(), frod(runtime_offload_base_weight=offload)
    model = real(config, peft_config)
    frod_held = nbytes(t for n, t in list(model.named_parameters()) + list(model.named_buffers())
                       if ".frod_U." in n or ".frod_lambda_" in n)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base_bytes = nbytes(list(plain.parameters()) + list(plain.buffers()))

    program = TrainingProgram(config=config, peft_config=copy.deepcopy(peft_config), batch_size=2, seq_len=16,
                              gradient_checkpointing=False, optimizer="adamw", dtype=torch.bfloat16, steps=2)
    trace, _counts = trace_training(program)
    built: dict[int, int] = {}
    phase_end = trace.marks["forward0"]
    for kind, handle, size, _unit in trace.events[:phase_end]:
        assert kind == ALLOC
        built[handle] = size
    assert sum(built.values()) == WORKSPACES + base_bytes + frod_held

    freed_by_phase: dict[str, int] = {}
    for index, (kind, handle, _size, _unit) in enumerate(trace.events):
        if kind == FREE and handle in built:
            phase = max((p for p, start in trace.marks.items() if start <= index), key=trace.marks.get)
            freed_by_phase[phase] = freed_by_phase.get(phase, 0) + built[handle]
    freed_by_phase.pop("end", None)  # the program ending
    expected = {"forward0": _targeted_weight_bytes(config, peft_config)} if offload else {}
    assert freed_by_phase == expected


def test_offloading_lowers_the_peak_by_the_targeted_weights():
    on = estimate(llama(), frod(runtime_offload_base_weight=True), batch_size=2, seq_len=16, exact=True)
    off = estimate(llama(), frod(runtime_offload_base_weight=False), batch_size=2, seq_len=16, exact=True)
    targeted = _targeted_weight_bytes(llama(), frod())
    assert off.breakdown["weights"] - on.breakdown["weights"] == targeted
    assert any("runtime_offload_base_weight" in note and "not counted" in note for note in on.assumptions)


@pytest.mark.parametrize("kwargs", [dict(frod_dropout=0.1), dict(dtype="float32"), dict(gradient_checkpointing=True)],
                         ids=["dropout (base layer runs)", "float32 (sparse.mm path)", "gradient checkpointing"])
def test_other_paths_trace_and_lengthen_like_the_full_trace(kwargs):
    kwargs = dict(kwargs)
    peft_config = frod(runtime_offload_base_weight=True, frod_dropout=kwargs.pop("frod_dropout", 0.0))
    config = llama(num_hidden_layers=8)
    short = estimate(config, peft_config, batch_size=2, seq_len=16, **kwargs)
    full = estimate(config, peft_config, batch_size=2, seq_len=16, exact=True, **kwargs)
    assert (short.peak_allocated_bytes, short.peak_reserved_bytes) == (full.peak_allocated_bytes,
                                                                       full.peak_reserved_bytes)
    assert short.trainable_params == sum(p.numel() for p in real(config, peft_config).parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ denoiser

diffusers = pytest.importorskip("diffusers")

TINY_FLUX2 = dict(patch_size=1, in_channels=16, num_layers=5, num_single_layers=5, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False)
KLEIN_TARGETS = ["to_out.0", "to_add_out", "to_qkv_mlp_proj", "add_k_proj", "add_q_proj", "add_v_proj", "to_k", "to_q",
                 "to_v", "linear_in", "linear_out"]


def _tiny_flux2():
    from peftpick.types import Architecture, Denoiser

    return Architecture(name="tiny-flux2", model_type="flux2", hidden_size=64, num_layers=10, num_heads=4,
                        num_kv_heads=4, head_dim=16, intermediate_size=0, vocab_size=0, tie_word_embeddings=False,
                        config=TINY_FLUX2,
                        denoiser=Denoiser(family="flux2", diffusers_class="Flux2Transformer2DModel", objective="flow",
                                          latent_channels=4, vae_scale=8, patch=2, text_dim=32, text_len=64,
                                          default_resolution=256))


def flux2_frod(offload: bool = True) -> FrodConfig:
    return FrodConfig(target_modules=KLEIN_TARGETS, runtime_offload_base_weight=offload, progressbar=False)


@pytest.fixture(scope="module")
def real_flux2():
    """PEFT's FRoD on a tiny FLUX.2 transformer with real weights (runtime_offload_base_weight only decides
    where the targeted base weights go on a GPU: on the CPU the model is the same either way)."""
    torch.manual_seed(0)
    model = diffusers.Flux2Transformer2DModel.from_config(dict(TINY_FLUX2)).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, flux2_frod(), autocast_adapter_dtype=True)


@pytest.mark.parametrize("offload", [True, False])
def test_denoiser_build_holds_what_the_moved_model_keeps_on_the_gpu(real_flux2, offload):
    """The PEFT image suite wraps on the CPU and moves the model: every parameter and buffer goes to the GPU, then
    FRoD's _apply moves the targeted base weights back to the CPU when runtime_offload_base_weight is set."""
    from peftpick.estimator.diffusion import DenoiserProgram
    from peftpick.estimator.diffusion_meta import apply_order
    from peftpick.estimator.diffusion_trace import _Program
    from peftpick.types import TrainingShape

    peft_config, model = flux2_frod(offload), real_flux2
    targeted = {id(m.get_base_layer().weight) for m in model.modules() if hasattr(m, "frod_U")}
    expected = nbytes(t for t in apply_order(model) if not (offload and id(t) in targeted))

    program = _Program(_tiny_flux2(), peft_config, TrainingShape(batch_size=1, resolution=256), DenoiserProgram(),
                       exact=True)
    program.build_model()
    from peftpick.estimator.frod import _SCALARS

    placeholders = {t.untyped_storage()._cdata for t in _SCALARS.values()}
    held = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in apply_order(program.model)
            if t.device.type == "meta" and t.untyped_storage()._cdata not in placeholders}
    assert sum(held.values()) == expected
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in program.trainable) == trainable


def test_denoiser_estimate_counts_as_peft_does_and_lengthens(real_flux2):
    from peftpick.estimator.diffusion import estimate_denoiser
    from peftpick.types import TrainingShape

    peft_config, model = flux2_frod(), real_flux2
    shape = TrainingShape(batch_size=1, gradient_checkpointing=True, resolution=256)
    short = estimate_denoiser(_tiny_flux2(), peft_config, shape)
    full = estimate_denoiser(_tiny_flux2(), peft_config, shape, exact=True)
    assert short.trainable_params == full.trainable_params == sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad)
    assert short.adapter_file_bytes == nbytes(get_peft_model_state_dict(model).values())
    assert short.peak_allocated_bytes == full.peak_allocated_bytes


# ------------------------------------------------------------------------------------------ FRoD's own forward


def _dense_ops(layer, x):
    """(op, shape, dtype) of every fresh strided tensor the layer's forward and backward make, but the COO ops
    (PEFT's on the CPU, the stand-ins' on meta) and the stand-ins' placeholders: what FRoD's own code computes."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    coo = {"_sparse_coo_tensor_with_dims_and_tensors", "_coalesce", "sparse_mask", "_values", "_indices",
           "is_coalesced", "_nnz", "empty", "empty_like", "ones"}
    seen: Counter = Counter()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            views = any(r.alias_info is not None for r in func._schema.returns)
            if name not in coo and not views:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                        seen[("dense S" if name in ("_to_dense", "zeros") else name, tuple(t.shape), t.dtype)] += 1
            return out

    with Ops(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on sparse invariant checks
        layer(x).float().sum().backward()
    return seen


def test_the_stand_ins_run_frods_own_forward_and_backward():
    """The trace runs PEFT's Linear.forward itself: every dense tensor it and its backward make on a real layer
    (CPU, real weights, real COO ops) it makes on meta, the dense S (in x in) included."""
    peft_config = frod(runtime_offload_base_weight=True)
    layer = real(llama(), peft_config).base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    expected = _dense_ops(layer, x)
    stand_in = _stand_in(llama(), peft_config, host_projections=False, offload_on_apply=True)
    layer = stand_in.base_model.model.model.layers[1].self_attn.q_proj
    got = _dense_ops(layer, torch.empty(2, 5, 64, dtype=torch.bfloat16, device="meta", requires_grad=True))
    assert got == expected
    assert expected[("dense S", (64, 64), torch.bfloat16)] == 1
