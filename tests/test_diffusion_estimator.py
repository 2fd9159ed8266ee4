"""The denoiser memory estimate (peftpick.estimator.diffusion): tiny diffusers configs on the meta device, plus one
FLUX.2-klein-4B estimate checked against the PEFT image suite's measurement on an L40S."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("diffusers")

import peft  # noqa: E402
import torch  # noqa: E402

from peftpick.estimator.diffusion import (  # noqa: E402
    CUBLAS_WORKSPACE_DEFAULT, DenoiserProgram, estimate_denoiser, peft_image_suite,
)
from peftpick.types import Architecture, Denoiser, TrainingShape  # noqa: E402

KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)
KLEIN_TARGETS = ["to_out.0", "to_add_out", "to_qkv_mlp_proj", "add_k_proj", "add_q_proj", "add_v_proj", "to_k", "to_q",
                 "to_v", "linear_in", "linear_out"]
TINY_FLUX2 = dict(patch_size=1, in_channels=16, num_layers=6, num_single_layers=6, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False)
TINY_WAN = dict(added_kv_proj_dim=None, attention_head_dim=16, cross_attn_norm=True, eps=1e-06, ffn_dim=96,
                freq_dim=256, in_channels=16, num_attention_heads=2, num_layers=6, out_channels=16,
                patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", text_dim=64)


def architecture(name, config, **denoiser) -> Architecture:
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("attention_head_dim", 1)
    return Architecture(name=name, model_type=denoiser["family"], hidden_size=heads * head_dim,
                        num_layers=config.get("num_layers", 1) + config.get("num_single_layers", 0), num_heads=heads,
                        num_kv_heads=heads, head_dim=head_dim, intermediate_size=0, vocab_size=0,
                        tie_word_embeddings=False, config=config, denoiser=Denoiser(**denoiser))


def tiny_flux2(**changes) -> Architecture:
    return architecture("tiny-flux2", {**TINY_FLUX2, **changes}, family="flux2",
                        diffusers_class="Flux2Transformer2DModel", objective="flow", latent_channels=4, vae_scale=8,
                        patch=2, text_dim=32, text_len=64, text_encoders=(("te", 5_000_000),), vae_params=1_000_000,
                        default_resolution=256)


def tiny_wan() -> Architecture:
    return architecture("tiny-wan", TINY_WAN, family="wan", diffusers_class="WanTransformer3DModel", objective="flow",
                        latent_channels=16, vae_scale=8, patch=2, text_dim=64, text_len=32, vae_temporal=4,
                        default_resolution=128, default_frames=9)


def lora(targets=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"), r=8):
    return peft.LoraConfig(r=r, lora_alpha=r, target_modules=list(targets))


SHAPE = TrainingShape(batch_size=2, gradient_checkpointing=False, resolution=256)
_ESTIMATES: dict = {}


def tiny(method="lora", exact=False, **shape):
    """Estimates of the tiny FLUX.2 config, computed once per setting (several tests share them)."""
    key = (method, exact, tuple(sorted(shape.items())))
    if key not in _ESTIMATES:
        config = lora() if method == "lora" else None
        _ESTIMATES[key] = estimate_denoiser(tiny_flux2(), config, dataclasses.replace(SHAPE, **shape), exact=exact)
    return _ESTIMATES[key]


def test_breakdown_adds_up_to_peak_allocated():
    est = tiny()
    assert sum(est.breakdown.values()) == est.peak_allocated_bytes
    assert est.peak_reserved_bytes >= est.peak_allocated_bytes > 0
    assert est.trainable_params > 0 and est.total_params > est.trainable_params


def test_lengthened_trace_matches_every_block():
    short = tiny(gradient_checkpointing=True)
    exact = tiny(exact=True, gradient_checkpointing=True)
    assert any("repeated" in note for note in short.assumptions)
    assert short.trainable_params == exact.trainable_params and short.total_params == exact.total_params
    assert short.adapter_file_bytes == exact.adapter_file_bytes
    assert abs(short.peak_allocated_bytes - exact.peak_allocated_bytes) <= 0.01 * exact.peak_allocated_bytes
    assert abs(short.peak_reserved_bytes - exact.peak_reserved_bytes) <= 0.02 * exact.peak_reserved_bytes


@pytest.mark.parametrize("arch", [tiny_flux2, tiny_wan], ids=["flux2", "wan"])
def test_full_fine_tuning_is_lengthened_exactly(arch):
    # trained embedders give every block's side inputs gradients, summed from the last block back: the
    # lengthened trace must free each copy's partial sums as a trace of every block does, step after step
    shape = dataclasses.replace(SHAPE, gradient_checkpointing=True, resolution=128, frames=9 if arch is tiny_wan else None)
    short = estimate_denoiser(arch(), None, shape)
    exact = estimate_denoiser(arch(), None, shape, exact=True)
    assert any("repeated" in note for note in short.assumptions)
    assert (short.peak_allocated_bytes, short.peak_reserved_bytes) == (exact.peak_allocated_bytes,
                                                                       exact.peak_reserved_bytes)


def test_frozen_shared_tensors_are_lengthened_and_trained_ones_trace_every_block():
    targets = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"]
    shape = dataclasses.replace(SHAPE, gradient_checkpointing=True)
    vera = peft.VeraConfig(r=8, target_modules=targets)  # one frozen random pair for every layer
    short, exact = (estimate_denoiser(tiny_flux2(), vera, shape, exact=e) for e in (False, True))
    assert any("repeated" in note for note in short.assumptions)
    assert (short.peak_allocated_bytes, short.peak_reserved_bytes) == (exact.peak_allocated_bytes,
                                                                       exact.peak_reserved_bytes)
    bank = peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=16, target_modules=targets)  # one trained bank
    assert not any("repeated" in note for note in estimate_denoiser(tiny_flux2(), bank, shape).assumptions)


TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
                 cross_attention_dim=32, attention_head_dim=[2, 4], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 transformer_layers_per_block=[1, 5], norm_num_groups=8)
TINY_SD3 = dict(sample_size=32, patch_size=2, in_channels=4, attention_head_dim=8, joint_attention_dim=32,
                pooled_projection_dim=16, out_channels=4, qk_norm="rms_norm", num_layers=6, num_attention_heads=4,
                caption_projection_dim=32, pos_embed_max_size=32, dual_attention_layers=[])


def tiny_unet() -> Architecture:
    return architecture("tiny-unet", TINY_UNET, family="sdxl", diffusers_class="UNet2DConditionModel",
                        objective="epsilon", latent_channels=4, vae_scale=8, patch=1, text_dim=32, text_len=16,
                        pooled_dim=32, added_time_ids=6, default_resolution=128)


def tiny_sd3() -> Architecture:
    return architecture("tiny-sd3", TINY_SD3, family="sd3", diffusers_class="SD3Transformer2DModel", objective="flow",
                        latent_channels=4, vae_scale=8, patch=2, text_dim=32, text_len=16, pooled_dim=16,
                        default_resolution=128)


@pytest.mark.parametrize("arch, targets", [(tiny_unet, ("to_q", "to_k", "to_v", "to_out.0", "proj_in")),
                                           (tiny_sd3, ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj"))],
                         ids=["sdxl-unet", "sd3-uniform"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_unet_and_sd3_block_lists_are_lengthened_exactly(arch, targets, checkpointing):
    """The UNet's nested transformer_blocks lists (five blocks here: three traced) and SD3's uniform blocks (the
    last, context-only block kept last) lengthen to the figures of a trace of every block."""
    shape = dataclasses.replace(SHAPE, resolution=128, gradient_checkpointing=checkpointing)
    short = estimate_denoiser(arch(), lora(targets), shape)
    exact = estimate_denoiser(arch(), lora(targets), shape, exact=True)
    assert any("repeated" in note for note in short.assumptions)
    assert not any("repeated" in note for note in exact.assumptions)
    assert (short.trainable_params, short.total_params, short.adapter_file_bytes) == \
        (exact.trainable_params, exact.total_params, exact.adapter_file_bytes)
    # as for FLUX.2 (test_lengthened_trace_matches_every_block); the UNet's figures come out identical
    assert abs(short.peak_allocated_bytes - exact.peak_allocated_bytes) <= 0.01 * exact.peak_allocated_bytes
    assert abs(short.peak_reserved_bytes - exact.peak_reserved_bytes) <= 0.02 * exact.peak_reserved_bytes


def test_gradient_checkpointing_lowers_activations():
    off = tiny(batch_size=4)
    on = tiny(batch_size=4, gradient_checkpointing=True)
    assert on.breakdown["activations"] < off.breakdown["activations"]
    assert on.peak_allocated_bytes < off.peak_allocated_bytes


def test_resolution_raises_activations():
    low = tiny(resolution=128)
    high = tiny(resolution=512)
    assert high.breakdown["activations"] > 2 * low.breakdown["activations"]


def test_full_fine_tuning_needs_more_than_lora():
    full = tiny("full")
    adapter = tiny()
    assert full.peak_allocated_bytes > adapter.peak_allocated_bytes
    assert full.trainable_params == full.total_params
    assert full.breakdown["optimizer"] > 0 and full.breakdown.get("adapter", 0) == 0


def test_batch_scaling():
    one = tiny(batch_size=1)
    four = tiny(batch_size=4)
    assert four.breakdown["activations"] > 3 * one.breakdown["activations"]
    assert four.breakdown["weights"] == one.breakdown["weights"]


def test_wan_video_shape():
    arch = tiny_wan()
    shape = TrainingShape(batch_size=1, gradient_checkpointing=True, resolution=128, frames=9)
    est = estimate_denoiser(arch, lora(targets=("to_q", "to_k", "to_v")), shape)
    longer = estimate_denoiser(arch, lora(targets=("to_q", "to_k", "to_v")), dataclasses.replace(shape, frames=17))
    assert sum(est.breakdown.values()) == est.peak_allocated_bytes
    assert longer.breakdown["activations"] > est.breakdown["activations"]
    assert any("latent frames" in note for note in est.assumptions)


def test_uncached_inputs_add_the_encoders():
    cached = tiny()
    uncached = tiny(cached_inputs=False)
    extra = (5_000_000 + 1_000_000) * 2  # bf16 text encoder and VAE
    assert uncached.breakdown["other models"] - cached.breakdown.get("other models", 0) == extra
    assert abs(uncached.peak_allocated_bytes - cached.peak_allocated_bytes - extra) < 4096  # block rounding
    assert any("modelled" in note for note in uncached.assumptions)


def test_estimates_are_deterministic():
    first = tiny()
    second = estimate_denoiser(tiny_flux2(), lora(), SHAPE)
    assert (first.peak_allocated_bytes, first.peak_reserved_bytes) == (second.peak_allocated_bytes,
                                                                     second.peak_reserved_bytes)


def test_workspace_size_follows_the_gpu():
    hopper = tiny()
    ada = estimate_denoiser(tiny_flux2(), lora(), SHAPE, program=DenoiserProgram(cublas_workspace=CUBLAS_WORKSPACE_DEFAULT))
    difference = hopper.peak_allocated_bytes - ada.peak_allocated_bytes
    assert abs(difference - 2 * (32 * 2**20 - CUBLAS_WORKSPACE_DEFAULT)) < 2**20


def test_klein_lora_matches_the_peft_suite_measurement():
    """lora/flux2-klein-default of PEFT's image-gen suite: accelerator_memory_max 10,708,058,112 bytes (L40S)."""
    arch = architecture("flux2-klein-base-4b", KLEIN_4B, family="flux2", diffusers_class="Flux2Transformer2DModel",
                        objective="flow", latent_channels=32, vae_scale=8, patch=2, text_dim=7680, text_len=512)
    config = peft.LoraConfig(r=32, lora_alpha=32, target_modules=KLEIN_TARGETS)
    params = {"batch_size": 2, "optimizer_kwargs": {"lr": 1e-4, "weight_decay": 1e-4}, "grad_norm_clip": 1.0,
              "repeats": 1000, "text_encoder_out_layers": [10, 20, 30]}
    shape = TrainingShape(batch_size=2, gradient_checkpointing=True, dtype="bfloat16", resolution=512)
    est = estimate_denoiser(arch, config, shape, program=peft_image_suite(params, diffusers_version="0.38.0"))
    assert est.trainable_params == 38_338_560
    measured = 10_708_058_112
    assert abs(est.peak_reserved_bytes - measured) <= 0.05 * measured


