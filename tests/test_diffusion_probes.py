"""Probes of diffusion denoisers on the CPU: tiny random-weight FLUX.2-style, SDXL-style UNet and Wan-style video
denoisers micro-trained with LoRA and full fine-tuning; a candidate that cannot be applied is an error result;
--data is refused; the training inputs of every family the registry knows feed their diffusers class. The GPU
check at the end (marked `gpu`) is skipped without CUDA.

FLUX.2 runs in real worker processes (the worker learns the workload from the runner and picks the denoiser
program from the job). A worker spends about 8 s of this 2-core machine's CPU importing torch, transformers, peft
and diffusers, so the SDXL, Wan and CLI probes run the same worker code (`worker.run_job`) in this process instead:
`in_process` swaps the runner's worker hand-off and nothing else. The tiny models are Architectures built here
(diffusers configs of a few ten thousand parameters), so the tests need neither the denoiser registry nor a hub
download.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import pytest

from peftpick.errors import PeftpickError
from peftpick.probes import ProbeOptions, probe_program, probe_to_estimate, run_probes
from peftpick.probes import runner as probe_runner
from peftpick.probes.cache import ProbeCache
from peftpick.probes.job import ProbeJob
from peftpick.probes.diffusion import (
    DATA_DESCRIPTION,
    NO_QUALITY_NOTE,
    DenoiserProgram,
    denoiser_inputs,
    latent_grid,
    random_samples,
    training_inputs,
)
from peftpick.probes.table import footnotes, print_probe_table
from peftpick.probes.worker import run_job
from peftpick.types import Architecture, Candidate, Denoiser, TrainingShape, Workload

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def tiny(name: str, config: dict, **denoiser) -> Architecture:
    return Architecture(name=name, model_type=denoiser["family"], hidden_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=2, head_dim=16, intermediate_size=64, vocab_size=0, tie_word_embeddings=False,
                        dtype="bfloat16", config=config, denoiser=Denoiser(**denoiser))


TEXT = {"text_dim": 32, "text_len": 8}
FLUX2 = tiny("tiny-flux2", {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                            "timestep_guidance_channels": 32, "mlp_ratio": 2.0, "axes_dims_rope": [4, 4, 4, 4],
                            "rope_theta": 2000, "guidance_embeds": False},
             family="flux2", diffusers_class="Flux2Transformer2DModel", objective="flow", latent_channels=4,
             vae_scale=8, patch=2, default_resolution=64, **TEXT)
SDXL = tiny("tiny-sdxl", {"sample_size": 8, "in_channels": 4, "out_channels": 4,
                          "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                          "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64],
                          "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": [2, 4],
                          "use_linear_projection": True, "addition_embed_type": "text_time",
                          "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
                          "transformer_layers_per_block": [1, 1]},
            family="sdxl", diffusers_class="UNet2DConditionModel", objective="epsilon", latent_channels=4,
            vae_scale=8, patch=1, pooled_dim=32, added_time_ids=6, default_resolution=64, **TEXT)
WAN = tiny("tiny-wan", {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
                        "out_channels": 4, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "num_layers": 1,
                        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
           family="wan", diffusers_class="WanTransformer3DModel", objective="flow", latent_channels=4, vae_scale=8,
           patch=2, vae_temporal=4, default_resolution=64, default_frames=5, **TEXT)
# the other families of the registry, for the input builder
OTHERS = [
    tiny("tiny-flux1-dev", {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                            "pooled_projection_dim": 24, "axes_dims_rope": [4, 4, 8], "guidance_embeds": True},
         family="flux", diffusers_class="FluxTransformer2DModel", objective="flow", latent_channels=4, vae_scale=8,
         patch=2, pooled_dim=24, guidance=True, default_resolution=64, **TEXT),
    tiny("tiny-sd3", {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1,
                      "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                      "caption_projection_dim": 32, "pooled_projection_dim": 24, "pos_embed_max_size": 16,
                      "qk_norm": "rms_norm", "dual_attention_layers": [0]},
         family="sd3", diffusers_class="SD3Transformer2DModel", objective="flow", latent_channels=4, vae_scale=8,
         patch=2, pooled_dim=24, default_resolution=64, **TEXT),
    tiny("tiny-qwen-image", {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 1,
                             "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                             "guidance_embeds": False, "axes_dims_rope": [4, 6, 6]},
         family="qwen-image", diffusers_class="QwenImageTransformer2DModel", objective="flow", latent_channels=4,
         vae_scale=8, patch=2, default_resolution=64, **TEXT),
    tiny("tiny-hunyuan-video", {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
                                "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0,
                                "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
                                "text_embed_dim": 32, "pooled_projection_dim": 24, "rope_axes_dim": [4, 6, 6]},
         family="hunyuan-video", diffusers_class="HunyuanVideoTransformer3DModel", objective="flow",
         latent_channels=4, vae_scale=8, patch=2, pooled_dim=24, guidance=True, vae_temporal=4,
         default_resolution=64, default_frames=5, **TEXT),
    tiny("tiny-ltx-video", {"in_channels": 8, "out_channels": 8, "patch_size": 1, "patch_size_t": 1,
                            "num_attention_heads": 2, "attention_head_dim": 16, "cross_attention_dim": 32,
                            "num_layers": 1, "caption_channels": 32},
         family="ltx-video", diffusers_class="LTXVideoTransformer3DModel", objective="flow", latent_channels=8,
         vae_scale=32, patch=1, vae_temporal=8, default_resolution=128, default_frames=9, **TEXT),
    tiny("tiny-cogview4", {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1,
                           "attention_head_dim": 16, "num_attention_heads": 2, "text_embed_dim": 32,
                           "time_embed_dim": 16, "condition_dim": 8, "pos_embed_max_size": 16},
         family="cogview4", diffusers_class="CogView4Transformer2DModel", objective="flow", latent_channels=4,
         vae_scale=8, patch=2, default_resolution=64, **TEXT),
    tiny("tiny-sana", {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
                       "num_layers": 1, "num_cross_attention_heads": 2, "cross_attention_head_dim": 16,
                       "cross_attention_dim": 32, "caption_channels": 32, "mlp_ratio": 2.5, "sample_size": 8,
                       "patch_size": 1},
         family="sana", diffusers_class="SanaTransformer2DModel", objective="flow", latent_channels=4, vae_scale=32,
         patch=1, default_resolution=256, **TEXT),
]

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def lora(targets=ATTENTION, method: str = "lora") -> Candidate:
    return Candidate(method=method, display_name="LoRA", peft_type="LORA", peft_config_class="LoraConfig",
                     peft_kwargs={"r": 4, "lora_alpha": 4, "target_modules": list(targets)}, learning_rate=1e-3,
                     task_type=None)


FULL = Candidate(method="full", display_name="Full fine-tuning", peft_type=None, peft_config_class=None,
                 learning_rate=1e-4, task_type=None)
BROKEN = lora(["no_such_module"], method="broken-lora")


def options(cache_path: Path, **changes) -> ProbeOptions:
    return ProbeOptions(**{"steps": 2, "batch_size": 2, "random_weights": True, "device": "cpu",
                           "cache_path": cache_path, **changes})


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache") / "probes.sqlite"


def _run_here(self, index, job, following):
    """`_ProbeRun._run_job` without a worker process: the worker's own run_job, in this process."""
    began = time.time()
    message = run_job(job, lambda **event: None)
    return probe_runner._Outcome(message, time.time() - began, dict(message.get("phases") or {}))


