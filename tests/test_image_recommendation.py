"""Recommendations for image and video models: the denoiser workload through every stage.

The memory estimate is replaced by a stand-in proportional to the trainable parameters and the latent tokens
(the real one has its own tests, tests/test_diffusion_estimator.py), so these tests check the flow: model
resolution, candidates from the image suite's runs, the image tools' verdicts, drift on the Pareto front, the
report's words and the diffusers snippet, and the bad input that is specific to images.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import peftpick
from peftpick.errors import PeftpickError
from peftpick.types import GIB, MemoryEstimate, Workload


def _stand_in_estimate(arch, peft_config, shape):
    """Bytes that grow with the latent tokens and the batch, less with checkpointing; full FT much larger."""
    denoiser = arch.denoiser
    side = shape.resolution // (denoiser.vae_scale * denoiser.patch)
    tokens = side * side * shape.batch_size
    activations = int(tokens * (0.3 if shape.gradient_checkpointing else 1.0) * 1_000_000)
    weights = 8 * GIB if peft_config is not None else 36 * GIB
    adapter = 300 << 20 if peft_config is not None else 0
    peak = weights + adapter + activations
    return MemoryEstimate(peak, int(peak * 1.05), {"weights": weights, "adapter": adapter, "activations": activations},
                          38_000_000 if peft_config is not None else 3_875_544_576, 3_875_544_576, shape,
                          adapter_file_bytes=adapter // 4 or 7 * GIB)


@pytest.fixture
def stand_in(monkeypatch):
    import peftpick.estimator.diffusion as diffusion

    monkeypatch.setattr(diffusion, "estimate_denoiser", _stand_in_estimate)


def test_flux_on_comfyui_is_recommended_with_image_evidence(stand_in):
    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=12, serve="comfyui", probe=False)
    assert rec.architecture.workload is Workload.DENOISER and rec.request.batch_size == 2
    assert rec.request.resolution == rec.architecture.denoiser.default_resolution  # the model's usual
    assert rec.ranked, rec.excluded
    methods = {r.method for r in rec.ranked} | {e.method for e in rec.excluded}
    assert {"lora", "lora-r64", "oft", "loha", "lokr"} <= methods and "rslora" not in methods
    evidence = [r.evidence for r in rec.ranked if r.evidence is not None]
    assert evidence and all(e.benchmark == "image-gen" and "DINO" in e.metric for e in evidence)
    assert all(r.drift is not None for r in rec.ranked if r.evidence is not None)
    assert "FLUX.2-klein-base-4B on image-gen" in rec.verdict
    side = rec.request.resolution
    assert any(f"{side} x {side} pixels" in a and "latent tokens" in a for a in rec.assumptions)
    assert any(a.startswith("drift") for a in rec.assumptions)
    for ranked in rec.ranked:
        assert ranked.candidate.task_type is None  # a bare diffusers module for PEFT
        assert ranked.serving.route in ("native", "convert", "merge"), ranked.serving
        assert "ComfyUI" in ranked.serving.reason or "comfyui" in ranked.serving.reason.lower()


def test_defaults_follow_the_model_kind(stand_in):
    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=24, probe=False, methods=["lora"])
    assert rec.request.serve.value == "diffusers" and rec.request.batch_size == 2


def test_resolution_and_batch_change_the_plan(stand_in):
    small = peftpick.recommend("sdxl-base-1.0", vram_gb=16, serve="forge", resolution=512, batch_size=1,
                               probe=False, methods=["lora"])
    large = peftpick.recommend("sdxl-base-1.0", vram_gb=16, serve="forge", resolution=1024, batch_size=1,
                               probe=False, methods=["lora"])
    assert small.best.estimate.peak_reserved_bytes < large.best.estimate.peak_reserved_bytes
    assert small.best.estimate.shape.resolution == 512 and small.best.estimate.shape.batch_size == 1


def test_video_frames(stand_in):
    rec = peftpick.recommend("wan2.1-t2v-1.3b", vram_gb=24, frames=33, probe=False, methods=["lora"])
    assert rec.request.frames == 33 and rec.best.estimate.shape.frames == 33
    assert any("33 frames (9 latent frames)" in a for a in rec.assumptions)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "flux.2-klein-4b", "serve": "vllm"}, "--serve vllm is for causal language models"),
    ({"model": "smollm2-135m", "serve": "comfyui"}, "--serve comfyui is for diffusion denoisers"),
    ({"model": "flux.2-klein-4b", "resolution": 1000}, "not a multiple of flux.2-klein-4b's latent patch (16"),
    ({"model": "flux.2-klein-4b", "frames": 16}, "--frames is for video models"),
    ({"model": "wan2.1-t2v-1.3b", "frames": 82}, "packs 4 frames per latent frame"),
    ({"model": "smollm2-135m", "resolution": 512}, "--resolution is for image and video models"),
])
def test_image_specific_bad_input(stand_in, kwargs, message):
    with pytest.raises(PeftpickError, match=message.replace("(", r"\(")) as error:
        peftpick.recommend(vram_gb=16, probe=False, **kwargs)
    assert "\n" not in str(error.value)


def test_a_method_without_an_image_run_is_excluded_with_the_reason(stand_in):
    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=24, probe=False, methods=["lora", "rslora"])
    (rslora,) = [e for e in rec.excluded if e.method == "rslora"]
    assert "no settings for diffusion denoisers" in rslora.reason


def test_drift_is_a_pareto_axis(stand_in):
    from peftpick.recommender.ranking import axis_values

    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=24, serve="diffusers", probe=False,
                             methods=["lora", "ia3", "oft"])
    ia3 = next(r for r in rec.ranked if r.method == "ia3")
    lora = next(r for r in rec.ranked if r.method == "lora")
    assert ia3.drift < lora.drift  # IA3 drifts least in the suite (0.229 vs 0.262)
    assert "drift 0.229" in ia3.reason


# ------------------------------------------------------------------------------------------ snippet


@pytest.fixture
def tiny_flux2_folder(tmp_path: Path) -> Path:
    """A diffusers folder with a tiny FLUX.2 transformer (random weights)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                    timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
    folder = tmp_path / "tiny-flux2"
    model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                          "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    return folder