def test_cuda_temporaries_of_fft_and_batched_matmul():
    """cuFFT work areas (2-D and 3-D plans) and the contiguous copies cuBLAS-backed bmm makes of operands whose
    matrices have no unit stride (the einsum of C3A's block-circulant product)."""
    import torch

    from peftpick.estimator.kernels import cuda_temporaries

    aten = torch.ops.aten
    x = torch.empty(64, 32, dtype=torch.complex64, device="meta")
    assert cuda_temporaries(aten._fft_c2c.default, (x, [0, 1], 2, False), torch.empty_like(x)) == ([64 * 32 * 8], [])
    assert cuda_temporaries(aten._fft_c2c.default, (x, [1], 2, False), torch.empty_like(x)) is None
    # einsum("...nb,mnb->...mb") hands bmm a (b, B*N, n) view with strides (1, n*b, b)
    left = torch.empty(2, 6, 3, 16, dtype=torch.complex64, device="meta").permute(3, 0, 1, 2).reshape(16, 12, 3)
    right = torch.empty(16, 3, 5, dtype=torch.complex64, device="meta")
    out = torch.empty(16, 12, 5, dtype=torch.complex64, device="meta")
    assert left.stride() == (1, 48, 16)
    assert cuda_temporaries(aten.bmm.default, (left, right), out) == ([], [left.numel() * 8])
    assert cuda_temporaries(aten.bmm.default, (left.contiguous(), right), out) is None
    weight = torch.empty(8, 4, device="meta")
    assert cuda_temporaries(aten.mm.default, (torch.empty(3, 4, device="meta"), weight.t()), torch.empty(3, 8, device="meta")) is None