@contextlib.contextmanager
def in_process():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe_runner._ProbeRun, "_run_job", _run_here)
        patch.setattr(probe_runner._WorkerPool, "prestart", lambda self, count: None)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)  # a CPU probe sets it for its (worker) process; torch's default


@pytest.fixture(scope="module")
def flux2_results(cache_file: Path):
    return run_probes(FLUX2, [lora(), FULL], None, options(cache_file), progress=False)


@pytest.fixture(scope="module")
def sdxl_results(cache_file: Path):
    shapes = {"lora": TrainingShape(batch_size=2), "full": TrainingShape(batch_size=2, gradient_checkpointing=True)}
    shapes["broken-lora"] = TrainingShape(batch_size=2)
    with in_process():
        return run_probes(SDXL, [lora(), FULL, BROKEN], shapes, options(cache_file), progress=False)


def check_ok(result, tokens_per_sample: int) -> None:
    assert result.status == "ok", result.error
    assert result.device == "cpu" and result.error is None
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert result.loss_slope is not None and result.step_seconds > 0
    assert result.peak_allocated_bytes is None and result.nvml_used_bytes is None  # not measured on the CPU
    assert result.breakdown == {}
    # tokens_per_second counts the denoiser's latent image tokens (patches), not text tokens
    assert result.tokens_per_second == pytest.approx(
        result.shape.effective_batch * tokens_per_sample / result.step_seconds)
    assert result.data == DATA_DESCRIPTION and NO_QUALITY_NOTE in result.notes
    assert result.versions["diffusers"] and result.versions["peft"] and not result.from_cache
    assert {"load", "warmup", "steps"} <= set(result.phase_seconds)


# ------------------------------------------------- micro-trainings (FLUX.2 in worker processes, the others in here)


def test_flux2_lora_and_full_fine_tuning_in_worker_processes(flux2_results):
    lora_result, full = flux2_results
    for result in (lora_result, full):
        assert result.shape.resolution == 64 and result.shape.frames is None  # the model's usual resolution
        check_ok(result, tokens_per_sample=16)  # 64 px -> 8 x 8 latents -> 4 x 4 patches
    # r=4 on to_q/to_k/to_v/to_out.0 (32 -> 32) of the one double block; the single block's attention fuses them
    assert lora_result.trainable_params == 4 * 4 * (32 + 32)
    assert full.trainable_params == full.total_params == lora_result.total_params - lora_result.trainable_params


