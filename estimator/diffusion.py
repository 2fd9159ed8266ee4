"""Peak GPU memory of fine-tuning a diffusion denoiser (diffusers models), estimated without a GPU.

The same method as the causal-LM estimate (`peftpick.estimator`): the real diffusers + PEFT training program runs
on the meta device under the storage tracker; fused attention goes through the kernel stand-ins (diffusers'
attention processors call `F.scaled_dot_product_attention`, and under gradient checkpointing the recomputation
in backward enters the stand-ins through the checkpoint's `context_fn`); cuBLAS workspaces are added, and so are
the buffers some CUDA kernels allocate inside the call that their meta kernels do not make (cuFFT work areas,
cuBLAS operand copies: `kernels.cuda_temporaries`, FourierFT's ifft2 and C3A's block-circulant einsum need them);
the event trace is replayed through the caching-allocator model.

The traced program is the training loop of diffusers' example scripts as the PEFT image-generation suite runs it
(huggingface/peft method_comparison/image-gen/run.py at b2d61f5, the code that produced the suite's results):

    latents = latents_cache.index_select(0, idx); prompt_embeds = prompt_cache.index_select(0, idx)
    noise = torch.randn_like(latents); noisy = (1 - sigmas) * latents + sigmas * noise   # flow matching
    optimizer.zero_grad(set_to_none=True)
    model_pred = transformer(hidden_states=pack(noisy), timestep=t / 1000, encoder_hidden_states=prompt_embeds, ...)
    loss = mean((model_pred.float() - target.float()) ** 2); loss.backward()
    clip_grad_norm_(transformer.parameters(), 1.0); optimizer.step()      # torch AdamW, multi-tensor

with the denoiser in the training dtype, PEFT adapter weights in float32 (`autocast_adapter_dtype=True`) and, when
`TrainingShape.gradient_checkpointing` is set, `transformer.enable_gradient_checkpointing()` (non-reentrant
torch.utils.checkpoint around every block). Variables keep their values from one step into the next as Python
locals of a loop do.

The first step is traced and the second made from it (`synthesis.second_step_from_first`): the same events less
the optimizer state and workspaces the first makes once, plus the frees of what the first leaves, which are
found by doing them (zero_grad, then each loop variable deleted in the order the second step rebinds them) and
placed at those points of the step's code. Where the first step leaves anything else (a cache the model keeps,
as Qwen-Image's rotary tables; an optimizer that replaces its state, as Adafactor), the second step is traced;
tests check the made step against a traced one event for event. Later steps are copies of the second
(`synthesis.repeat_last_step`).

`DenoiserProgram` adds what a particular run holds beside it; `peft_image_suite()` is the PEFT suite's run on an
L40S: the DINOv2 eval model resident, the prompt-embedding and latent caches made on the GPU by a traced
text-encoder and VAE pass (whose leftovers stay in the allocator's segments), `empty_cache()` and a peak reset
before training and after every evaluation, and the reserved bytes before anything was loaded subtracted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import Architecture, Denoiser, MemoryEstimate, TrainingShape

GIB = 2**30

# cuBLAS workspace per thread that runs matmuls (the forward thread and the autograd device thread), allocated
# through the caching allocator. Size from pytorch aten/src/ATen/cuda/CublasHandlePool.cpp
# (parseChosenWorkspaceSize): ":4096:2:16:8" = 4096 KiB x 2 + 16 KiB x 8 = 8,519,680 bytes by default, and 4096 KiB
# x 8 = 32 MiB on Hopper (sm_90; newer torch also on sm_100 / sm_120). The workspace map is thread-local, so each
# thread allocates its own; cuBLASLt shares it (TORCH_CUBLASLT_UNIFIED_WORKSPACE defaults to on).
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_WORKSPACE_HOPPER = 4096 * 1024 * 8
CUBLAS_THREADS = 2

PARTS = ("weights", "adapter", "grads", "optimizer", "activations", "inputs", "other models", "logits/loss", "overhead")
FAMILIES = ("flux2", "flux", "sd3", "sdxl", "wan", "qwen-image")


# Methods whose adapter cannot be built without the base model's values, with the reason.
NOT_ESTIMABLE: dict[str, str] = {
    # FRoD's decomposition of the base weights and its base-weight offloading: stand-ins in estimator/frod.py
}


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    major = compute_capability[0]
    return CUBLAS_WORKSPACE_HOPPER if major in (9, 10, 12) else CUBLAS_WORKSPACE_DEFAULT


@dataclass(frozen=True)
class ResidentModel:
    """A model moved whole to the GPU beside the denoiser (`module.to(device)`), built from its config."""

    name: str
    library: str  # "transformers" or "diffusers"
    class_name: str  # e.g. "Dinov2Model", "Qwen3ForCausalLM", "AutoencoderKLFlux2"
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    dtype: str = "float32"
    registry_name: str | None = None  # a causal LM of peftpick's registry (its config is used instead of `config`)


@dataclass(frozen=True)
class Precompute:
    """The pass that fills the caches before training: the text encoder moved to the GPU, every prompt encoded
    one by one, the encoder moved back; then the VAE likewise over the images in batches (run.py at b2d61f5:
    precompute_prompt_caches, precompute_latent_cache). Traced for real: its leftovers (the caches and the
    segments that hold them) stay in the allocator state that training starts from."""

    text_encoder: ResidentModel
    text_layers: tuple[int, ...]
    prompts: int
    vae: ResidentModel
    images: int
    batch_size: int


@dataclass(frozen=True)
class DenoiserProgram:
    """What a training run does beside the traced step. The defaults are a plain diffusers training loop with
    the batch's inputs computed beforehand (`TrainingShape.cached_inputs`) and nothing else on the GPU."""

    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    resident: tuple[ResidentModel, ...] = ()
    precompute: Precompute | None = None
    cached_prompts: int = 0  # prompt embeddings held on the GPU; 0: only the batch's, moved there each step
    cached_latents: int = 0
    index_rows: int = 0  # a GPU tensor of sample indices (the suite's train_indices)
    evaluations: bool = False  # empty_cache() + reset_peak_memory_stats() between stretches of steps
    baseline: bool = False  # subtract the reserved bytes left by a Linear(1, 1) moved to the GPU at start
    cublas_workspace: int = CUBLAS_WORKSPACE_HOPPER
    gpu: str = "a Hopper GPU (H100)"
    guidance_scale: float = 3.5
    # The diffusers release the run used, where its code allocates differently from the installed one (see
    # diffusion_trace.run_code_of): None = the installed diffusers.
    diffusers_version: str | None = None