def test_tracker_logs_the_cufft_work_area():
    import torch

    from peftpick.estimator.diffusion_meta import FastStorageTracker
    from peftpick.estimator.tracer import ALLOC, FREE

    tracker = FastStorageTracker()
    with tracker:
        tracker.set_phase("forward0")
        delta = torch.fft.ifft2(torch.zeros(96, 64, device="meta")).real  # FourierFT's delta weight
    events = tracker.trace.events
    complex_buffers = [h for kind, h, nbytes, _u in events if kind == ALLOC and nbytes == 96 * 64 * 8]
    assert len(complex_buffers) == 3  # the complex copy of the input, the output, the work area
    work_area = complex_buffers[-1]
    assert tracker.trace.tags[work_area] == "overhead"
    assert any(kind == FREE and h == work_area for kind, h, _b, _u in events)
    assert delta.shape == (96, 64)


def test_denoiser_optimizers_are_the_language_model_ones():
    """estimator.optimizers builds the denoiser's optimizer too: SGD keeps one fp32 buffer per trainable
    parameter where AdamW keeps two, at the peak after the first step."""
    adamw = tiny()
    sgd = estimate_denoiser(tiny_flux2(), lora(), dataclasses.replace(SHAPE, optimizer="sgd"))
    trainable = adamw.trainable_params
    assert adamw.breakdown["optimizer"] >= 8 * trainable
    assert sgd.breakdown["optimizer"] == pytest.approx(adamw.breakdown["optimizer"] / 2, rel=0.02)
    assert any("sgd" in note for note in sgd.assumptions)