def test_flux2_table_counts_images_and_says_the_loss_is_no_quality_signal(flux2_results):
    from rich.console import Console

    console = Console(width=200, record=True)
    print_probe_table("tiny-flux2", flux2_results, console)
    text = console.export_text()
    assert "Images/s" in text and "Tokens/s" not in text and "2x64px" in text
    lines = footnotes(flux2_results)
    assert f"Data: {DATA_DESCRIPTION}." in lines  # the report's probe line carries the data description
    assert not any(line.startswith("Note: ") and NO_QUALITY_NOTE in line for line in lines)  # said once


def test_sdxl_unet_lora_checkpointed_full_fine_tuning_and_a_failing_candidate(sdxl_results, cache_file: Path):
    lora_result, full, broken = sdxl_results
    for result in (lora_result, full):
        check_ok(result, tokens_per_sample=64)  # the UNet takes 8 x 8 latents as they are
    assert full.shape.gradient_checkpointing and not lora_result.shape.gradient_checkpointing
    assert 0 < lora_result.trainable_params < full.trainable_params == full.total_params
    assert full.total_params == lora_result.total_params - lora_result.trainable_params
    # a candidate that cannot be applied (PEFT finds no such module) is an error result, the others are measured
    assert broken.status == "error" and broken.error.startswith("NoMatchingPeftModuleError: ")
    assert "no_such_module" in broken.error and broken.losses == ()
    assert any("no_such_module" in line for line in footnotes(sdxl_results))
    with ProbeCache.open(cache_file) as cache:
        assert len(cache) >= 2  # those that finished; the failure is probed again next time


def test_wan_video_probe_trains_on_clips_of_the_given_frames(cache_file: Path):
    with in_process():
        (result,) = run_probes(WAN, [lora()], None, options(cache_file, frames=9, resolution=64), progress=False)
    assert (result.shape.resolution, result.shape.frames) == (64, 9)
    check_ok(result, tokens_per_sample=3 * 16)  # 9 frames -> 3 latent frames of 4 x 4 patches


@pytest.fixture(scope="module")
def flux2_folder(tmp_path_factory) -> Path:
    """A diffusers pipeline folder (model_index.json + transformer/) with a tiny FLUX.2 denoiser's weights."""
    import json

    import diffusers

    folder = tmp_path_factory.mktemp("tiny-flux2-pipeline")
    torch.manual_seed(0)
    config = {**FLUX2.config, "in_channels": 128}  # the registry's FLUX.2 latents: 32 channels x 2 x 2
    diffusers.Flux2Transformer2DModel(**config).save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"]}))
    return folder


def test_cli_probes_a_diffusers_folder_with_its_weights(flux2_folder: Path, tmp_path: Path, monkeypatch):
    """`peftpick probe --model <diffusers folder>`: resolved by the denoiser registry, candidates from the image
    suite, the pretrained weights loaded from transformer/, the model's usual resolution (512 px)."""
    import json

    from typer.testing import CliRunner

    from peftpick.cli import app

    monkeypatch.setenv("PEFTPICK_CACHE_DIR", str(tmp_path / "cache"))
    args = ["probe", "--model", str(flux2_folder), "--methods", "lora,full", "--device", "cpu", "--steps", "2",
            "--batch-size", "1"]
    with in_process():
        first = CliRunner().invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    results = json.loads(first.stdout)["results"]
    assert [r["method"] for r in results] == ["lora", "full"] and all(r["status"] == "ok" for r in results), results
    assert all(r["shape"]["resolution"] == 512 and r["data"] == DATA_DESCRIPTION for r in results)
    assert results[0]["versions"]["diffusers"]
    refused = CliRunner().invoke(app, [*args, "--data", str(tmp_path)])
    assert refused.exit_code == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: probe data ") and "not supported" in line and "random latents" in line


# ------------------------------------------------------------------------------------------- the parent's side


