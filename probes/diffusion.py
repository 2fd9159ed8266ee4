"""Probes of diffusion denoisers (diffusers models): the `ProbeProgram` of Workload.DENOISER and the inputs of one
training step.

A denoiser probe builds the denoiser (pretrained weights from a diffusers folder or hub id, `subfolder`
"transformer" or "unet"; or random weights from `Architecture.config`), wraps it with the candidate's PEFT config
(adapter weights in float32, PEFT's autocast_adapter_dtype), and trains the family's own objective on random
inputs of the setting's shapes, as the PEFT image suite's training step does with cached inputs:

    flow matching:  noisy = (1 - sigma) * latents + sigma * noise, target = noise - latents
    noise (eps):    noisy = DDPM add_noise(latents, noise, t),     target = noise
    v-prediction:   noisy = DDPM add_noise(latents, noise, t),     target = DDPM velocity(latents, noise, t)
    loss = mse(prediction.float(), target.float())

Latents come at the setting's resolution (and frames), in the layout the denoiser takes (FLUX / Qwen-Image / LTX:
packed tokens; SD3 / SDXL / CogView4 / Sana: [B, C, h, w]; Wan / HunyuanVideo: [B, C, F, h, w]), with the text
embeddings [B, text_len, text_dim] and what else the family's forward takes (pooled embeddings, SDXL's time ids,
FLUX's position ids, a guidance scale). `denoiser_inputs` builds them for any device, the meta device included.

Every optimizer step trains on the same random batch (latents, text embeddings, noise and timesteps drawn once
from the job's seed): the loss then says whether and how fast a method fits a batch, never image quality, and
the probe's notes say so. The user's images are not supported as probe data: encoding them needs the VAE and the
text encoders, which a probe does not load.

Nothing heavy is imported at module level: the parent uses the first half of the program (no torch needed until a
parameter count on the CPU), the worker the second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.probes.job import ProbeJob, ProbeProgram
from peftpick.types import Architecture, Denoiser, TrainingShape, Workload

NO_QUALITY_NOTE = "random latents and text embeddings: the loss carries no quality signal"
DATA_DESCRIPTION = (f"{NO_QUALITY_NOTE} (one batch of the training shapes, drawn once and trained on at every "
                    "step: the loss slope only shows whether a method fits it)")
DATA_IDENTITY = "denoiser-random-batch-v1"  # changes when the inputs change meaning (part of every cache key)
SUPPORTED_DATA = ("none: denoiser probes train on random latents and text embeddings of the training shapes "
                  "(encoding images needs the model's VAE and text encoders, which a probe does not load)")
# The SDXL scheduler's noise schedule (scheduler/scheduler_config.json of stable-diffusion-xl-base-1.0), used for
# the noise-prediction and v-prediction families.
DDPM_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear"}
GUIDANCE_SCALE = {"flux": 3.5, "flux2": 4.0, "hunyuan-video": 6.0}  # the pipelines' defaults
DEFAULT_GUIDANCE_SCALE = 3.5
LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate (its rope_interpolation_scale)


# ============================================================================================ inputs


@dataclass(frozen=True)
class LatentGrid:
    """The latents of one sample: `height` x `width` latent pixels (per frame), `frames` latent frames (1 for
    images) and `tokens` the denoiser's image tokens (latent patches) for them."""

    height: int
    width: int
    frames: int
    tokens: int


def latent_grid(denoiser: Denoiser, resolution: int, frames: int | None = None) -> LatentGrid:
    side = resolution // denoiser.vae_scale
    latent_frames = 1 + (frames - 1) // denoiser.vae_temporal if denoiser.vae_temporal and frames else 1
    patches = (side // denoiser.patch) ** 2
    return LatentGrid(height=side, width=side, frames=latent_frames, tokens=patches * latent_frames)


@dataclass(frozen=True)
class _Family:
    layout: str  # "packed" [B, S, C*p*p], "image" [B, C, h, w], "video" [B, C, F, h, w], "packed-video" [B, S, C]
    timestep_scale: float  # what the forward's `timestep` is per unit of sigma (1: the model multiplies by 1000)
    conditioning: Callable[..., dict[str, Any]]  # the family's other forward arguments


def _text(state: _State) -> dict[str, Any]:
    return {"encoder_hidden_states": state.text}


def _flux2(state: _State) -> dict[str, Any]:
    import torch

    grid, batch, device = state.grid, state.batch, state.device
    side = grid.height // state.denoiser.patch
    coords = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    text_coords = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                       torch.arange(state.text.shape[1]))
    return {"encoder_hidden_states": state.text,
            "img_ids": coords.unsqueeze(0).expand(batch, -1, -1).to(device),
            "txt_ids": text_coords.unsqueeze(0).expand(batch, -1, -1).to(device),
            **state.guidance()}