DINOV2_BASE = ResidentModel(
    # facebook/dinov2-base config.json; AutoModel.from_pretrained without dtype loads it as stored (float32,
    # 346 MB of safetensors): transformers 5 defaults to dtype="auto", i.e. the config's dtype (float32).
    name="facebook/dinov2-base", library="transformers", class_name="Dinov2Model",
    config=dict(model_type="dinov2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                image_size=518, patch_size=14, num_channels=3, qkv_bias=True, layerscale_value=1.0,
                use_swiglu_ffn=False, layer_norm_eps=1e-6),
    dtype="float32",
)
QWEN3_4B_TEXT_ENCODER = ResidentModel(
    name="Qwen3-4B (FLUX.2-klein-4B text encoder)", library="transformers", class_name="Qwen3ForCausalLM",
    registry_name="qwen3-4b", dtype="bfloat16",
)
FLUX2_VAE = ResidentModel(
    # AutoencoderKLFlux2 defaults: 4 blocks (128, 256, 512, 512), 32 latent channels, batch-norm statistics
    name="FLUX.2 VAE", library="diffusers", class_name="AutoencoderKLFlux2", config={}, dtype="bfloat16",
)


def peft_image_suite(training_params: dict | None = None, *, images: int = 14,
                     diffusers_version: str | None = None) -> DenoiserProgram:
    """The PEFT image-generation suite's run (method_comparison/image-gen, FLUX.2-klein-base-4B, NVIDIA L40S):
    `training_params` is default_training_params.json updated by the experiment's training_params.json (the
    result JSON's run_info.train_config); `diffusers_version` the one the run used (meta_info.package_info)."""
    params = dict(training_params or {})
    optimizer_kwargs = params.get("optimizer_kwargs") or {}
    batch = int(params.get("batch_size", 2))
    return DenoiserProgram(
        learning_rate=float(optimizer_kwargs.get("lr", 1e-4)),
        weight_decay=float(optimizer_kwargs.get("weight_decay", 1e-2)),  # torch AdamW's default
        grad_clip=float(params.get("grad_norm_clip", 1.0)) or None,
        resident=(DINOV2_BASE,),
        precompute=Precompute(
            text_encoder=QWEN3_4B_TEXT_ENCODER, text_layers=tuple(params.get("text_encoder_out_layers", (10, 20, 30))),
            prompts=images, vae=FLUX2_VAE, images=images, batch_size=batch,
        ),
        cached_prompts=images,
        cached_latents=images,
        index_rows=images * int(params.get("repeats", 1000)),
        evaluations=True,
        baseline=True,
        cublas_workspace=cublas_workspace_bytes((8, 9)),  # L40S: Ada, sm_89
        gpu="NVIDIA L40S",
        guidance_scale=float(params.get("guidance_scale", 3.5)),
        diffusers_version=diffusers_version,
    )