def _one_by_one(trace, traced, total, markers_at):
    """Steps copied one at a time (the first form of synthesis.repeat_last_step), markers after step `markers_at`."""
    from peftpick.estimator.diffusion_meta import EMPTY_CACHE, RESET_PEAK, insert_markers
    from peftpick.estimator.synthesis import repeat_last_step

    while traced < total:
        trace = repeat_last_step(trace, traced)
        traced += 1
        if traced == markers_at:
            insert_markers(trace, len(trace.events), (EMPTY_CACHE, RESET_PEAK))
    return trace


@pytest.mark.parametrize("suite", [False, True], ids=["plain loop", "suite windows"])
def test_steps_copied_in_one_pass_are_the_steps_copied_one_by_one(monkeypatch, suite):
    from peftpick.estimator import diffusion_trace

    seen = []
    copy_steps = diffusion_trace._Program.repeat_steps

    def recorded(self, trace, traced):
        longer, complete = copy_steps(self, trace, traced)
        seen.append((trace, traced, longer, complete, self.program.evaluations))
        return longer, complete

    monkeypatch.setattr(diffusion_trace._Program, "repeat_steps", recorded)
    program = DenoiserProgram(evaluations=True, cached_latents=4, cached_prompts=4, index_rows=8) if suite else None
    estimate_denoiser(tiny_flux2(), lora(), dataclasses.replace(SHAPE, gradient_checkpointing=True), program=program)
    trace, traced, longer, complete, evaluations = seen[0]
    assert complete and bool(evaluations) == suite
    total = 2 * diffusion_trace.WINDOW_STEPS if evaluations else 5
    expected = _one_by_one(trace, traced, total, diffusion_trace.WINDOW_STEPS if evaluations else None)
    assert len(longer.events) > len(trace.events)
    assert (longer.events, longer.marks, longer.tags, longer.phase_of, longer.owner) == (
        expected.events, expected.marks, expected.tags, expected.phase_of, expected.owner)