def _flux(state: _State) -> dict[str, Any]:
    import torch

    side = state.grid.height // state.denoiser.patch
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return {"encoder_hidden_states": state.text, "pooled_projections": state.pooled,
            "img_ids": ids.reshape(side * side, 3).to(state.device, state.dtype),
            "txt_ids": torch.zeros(state.text.shape[1], 3, device=state.device, dtype=state.dtype),
            **state.guidance()}


def _qwen_image(state: _State) -> dict[str, Any]:
    import torch

    side = state.grid.height // state.denoiser.patch
    return {"encoder_hidden_states": state.text,
            "encoder_hidden_states_mask": torch.ones(state.batch, state.text.shape[1], dtype=torch.long,
                                                     device=state.device),
            "img_shapes": [[(1, side, side)]] * state.batch, **state.guidance()}


def _sd3(state: _State) -> dict[str, Any]:
    return {"encoder_hidden_states": state.text, "pooled_projections": state.pooled}


def _sdxl(state: _State) -> dict[str, Any]:
    import torch

    # original size, crop top-left, target size: a square image trained uncropped (SDXL's micro-conditioning)
    size = float(state.resolution)
    values = [size, size, 0.0, 0.0, size, size][: state.denoiser.added_time_ids or 6]
    time_ids = torch.tensor([values] * state.batch, device=state.device, dtype=state.dtype)
    return {"encoder_hidden_states": state.text,
            "added_cond_kwargs": {"text_embeds": state.pooled, "time_ids": time_ids}}


def _masked_text(state: _State) -> dict[str, Any]:
    import torch

    return {"encoder_hidden_states": state.text,
            "encoder_attention_mask": torch.ones(state.batch, state.text.shape[1], device=state.device,
                                                 dtype=state.dtype)}


def _hunyuan_video(state: _State) -> dict[str, Any]:
    import torch

    inputs = {**_masked_text(state), "pooled_projections": state.pooled}
    if state.wants_guidance:  # the pipeline passes guidance x 1000 (the model does not scale it)
        inputs["guidance"] = torch.full((state.batch,), state.guidance_scale * 1000.0, device=state.device,
                                        dtype=state.dtype)
    return inputs


def _ltx_video(state: _State) -> dict[str, Any]:
    denoiser, grid = state.denoiser, state.grid
    return {**_masked_text(state), "num_frames": grid.frames, "height": grid.height // denoiser.patch,
            "width": grid.width // denoiser.patch,
            "rope_interpolation_scale": (denoiser.vae_temporal / LTX_FRAME_RATE, denoiser.vae_scale,
                                         denoiser.vae_scale)}


def _cogview4(state: _State) -> dict[str, Any]:
    import torch

    size = torch.tensor([[float(state.resolution)] * 2] * state.batch, device=state.device, dtype=state.dtype)
    return {"encoder_hidden_states": state.text, "original_size": size, "target_size": size,
            "crop_coords": torch.zeros_like(size)}


FAMILIES: Mapping[str, _Family] = {
    "flux2": _Family("packed", 1.0, _flux2),
    "flux": _Family("packed", 1.0, _flux),
    "qwen-image": _Family("packed", 1.0, _qwen_image),
    "sd3": _Family("image", 1000.0, _sd3),
    "sdxl": _Family("image", 1.0, _sdxl),  # noise prediction: integer DDPM timesteps, not sigmas
    "cogview4": _Family("image", 1000.0, _cogview4),
    "sana": _Family("image", 1000.0, _masked_text),
    "wan": _Family("video", 1000.0, _text),
    "hunyuan-video": _Family("video", 1000.0, _hunyuan_video),
    "ltx-video": _Family("packed-video", 1000.0, _ltx_video),
}