def test_denoiser_inputs_are_refused_before_anything_runs(tmp_path: Path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(probe_runner, "_Worker", refuse)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG")
    (images / "a.txt").write_text("a photo of sks dog")
    with pytest.raises(PeftpickError) as refused:
        run_probes(FLUX2, [lora()], None, options(tmp_path / "c.sqlite", data=images), progress=False)
    message = str(refused.value)
    assert "\n" not in message and f"probe data {images} is not supported" in message
    assert "random latents and text embeddings" in message and "leave --data out" in message
    for bad, words in (({"resolution": 72}, r"not a multiple of tiny-flux2's latent patch \(16"),
                       ({"frames": 9}, "--frames is for video models")):
        with pytest.raises(PeftpickError, match=words):
            run_probes(FLUX2, [lora()], None, options(tmp_path / "c.sqlite", **bad), progress=False)
    with pytest.raises(PeftpickError, match="--frames 6 does not fit"):
        run_probes(WAN, [lora()], None, options(tmp_path / "c.sqlite", frames=6), progress=False)
    with pytest.raises(PeftpickError, match="comes from a config, which has no weights"):
        run_probes(FLUX2, [lora()], None, options(tmp_path / "c.sqlite", random_weights=False), progress=False)


def test_the_program_is_chosen_by_workload():
    assert isinstance(probe_program(Workload.DENOISER), DenoiserProgram)
    assert probe_program("causal-lm").workload is Workload.CAUSAL_LM
    assert probe_program(FLUX2.workload).weights_source(FLUX2, random_weights=True) == (None, True)


def test_flow_matching_inputs_follow_the_objective():
    generator = torch.Generator().manual_seed(0)
    samples = random_samples(FLUX2, 3, 64, generator=generator)
    inputs = training_inputs(FLUX2, samples, 64)
    sigma = samples.level.view(-1, 1, 1)
    assert torch.allclose(inputs.kwargs["hidden_states"], (1 - sigma) * samples.latents + sigma * samples.noise)
    assert torch.allclose(inputs.target, samples.noise - samples.latents)
    assert torch.equal(inputs.kwargs["timestep"], samples.level)  # FLUX multiplies by 1000 itself
    assert inputs.kwargs["encoder_hidden_states"].shape == (3, 8, 32)
    assert inputs.kwargs["img_ids"].shape == (3, 16, 4) and inputs.kwargs["txt_ids"].shape == (3, 8, 4)
    eps = denoiser_inputs(SDXL, 2, 64, generator=generator)
    assert eps.kwargs["sample"].shape == (2, 4, 8, 8) and eps.kwargs["timestep"].dtype == torch.int64
    assert eps.kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    assert latent_grid(WAN.denoiser, 480, 81).tokens == 21 * 30 * 30  # 81 frames -> 21 latent frames
    meta = denoiser_inputs(WAN, 2, 64, 5, device="meta", dtype=torch.bfloat16)  # what an estimate can feed
    assert meta.kwargs["hidden_states"].shape == (2, 4, 2, 8, 8) and meta.kwargs["hidden_states"].is_meta


@pytest.mark.parametrize("arch", [FLUX2, SDXL, WAN, *OTHERS], ids=lambda arch: arch.name)
def test_every_family_trains_in_bfloat16_with_a_float32_adapter(arch: Architecture):
    """The worker's side of the program for every family of the registry, in the GPU's dtype: bfloat16 weights
    (the class's float32 modules kept), a LoRA adapter in float32, one micro-batch forward and backward."""
    import peft

    program = DenoiserProgram()
    shape = program.first_shape(arch, TrainingShape(batch_size=2, dtype="bfloat16"))
    job = ProbeJob(candidate=lora(), architecture=arch, shape=shape, weights=None, device="cpu", steps=2,
                   warmup_steps=1, learning_rate=1e-3, tokens_path="")
    cpu = torch.device("cpu")
    try:
        torch.manual_seed(0)
        model = peft.get_peft_model(program.build_model(job, cpu, torch.bfloat16), lora().peft_config())
        out, loss = program.forward(model, program.batches(job, cpu, torch.bfloat16)(2))
        loss.backward()
    finally:
        torch.set_flush_denormal(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert math.isfinite(loss.item()) and loss.dtype == torch.float32
    assert trainable and all(p.dtype == torch.float32 and p.grad is not None for p in trainable)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} >= {torch.bfloat16}


# ------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_denoiser_probe_measures_memory_on_the_gpu(tmp_path: Path):
    lora_result, full = run_probes(FLUX2, [lora(), FULL], None,
                                   options(tmp_path / "c.sqlite", device="cuda", resolution=256), progress=False)
    for result in (lora_result, full):
        assert result.status == "ok", result.error
        assert result.shape.dtype == "bfloat16" and result.device == torch.cuda.get_device_name(0)
        assert 0 < result.peak_allocated_bytes <= result.peak_reserved_bytes
        assert sum(result.breakdown.values()) == result.peak_allocated_bytes
        assert all(math.isfinite(loss) for loss in result.losses)
        estimate = probe_to_estimate(result)
        assert "256 px images per micro-batch" in estimate.assumptions[0]
    # LoRA's adapter is float32 (PEFT's autocast_adapter_dtype); full fine-tuning keeps AdamW state of every weight
    assert lora_result.breakdown["adapter"] == 4 * lora_result.trainable_params
    assert full.breakdown["optimizer"] >= 2 * 2 * full.trainable_params