def test_steps_copied_before_lengthening_give_the_same_estimate(monkeypatch):
    # the fallback for lengthened steps that do not match storage by storage: the traced steps are copied first,
    # then lengthened; forced here, it must give what lengthening first gives
    from peftpick.estimator import diffusion_trace

    shape = dataclasses.replace(SHAPE, gradient_checkpointing=True)
    usual = estimate_denoiser(tiny_flux2(), lora(), shape)
    copy_steps = diffusion_trace._Program.repeat_steps
    calls = []

    def first_refused(self, trace, traced):
        calls.append(len(trace.events))
        return (trace, False) if len(calls) == 1 else copy_steps(self, trace, traced)

    monkeypatch.setattr(diffusion_trace._Program, "repeat_steps", first_refused)
    fallback = estimate_denoiser(tiny_flux2(), lora(), shape)
    assert len(calls) == 2 and calls[0] > calls[1]  # the lengthened trace, then the traced one
    assert (fallback.peak_allocated_bytes, fallback.peak_reserved_bytes, fallback.breakdown) == (
        usual.peak_allocated_bytes, usual.peak_reserved_bytes, usual.breakdown)


# ------------------------------------------------------------------------------------------ the second step


def _traced_steps(arch, config, shape, program=None, synthesize=True):
    """The program's trace up to the end of its traced steps, in canonical form (handles numbered by first
    appearance), and whether its second step was made from the first."""
    from peftpick.estimator import diffusion_trace

    prog = diffusion_trace._Program(arch, config, shape, program or DenoiserProgram(), False, synthesize=synthesize)
    with diffusion_trace.run_code_of(None), diffusion_trace.deterministic_gc():
        prog.prepare()
        trace, _steps = prog.trace_steps()
    return trace.canonical(), prog.second_step_made


SUITE_WINDOWS = DenoiserProgram(evaluations=True, cached_latents=4, cached_prompts=4, index_rows=8)