def family_of(arch: Architecture) -> _Family:
    denoiser = _denoiser(arch)
    family = FAMILIES.get(denoiser.family)
    if family is None:
        raise PeftpickError(f"peftpick cannot build the training inputs of {arch.name} (denoiser family "
                            f"{denoiser.family!r})", f"probe a model of one of: {', '.join(FAMILIES)}")
    return family


@dataclass
class _State:
    """What the families' builders read: the sample's grid and its conditioning, on the device."""

    arch: Architecture
    denoiser: Denoiser
    grid: LatentGrid
    resolution: int
    batch: int
    device: Any
    dtype: Any
    text: Any
    pooled: Any

    @property
    def wants_guidance(self) -> bool:
        return bool(self.arch.config.get("guidance_embeds", self.denoiser.guidance))

    @property
    def guidance_scale(self) -> float:
        return GUIDANCE_SCALE.get(self.denoiser.family, DEFAULT_GUIDANCE_SCALE)

    def guidance(self) -> dict[str, Any]:
        """FLUX's guidance argument: the scale itself (the model multiplies by 1000), or None without one."""
        import torch

        if not self.wants_guidance:
            return {"guidance": None}
        return {"guidance": torch.full((self.batch,), self.guidance_scale, device=self.device, dtype=torch.float32)}


def _denoiser(arch: Architecture) -> Denoiser:
    if arch.denoiser is None:
        raise PeftpickError(f"{arch.name} is not a diffusion denoiser", "probe it as a language model")
    return arch.denoiser