def test_diffusers_snippet_builds_the_adapter_on_the_local_model(stand_in, tiny_flux2_folder: Path, monkeypatch,
                                                                  tmp_path: Path):
    from peftpick.report.snippet import snippet_for

    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=24, serve="diffusers", probe=False, methods=["lora"])
    # the same recommendation for the local tiny folder: the snippet loads it
    local = dataclasses.replace(rec, architecture=dataclasses.replace(rec.architecture,
                                                                      local_path=str(tiny_flux2_folder)))
    snippet = snippet_for(local.best, local)
    assert "from diffusers import Flux2Transformer2DModel" in snippet and 'subfolder="transformer"' in snippet
    assert "LoraConfig(" in snippet and "task_type" not in snippet.split("LoraConfig(")[1].split(")")[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "<snippet>", "exec"), namespace)
    model = namespace["model"]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_report_and_json_for_an_image_model(stand_in):
    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=12, serve="comfyui", probe=False, methods=["lora", "oft"])
    text = rec.report("markdown")
    assert "flux.2-klein-4b" in text and "DINO" in text
    # the drift column shows each run's figure (the suite's OFT run: 0.262), and the order names five axes
    assert "Drift (lower keeps more)" in text and "0.262 (run)" in text and "adapter size and drift" in text
    lm = peftpick.recommend("smollm2-135m", vram_gb=8, serve="vllm", probe=False, methods=["lora"]).report("markdown")
    assert "Drift" not in lm
    data = rec.to_dict()
    assert data["request"]["serve"] == "comfyui"
    assert all("drift" in entry for entry in data["ranked"])
    json.dumps(data, allow_nan=False)


def test_full_fine_tuning_that_cannot_fit_is_not_traced(monkeypatch):
    """FLUX.2-klein-4B's 3.88 B bf16 weights, gradients and 8-bit AdamW's two moments alone are 21.7 GiB: on 12 GiB
    full fine-tuning is excluded from that lower bound without an estimate; on 40 GiB it is estimated as before."""
    import peftpick.estimator.diffusion as diffusion

    traced = []

    def recording(arch, peft_config, shape):
        traced.append(peft_config is None)
        return _stand_in_estimate(arch, peft_config, shape)

    monkeypatch.setattr(diffusion, "estimate_denoiser", recording)
    rec = peftpick.recommend("flux.2-klein-4b", vram_gb=12, serve="diffusers", probe=False, methods=["lora", "full"])
    assert traced and not any(traced)
    full = next(e for e in rec.excluded if e.method == "full")
    assert full.constraint == "memory"
    assert ("needs more than 22.3 GiB whatever the micro-batch (its weights, gradients and 8-bit AdamW's two moments "
            "alone, not traced)") \
        in full.reason
    traced.clear()
    peftpick.recommend("flux.2-klein-4b", vram_gb=40, serve="diffusers", probe=False, methods=["lora", "full"])
    assert any(traced)


def test_estimate_command_traces_a_denoiser_as_the_recommendation_does():
    """`peftpick estimate` on an image model goes through the denoiser's estimator, not the language-model one
    (which refused it as an unknown transformers model_type)."""
    from typer.testing import CliRunner

    from peftpick.cli import app

    result = CliRunner().invoke(app, ["estimate", "--model", "flux.2-klein-4b", "--method", "lora", "--batch-size", "2",
                                      "--grad-ckpt", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    frozen = data["total_params"] - data["trainable_params"]
    assert data["breakdown"]["weights"] == 2 * frozen  # the bf16 denoiser, without the float32 adapter
    assert data["breakdown"]["adapter"] == 4 * data["trainable_params"]
    assert data["breakdown"]["logits/loss"] == 0 and data["breakdown"]["activations"] > 0