@pytest.mark.parametrize("arch, config, changes, program", [
    (tiny_flux2, lora, {}, None),
    (tiny_flux2, lora, {"gradient_checkpointing": True}, None),
    (tiny_flux2, lambda: None, {"gradient_checkpointing": True}, None),  # full fine-tuning
    (tiny_flux2, lora, {"optimizer": "sgd"}, None),
    (tiny_flux2, lora, {"optimizer": "adamw-8bit"}, None),
    (tiny_flux2, lora, {"cached_inputs": False}, None),
    (tiny_flux2, lora, {"gradient_checkpointing": True}, SUITE_WINDOWS),
    (tiny_unet, lambda: lora(("to_q", "to_k", "to_v", "to_out.0", "proj_in")), {"resolution": 128}, None),
    (tiny_sd3, lambda: lora(("to_q", "to_k", "to_v", "to_out.0", "add_q_proj")), {"resolution": 128}, None),
    (tiny_wan, lambda: lora(("to_q", "to_k", "to_v", "to_out.0")), {"resolution": 128}, None),
], ids=["flux2", "flux2-checkpointing", "flux2-full", "flux2-sgd", "flux2-adamw-8bit", "flux2-encoders-resident",
        "flux2-suite-windows", "sdxl-unet", "sd3", "wan"])
def test_second_step_made_from_the_first_is_the_traced_second_step(arch, config, changes, program):
    """The first step's events without its optimizer state and workspaces, with the frees of what it leaves
    where the second step makes them (zero_grad; the loop variables' rebinding, the UNet's noise-schedule
    views among them): event for event the trace of a second step."""
    shape = dataclasses.replace(SHAPE, **changes)
    made, was_made = _traced_steps(arch(), config(), shape, program)
    traced, traced_made = _traced_steps(arch(), config(), shape, program, synthesize=False)
    assert was_made and not traced_made
    assert made == traced


def test_a_cache_the_model_keeps_from_the_first_step_makes_the_second_traced(monkeypatch):
    # like Qwen-Image's rotary tables, moved to the GPU at the first forward and kept: the second step does not
    # make them again, so a copy of the first would; the storage is not a loop variable, a gradient or state
    from peftpick.estimator import diffusion_trace

    forward = diffusion_trace._Flux2.forward

    def caching(prog, v):
        if not hasattr(prog, "rope_cache"):
            prog.rope_cache = torch.empty(4096, device="meta")
        return forward(prog, v)

    monkeypatch.setattr(diffusion_trace._Flux2, "forward", staticmethod(caching))
    made, was_made = _traced_steps(tiny_flux2(), lora(), SHAPE)
    assert not was_made
    assert made == _traced_steps(tiny_flux2(), lora(), SHAPE, synthesize=False)[0]


def test_a_loop_variable_held_elsewhere_is_traced_again(monkeypatch):
    # the prediction also kept by the model code until its next forward: deleting the loop variable frees
    # nothing, so where the second step frees it is not known; the program is traced again, both steps for real
    from peftpick.estimator import diffusion_trace

    forward = diffusion_trace._Flux2.forward

    def keeping(prog, v):
        prog.last_prediction = forward(prog, v)
        return prog.last_prediction

    monkeypatch.setattr(diffusion_trace._Flux2, "forward", staticmethod(keeping))
    outcomes = []
    trace_steps = diffusion_trace._Program.trace_steps

    def recorded(self):
        out = trace_steps(self)
        outcomes.append((self.synthesize, out[0] is None))
        return out

    monkeypatch.setattr(diffusion_trace._Program, "trace_steps", recorded)
    args = (tiny_flux2(), lora(), SHAPE, DenoiserProgram(), False)
    with diffusion_trace.deterministic_gc():
        again = diffusion_trace._Program(*args).run()
        traced = diffusion_trace._Program(*args, synthesize=False).run()
    assert outcomes == [(True, True), (False, False), (False, False)]
    assert (again.peak_allocated, again.peak_reserved, again.breakdown) == (
        traced.peak_allocated, traced.peak_reserved, traced.breakdown)


def test_adafactor_replaces_its_state_each_step_so_its_second_step_is_traced(monkeypatch):
    from peftpick.estimator import diffusion_trace

    shape = dataclasses.replace(SHAPE, optimizer="adafactor")
    traced, was_made = _traced_steps(tiny_flux2(), lora(), shape)
    assert not was_made
    # made from the first step, the second would keep every parameter's first "RMS" tensor as lasting state
    monkeypatch.setattr(diffusion_trace, "STATE_MADE_ONCE", (*diffusion_trace.STATE_MADE_ONCE, "adafactor"))
    made, was_made = _traced_steps(tiny_flux2(), lora(), shape)
    assert was_made and len(made[0]) < len(traced[0])