def latent_shape(arch: Architecture, batch: int, grid: LatentGrid) -> tuple[int, ...]:
    """The shape of a batch of latents as the denoiser takes them (its `hidden_states` / `sample`)."""
    denoiser = _denoiser(arch)
    layout = family_of(arch).layout
    in_channels = arch.config.get("in_channels")
    patch = denoiser.patch
    if layout == "packed":
        return batch, (grid.height // patch) * (grid.width // patch), int(in_channels or
                                                                          denoiser.latent_channels * patch * patch)
    if layout == "packed-video":
        return (batch, grid.frames * (grid.height // patch) * (grid.width // patch),
                int(in_channels or denoiser.latent_channels * patch * patch))
    channels = int(in_channels or denoiser.latent_channels)
    if layout == "video":
        return batch, channels, grid.frames, grid.height, grid.width
    return batch, channels, grid.height, grid.width


@dataclass(frozen=True)
class DenoiserSamples:
    """A batch of training samples: clean latents and conditioning (what cached inputs hold), the noise and the
    noise level each sample is trained at. `level`: sigma in (0, 1) for flow matching, a DDPM timestep else."""

    latents: Any
    text: Any
    pooled: Any | None
    noise: Any
    level: Any

    def rows(self, index: Any) -> DenoiserSamples:
        pick = (lambda tensor: None if tensor is None else tensor[index])
        return DenoiserSamples(pick(self.latents), pick(self.text), pick(self.pooled), pick(self.noise),
                               pick(self.level))

    def to(self, device: Any, dtype: Any) -> DenoiserSamples:
        move = (lambda tensor: None if tensor is None else tensor.to(device=device, dtype=dtype))
        return DenoiserSamples(move(self.latents), move(self.text), move(self.pooled), move(self.noise),
                               self.level.to(device))


def random_samples(arch: Architecture, batch: int, resolution: int, frames: int | None = None, *,
                   device: Any = "cpu", dtype: Any = None, generator: Any = None) -> DenoiserSamples:
    """`batch` random samples: latents ~ N(0, 1) in the denoiser's layout, text embeddings [batch, text_len,
    text_dim] (and pooled [batch, pooled_dim]), noise, and a noise level per sample (flow: sigma ~ U(0, 1);
    noise / v-prediction: a DDPM timestep, uniform). Float32 unless `dtype`; no generator on the meta device."""
    import torch

    denoiser = _denoiser(arch)
    dtype = dtype or torch.float32
    grid = latent_grid(denoiser, resolution, frames)
    shape = latent_shape(arch, batch, grid)
    options = {"device": device, "dtype": dtype, "generator": generator}
    latents = torch.randn(shape, **options)
    text = torch.randn(batch, denoiser.text_len, denoiser.text_dim, **options)
    pooled = torch.randn(batch, denoiser.pooled_dim, **options) if denoiser.pooled_dim else None
    noise = torch.randn(shape, **options)
    if denoiser.objective == "flow":
        level = torch.rand(batch, device=device, generator=generator)
    else:
        level = torch.randint(0, DDPM_SCHEDULE["num_train_timesteps"], (batch,), device=device, generator=generator)
    return DenoiserSamples(latents, text, pooled, noise, level)


@dataclass(frozen=True)
class DenoiserInputs:
    """One micro-batch: the forward's keyword arguments (`return_dict=False` included) and the target its
    prediction is compared with, in the prediction's layout."""

    kwargs: dict[str, Any]
    target: Any


def training_inputs(arch: Architecture, samples: DenoiserSamples, resolution: int, frames: int | None = None
                    ) -> DenoiserInputs:
    """The family's forward arguments and target for `samples` (already on the device, in the model's dtype)."""
    denoiser = _denoiser(arch)
    family = family_of(arch)
    if denoiser.pooled_dim and samples.pooled is None:
        raise ValueError(f"{arch.name} takes pooled text embeddings, and the samples have none")
    latents, noise, level = samples.latents, samples.noise, samples.level
    batch = latents.shape[0]
    device, dtype = latents.device, latents.dtype
    expand = (-1,) + (1,) * (latents.ndim - 1)
    if denoiser.objective == "flow":
        sigma = level.to(dtype).view(expand)
        noisy = (1.0 - sigma) * latents + sigma * noise
        target = noise - latents
        timestep = level.to(dtype) * family.timestep_scale
    else:
        alphas = _ddpm_alphas_cumprod().to(device)[level].view(expand)
        noisy = (alphas.sqrt() * latents.float() + (1 - alphas).sqrt() * noise.float()).to(dtype)
        if denoiser.objective == "epsilon":
            target = noise
        else:  # v-prediction: DDPMScheduler.get_velocity
            target = (alphas.sqrt() * noise.float() - (1 - alphas).sqrt() * latents.float()).to(dtype)
        timestep = level
    state = _State(arch, denoiser, latent_grid(denoiser, resolution, frames), resolution, batch, device, dtype,
                   samples.text, samples.pooled)
    first = "sample" if denoiser.diffusers_class.startswith("UNet") else "hidden_states"
    kwargs = {first: noisy, "timestep": timestep, **family.conditioning(state), "return_dict": False}
    return DenoiserInputs(kwargs, target)


def denoiser_inputs(arch: Architecture, batch: int, resolution: int, frames: int | None = None, *,
                    device: Any = "cpu", dtype: Any = None, generator: Any = None) -> DenoiserInputs:
    """Random inputs of one training micro-batch for `arch` (see `random_samples` and `training_inputs`): what the
    probe trains on, and what a memory estimate on the meta device can feed the same forward."""
    samples = random_samples(arch, batch, resolution, frames, device=device, dtype=dtype, generator=generator)
    return training_inputs(arch, samples, resolution, frames)


def denoiser_loss(prediction: Any, target: Any) -> Any:
    """mse(prediction.float(), target.float()); a prediction with twice the target's channels (a learned variance,
    as some Sana / PixArt checkpoints have) is compared on its first half."""
    import torch

    if prediction.shape != target.shape:
        axis = -1 if prediction.ndim == 3 else 1  # packed tokens carry channels last
        if prediction.shape[axis] == 2 * target.shape[axis]:
            prediction = prediction.narrow(axis, 0, target.shape[axis])
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def _ddpm_alphas_cumprod() -> Any:
    """DDPMScheduler(**DDPM_SCHEDULE).alphas_cumprod, without building a scheduler."""
    import torch

    steps = DDPM_SCHEDULE["num_train_timesteps"]
    betas = torch.linspace(DDPM_SCHEDULE["beta_start"] ** 0.5, DDPM_SCHEDULE["beta_end"] ** 0.5, steps,
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ============================================================================================ models


def subfolder_of(denoiser: Denoiser) -> str:
    """Where a diffusers pipeline folder keeps the denoiser."""
    return "unet" if denoiser.diffusers_class.startswith("UNet") else "transformer"


def denoiser_class(arch: Architecture) -> Any:
    import diffusers

    name = _denoiser(arch).diffusers_class
    try:
        return getattr(diffusers, name)
    except AttributeError:
        raise PeftpickError(f"the installed diffusers {diffusers.__version__} has no {name}",
                            "upgrade diffusers (pip install -U diffusers)") from None


def build_random_denoiser(arch: Architecture, device: Any, dtype: Any) -> Any:
    """The denoiser of `arch.config` with random weights, built on `device` in `dtype`.

    The weights are made in `dtype` (torch's default dtype during the build, as transformers' from_config(dtype=...)
    does), not made in float32 and cast afterwards as knowledge.denoisers.build_denoiser does on a real device:
    that would need twice the weights' memory on the GPU while building. The class's `_keep_in_fp32_modules` are
    then cast to float32, as diffusers' from_pretrained keeps them.
    """
    import torch

    from peftpick.knowledge.denoisers import cast_like_pretrained

    cls = denoiser_class(arch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device(device):
            model = cls.from_config(dict(arch.config))
    finally:
        torch.set_default_dtype(previous)
    cast_like_pretrained(model, dtype)
    return model


def _pretrained_location(weights: str, denoiser: Denoiser) -> dict[str, Any]:
    """from_pretrained's subfolder for `weights`: a pipeline folder or hub id keeps the denoiser in "transformer" /
    "unet"; a folder holding the denoiser's own config.json is used as it is."""
    folder = Path(weights).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        return {}
    return {"subfolder": subfolder_of(denoiser)}


def _weights_in(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("diffusion_pytorch_model*.bin"))


# ============================================================================================ the program


class DenoiserProgram(ProbeProgram):
    """The probe of a diffusion denoiser (`peftpick.probes.diffusion:denoiser_program` is its hook)."""

    workload = Workload.DENOISER
    library_names = ("torch", "transformers", "peft", "diffusers", "peftpick")
    default_methods = ("lora", "lora-r64", "dora", "oft", "ia3", "loha", "lokr", "vera")

    # -- the parent's side

    def first_shape(self, arch: Architecture, shape: TrainingShape) -> TrainingShape:
        """Fill in the model's usual resolution (and frames, for video models) and check them."""
        import dataclasses

        from peftpick.knowledge.denoisers import checked_geometry

        _denoiser(arch)
        family_of(arch)  # an unknown family fails here, before anything runs
        resolution, frames = checked_geometry(arch, shape.resolution, shape.frames)
        return dataclasses.replace(shape, resolution=resolution, frames=frames)

    def check(self, arch: Architecture, options: Any, device: str) -> None:
        if options.data is not None:
            raise PeftpickError(f"probe data {options.data} is not supported for {arch.name}, a diffusion denoiser",
                                f"leave --data out; supported: {SUPPORTED_DATA}")
        if device == "cpu":
            from peftpick.knowledge.denoisers import count_denoiser_parameters
            from peftpick.probes.runner import CPU_MAX_PARAMETERS

            parameters = count_denoiser_parameters(arch)
            if parameters > CPU_MAX_PARAMETERS:
                raise PeftpickError(
                    f"{arch.name} has {parameters / 1e9:.1f} B parameters: a probe on the CPU would take hours",
                    "probe on a machine with a CUDA GPU, or probe a smaller model on the CPU")

    def weights_source(self, arch: Architecture, random_weights: bool) -> tuple[str | None, bool]:
        if random_weights:
            return None, True
        denoiser = _denoiser(arch)
        sub = subfolder_of(denoiser)
        fix = "pass --random-weights (random_weights=True) to measure memory and speed without them"
        if arch.local_path:
            folder = Path(arch.local_path).expanduser()
            folder = folder.parent if folder.is_file() else folder
            if _weights_in(folder / sub) or ((folder / "config.json").is_file() and _weights_in(folder)):
                return str(folder), True
            raise PeftpickError(f"folder {folder} has no weights of the denoiser ({sub}/*.safetensors)",
                                f"pass the diffusers folder that holds them, or {fix}")
        if arch.hub_id:
            if _hub_weights_cached(arch.hub_id, sub):
                return arch.hub_id, True
            import os

            from peftpick.knowledge.architectures import _hub_reachable

            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
            if not offline and _hub_reachable():
                return arch.hub_id, False
            raise PeftpickError(f"the weights of {arch.hub_id} are not on this machine and the Hugging Face hub is "
                                "not reachable",
                                f"download them (`hf download {arch.hub_id} --include '{sub}/*'`) and pass the "
                                f"folder, or {fix}")
        raise PeftpickError(f"{arch.name} comes from a config, which has no weights", fix)

    def load_data(self, options: Any, settings: list[TrainingShape]) -> Any:
        from peftpick.probes.data import ProbeData

        return ProbeData(examples=(), description=DATA_DESCRIPTION, identity=DATA_IDENTITY)

    def prepare_inputs(self, run: Any) -> tuple[str, tuple[str, ...]]:
        notes = [NO_QUALITY_NOTE]  # the worker draws its inputs from the job's seed: no file
        if any(not shape.cached_inputs for shape in run.settings):
            notes.append("the settings keep the text encoders and the VAE on the GPU while training; a probe does not "
                         "load them, so add their weights to the measured peaks")
        return "", tuple(notes)

    def tokens_per_step(self, job: ProbeJob) -> int:
        """Latent image tokens (patches) per optimizer step; text tokens are not counted."""
        grid = latent_grid(_denoiser(job.architecture), job.shape.resolution or 0, job.shape.frames)
        return job.shape.batch_size * job.shape.gradient_accumulation * grid.tokens

    # -- the worker's side

    def preload(self) -> None:
        import peft  # noqa: F401
        import torch  # noqa: F401
        from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

    def build_model(self, job: ProbeJob, device: Any, dtype: Any) -> Any:
        import torch

        if device.type == "cpu":
            # The tiny gradients of a denoiser (a random UNet's especially) hold float32 denormals, which x86 CPUs
            # compute up to 100x slower (a tiny SDXL-style UNet: 2.8 s a step instead of 0.05 s); GPU kernels
            # flush them. This worker process trains one probe, so the setting is its own.
            torch.set_flush_denormal(True)
        arch = job.architecture
        if job.weights is None:
            return build_random_denoiser(arch, device, dtype)
        cls = denoiser_class(arch)
        model = cls.from_pretrained(job.weights, torch_dtype=dtype, local_files_only=job.local_files_only,
                                    **_pretrained_location(job.weights, _denoiser(arch)))
        return model.to(device)

    def enable_gradient_checkpointing(self, model: Any) -> None:
        model.enable_gradient_checkpointing()  # diffusers' default: torch.utils.checkpoint, use_reentrant=False

    def batches(self, job: ProbeJob, device: Any, dtype: Any) -> Callable[[int], DenoiserInputs]:
        import torch

        shape = job.shape
        assert shape.resolution is not None, "the parent fills in the resolution"
        generator = torch.Generator().manual_seed(job.seed)
        # one step's samples, drawn once on the CPU (the same on every device) and trained on at every step
        pool = random_samples(job.architecture, shape.effective_batch, shape.resolution, shape.frames,
                              generator=generator)
        rows = shape.effective_batch
        cursor = 0

        def next_batch(size: int) -> DenoiserInputs:
            nonlocal cursor
            index = torch.tensor([(cursor + offset) % rows for offset in range(size)])
            cursor += size
            samples = pool.rows(index).to(device, dtype)
            return training_inputs(job.architecture, samples, shape.resolution, shape.frames)

        return next_batch

    def forward(self, model: Any, batch: DenoiserInputs) -> tuple[Any, Any]:
        out = model(**batch.kwargs)
        prediction = out[0] if isinstance(out, (tuple, list)) else out.sample
        return out, denoiser_loss(prediction, batch.target)


def denoiser_program() -> DenoiserProgram:
    """The `probe_program` hook of diffusion denoisers (peftpick.workloads)."""
    return DenoiserProgram()


def _hub_weights_cached(hub_id: str, sub: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
    return any(isinstance(try_to_load_from_cache(hub_id, f"{sub}/{name}"), str) for name in names)