# ------------------------------------------------------------------------------------------ public entry


def estimate_denoiser(arch: Architecture, peft_config: Any, shape: TrainingShape, exact: bool = False, *,
                      program: DenoiserProgram | None = None) -> MemoryEstimate:
    """Estimate peak allocated and reserved GPU memory of training the denoiser `arch` with `peft_config`
    (None: full fine-tuning) at `shape`. `program` describes the rest of the run (default: a plain loop)."""
    denoiser = arch.denoiser
    if denoiser is None:
        raise PeftpickError(f"{arch.name} is not a diffusion denoiser", "use peftpick.estimator.estimate_architecture")
    if denoiser.family not in FAMILIES:
        raise PeftpickError(f"no memory model for the {denoiser.family!r} family of denoisers yet",
                            f"families with one: {', '.join(FAMILIES)}")
    program = program or DenoiserProgram()
    peft_type = str(getattr(peft_config, "peft_type", "")).split(".")[-1] if peft_config is not None else ""
    if peft_type in NOT_ESTIMABLE:
        raise PeftpickError(f"cannot estimate the memory of {peft_type} on the meta device: {NOT_ESTIMABLE[peft_type]}",
                            "measure it on the GPU (a probe), or estimate a LoRA of similar size instead")
    if shape.optimizer == "lora-fa" and peft_type != "LORA":
        raise PeftpickError("the LoRA-FA optimizer needs a LoRA adapter",
                            "pass a LoRA adapter (--method lora) or use another --optimizer (adamw, adamw-8bit, sgd, ...)")
    from peftpick.estimator import _quiet
    from peftpick.estimator.diffusion_trace import trace_program

    with _quiet():
        result = trace_program(arch, peft_config, shape, program, exact=exact)
    estimate = MemoryEstimate(
        peak_allocated_bytes=result.peak_allocated,
        peak_reserved_bytes=result.peak_reserved,
        breakdown=result.breakdown,
        trainable_params=result.trainable,
        total_params=result.total,
        adapter_file_bytes=result.saved_bytes,
        shape=shape,
        assumptions=_assumptions(arch, shape, program, result) + _method_notes(peft_config),
    )
    if shape.quant == "none":
        return estimate
    from peftpick.estimator import quantized

    return quantized.modelled(estimate, arch, "the denoiser trace builds its base unquantized")