def test_precomputed_caches_and_later_storages_have_distinct_handles():
    # replicate's copies of the prompt and latent encodings take handles from the tracker: the storages it
    # tracks after them (the caches, the training steps) get new ones
    from peftpick.estimator import diffusion_trace

    arch = architecture("flux2-klein-base-4b", KLEIN_4B, family="flux2", diffusers_class="Flux2Transformer2DModel",
                        objective="flow", latent_channels=32, vae_scale=8, patch=2, text_dim=7680, text_len=512)
    params = {"batch_size": 2, "repeats": 1000, "text_encoder_out_layers": [10, 20, 30]}
    shape = TrainingShape(batch_size=2, gradient_checkpointing=True, dtype="bfloat16", resolution=512)
    prog = diffusion_trace._Program(arch, lora(KLEIN_TARGETS), shape, peft_image_suite(params), False, synthesize=False)
    with diffusion_trace.run_code_of(None), diffusion_trace.deterministic_gc():
        prog.prepare()
        trace, _steps = prog.trace_steps()
    allocated = [handle for kind, handle, _nbytes, _unit in trace.events if kind == 1]
    assert trace.marks["precompute"] < trace.marks["forward0"]
    assert len(allocated) == len(set(allocated))


def test_second_step_from_first_on_a_trace_made_by_hand():
    """synthesis.second_step_from_first: the step's allocations with new handles (its lasting state left out,
    a free of an earlier storage not repeated, names and phases renumbered), the drops at their points; a drop
    noted in the phase that ends at an index comes before the next phase's mark there."""
    from peftpick.estimator.synthesis import second_step_from_first
    from peftpick.estimator.tracer import ALLOC, FREE, Trace

    events = [(ALLOC, 1, 100, None),                              # 0 build: weights
              (ALLOC, 2, 8, None), (ALLOC, 3, 16, 0),             # 1 forward0: input, activation
              (FREE, 3, 0, 0), (ALLOC, 4, 4, None),               # 3 backward0: activation freed, gradient
              (ALLOC, 5, 8, None), (ALLOC, 6, 2, None), (FREE, 6, 0, None), (FREE, 1, 0, None)]  # 5 optimizer0
    marks = {"build": 0, "forward0": 1, "backward0": 3, "optimizer0": 5, "end": 9}
    phases = {1: "build", 2: "forward0", 3: "forward0", 4: "backward0", 5: "optimizer0", 6: "optimizer0"}
    trace = Trace(events=list(events), tags={2: "inputs", 4: "grads", 5: "optimizer"}, phase_of=phases,
                  owner={3: 0}, marks=dict(marks))
    drops = [(2, "forward0", [(4, None)]),   # zero_grad after the input is made: the gradient
             (3, "forward0", [(2, 7)])]      # the input's name rebound as forward ends: before backward1's mark
    out = second_step_from_first(trace, 1, once={5}, drops=drops)
    assert out.events[:9] == events
    assert out.events[9:] == [(ALLOC, 7, 8, None), (FREE, 4, 0, None), (ALLOC, 8, 16, 0), (FREE, 2, 0, 7),
                              (FREE, 8, 0, 0), (ALLOC, 9, 4, None), (ALLOC, 10, 2, None), (FREE, 10, 0, None)]
    assert {k: out.marks[k] for k in ("forward1", "backward1", "optimizer1", "end")} == {
        "forward1": 9, "backward1": 13, "optimizer1": 15, "end": 17}
    assert (out.tags[7], out.tags[9], out.phase_of[8], out.phase_of[10], out.owner[8]) == (
        "inputs", "grads", "forward1", "optimizer1", 0)
    assert 5 in out.tags and not any(h == 5 for _k, h, _b, _u in out.events[9:])