def geometry(denoiser: Denoiser, shape: TrainingShape) -> dict[str, int]:
    """Latent and token geometry of one sample: latent height/width (and frames), image tokens."""
    resolution = shape.resolution or denoiser.default_resolution
    height = width = resolution // denoiser.vae_scale
    frames = 0
    if denoiser.vae_temporal:
        clip = shape.frames or denoiser.default_frames or 1
        frames = 1 + (clip - 1) // denoiser.vae_temporal
    tokens = (height // denoiser.patch) * (width // denoiser.patch) * max(frames, 1)
    return {"resolution": resolution, "height": height, "width": width, "frames": frames, "tokens": tokens}


def _method_notes(peft_config: Any) -> tuple[str, ...]:
    """What the trace stands in for, for a method whose set-up needs the weights' values (the image suite wraps
    the denoiser on the CPU, then moves it to the GPU)."""
    from peftpick.estimator.estimable import peft_type_of

    if peft_type_of(peft_config) == "FROD":
        from peftpick.estimator import frod

        return frod.notes(peft_config, moved_after_wrapping=True)
    return ()


def _assumptions(arch: Architecture, shape: TrainingShape, program: DenoiserProgram, result) -> tuple[str, ...]:
    d = arch.denoiser
    g = geometry(d, shape)
    video = f", {shape.frames or d.default_frames} frames ({g['frames']} latent frames)" if d.vae_temporal else ""
    notes = [
        f"one CUDA GPU ({program.gpu}) with PyTorch's caching allocator (default settings); figures are bytes as torch.cuda reports them",
        f"{shape.dtype} denoiser weights; adapter weights in float32 (PEFT autocast_adapter_dtype=True)",
        f"batch {shape.batch_size} at {g['resolution']} px{video}: {g['tokens']} latent tokens and {d.text_len} text tokens per sample",
        "diffusers' attention processors call SDPA, run as a fused (flash / cuDNN) kernel",
        f"{'flow-matching' if d.objective == 'flow' else d.objective + '-prediction'} loss on model_pred.float()",
        "optimizer: " + {"lora-fa": "PEFT's LoRA-FA optimizer", "adamw": "torch AdamW (multi-tensor)"}.get(
            shape.optimizer, shape.optimizer + " (estimator.optimizers)")
        + (f", gradients clipped to norm {program.grad_clip}" if program.grad_clip else ""),
        "gradient checkpointing " + ("on (diffusers enable_gradient_checkpointing, non-reentrant)" if shape.gradient_checkpointing else "off"),
        "loop variables (inputs, noise, prediction, loss) live until the next step rebinds them; gradients until zero_grad at the next step's start",
        ("every transformer block traced" if not result.lengthened else
         "a few blocks of each kind traced, their allocations repeated to the full depth"),
        "cuBLAS workspace: one per thread (forward and autograd), "
        f"{program.cublas_workspace / 2**20:.3g} MiB each; buffers kernels allocate inside a call: cuFFT work areas of "
        "2-D/3-D transforms and cuBLAS's copies of badly strided matmul operands modelled, cuDNN convolution "
        "workspaces not",
    ]
    if shape.cached_inputs:
        notes.append("text embeddings and latents computed beforehand (no text encoder or VAE on the GPU during training)")
    else:
        names = ", ".join(name for name, _ in d.text_encoders) or "text encoders"
        notes.append(f"text encoders ({names}) and VAE resident in {shape.dtype} during training: their weights are "
                     "modelled as resident bytes from the parameter counts, not traced; their per-step activations are not modelled")
    for model in program.resident:
        notes.append(f"{model.name} resident on the GPU in {model.dtype} (moved there before training)")
    if program.precompute is not None:
        p = program.precompute
        notes.append(f"caches made on the GPU before training: {p.prompts} prompts through {p.text_encoder.name}, "
                     f"{p.images} images through the {p.vae.name} in batches of {p.batch_size} (traced; the encoders "
                     "are moved back to the CPU, their freed segments released by empty_cache)")
    if program.evaluations:
        notes.append("empty_cache() and a peak reset before training and after every evaluation; peak over the "
                     "first stretch of steps (optimizer state appears) and one after an evaluation")
    else:
        notes.append("peak over 5 optimizer steps (optimizer state appears at the first)")
    if program.baseline:
        notes.append("reserved bytes before anything was loaded (a Linear(1, 1) moved to the GPU) subtracted")
    return tuple(notes)
