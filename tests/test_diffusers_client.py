"""The real-client test: adapters trained with PEFT on tiny diffusers denoisers, written by
`peftpick.adapters.formats`, loaded back by diffusers' own loaders (diffusers 0.42.1 when written).

Tiny FLUX.1 / FLUX.2-klein pipelines and an SDXL-like UNet are built from configs on the CPU (random weights, no hub
access). Each adapter's zero-initialised factor is moved off its
init, so "loads" means the output changes versus the base and equals the PEFT-wrapped model's output.
"""

from __future__ import annotations

import warnings

import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
from peft import LoKrConfig, LoraConfig, get_peft_model  # noqa: E402

from peftpick.adapters.formats import to_diffusers_format, to_kohya_format  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
ATOL = 1e-5

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out"]
FLUX2_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "linear_in", "linear_out", "to_qkv_mlp_proj"]
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _quiet():
    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _move_off_init(model) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(s in name for s in ("lora_B", "lokr_w", "hada_w", "lora_magnitude")):
                param.add_(torch.randn_like(param) * 0.3)


def make_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _quiet()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, text_encoder_2=None,
                        tokenizer=None, tokenizer_2=None, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_G = torch.Generator().manual_seed(1)
_PE, _PP = torch.randn(1, 8, 32, generator=_G), torch.randn(1, 32, generator=_G)
_PE2 = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))


def run_flux(pipe):
    return pipe(prompt_embeds=_PE, pooled_prompt_embeds=_PP, num_inference_steps=1, guidance_scale=5.0, height=8,
                width=8, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def make_flux2():
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)

    _quiet()
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                              transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_flux2(pipe):
    return pipe(prompt_embeds=_PE2, num_inference_steps=1, guidance_scale=1.0, height=16, width=16,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def _trained(make, run, config, folder):
    """(reference output of the PEFT-wrapped denoiser, the folder save_pretrained wrote)."""
    pipe = make()
    peft_model = get_peft_model(pipe.transformer, config)
    _move_off_init(peft_model)
    pipe.transformer = peft_model
    reference = run(pipe)
    peft_model.save_pretrained(folder)
    return reference


def _loaded(make, run, source, **kwargs):
    pipe = make()
    pipe.load_lora_weights(str(source), **kwargs)
    return run(pipe)


# ---------------------------------------------------------------------------------------------- FLUX.1


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora-alpha8-r4", "dora"])
def test_flux1_refuses_peft_folder_and_loads_diffusers_format(tmp_path, use_dora):
    base = run_flux(make_flux())
    config = LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, target_modules=FLUX_TARGETS)
    reference = _trained(make_flux, run_flux, config, tmp_path / "peft")
    with pytest.raises(KeyError, match="base_model.model"):
        _loaded(make_flux, run_flux, tmp_path / "peft", weight_name="adapter_model.safetensors")
    written = to_diffusers_format(tmp_path / "peft", tmp_path / "diffusers", "FluxPipeline")
    assert written.path.name == "pytorch_lora_weights.safetensors" and written.prefix == "transformer."
    assert "lora_adapter_metadata" in written.metadata
    out = _loaded(make_flux, run_flux, tmp_path / "diffusers")
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- FLUX.2


def test_flux2_takes_peft_folder_but_assumes_alpha_equals_r(tmp_path):
    base = run_flux2(make_flux2())
    ref_same = _trained(make_flux2, run_flux2, LoraConfig(r=4, lora_alpha=4, target_modules=FLUX2_TARGETS),
                        tmp_path / "a4")
    out = _loaded(make_flux2, run_flux2, tmp_path / "a4", weight_name="adapter_model.safetensors")
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, ref_same, atol=ATOL, rtol=0)  # alpha = r: the folder loads as is

    ref = _trained(make_flux2, run_flux2, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                     target_modules=FLUX2_TARGETS), tmp_path / "a8")
    raw = _loaded(make_flux2, run_flux2, tmp_path / "a8", weight_name="adapter_model.safetensors")
    assert (raw - ref).abs().max() > 1e-2  # alpha lost: adapter_config.json is not read
    to_diffusers_format(tmp_path / "a8", tmp_path / "d8", "Flux2KleinPipeline")
    torch.testing.assert_close(_loaded(make_flux2, run_flux2, tmp_path / "d8"), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=FLUX2_TARGETS),
    LoKrConfig(r=4, alpha=8, target_modules=FLUX2_TARGETS),
], ids=["dora", "lokr-alpha8-r4"])
def test_flux2_loads_dora_and_lokr_in_diffusers_format(tmp_path, config):
    base = run_flux2(make_flux2())
    reference = _trained(make_flux2, run_flux2, config, tmp_path / "peft")
    to_diffusers_format(tmp_path / "peft", tmp_path / "diffusers", "Flux2KleinPipeline")
    out = _loaded(make_flux2, run_flux2, tmp_path / "diffusers")
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- SDXL (UNet)


def make_unet():
    from diffusers import UNet2DConditionModel

    _quiet()
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)


_G3 = torch.Generator().manual_seed(3)
_X, _E, _TE = torch.randn(1, 4, 16, 16, generator=_G3), torch.randn(1, 8, 64, generator=_G3), torch.randn(1, 32,
                                                                                                       generator=_G3)
_TI = torch.tensor([[16.0, 16, 0, 0, 16, 16]])


def run_unet(unet):
    with torch.no_grad():
        return unet(_X, 10, encoder_hidden_states=_E, added_cond_kwargs={"text_embeds": _TE, "time_ids": _TI}).sample


def sdxl_pipe(unet):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())


def _trained_unet(config, folder):
    peft_model = get_peft_model(make_unet(), config)
    _move_off_init(peft_model)
    reference = run_unet(peft_model)
    peft_model.save_pretrained(folder)
    return reference


def test_sdxl_kohya_round_trip_keeps_alpha(tmp_path):
    """to_kohya_format writes the real alpha; diffusers' own kohya loader gives back the same update."""
    base = run_unet(make_unet())
    reference = _trained_unet(LoraConfig(r=4, lora_alpha=8, target_modules=SDXL_TARGETS), tmp_path / "peft")
    written = to_kohya_format(tmp_path / "peft", tmp_path / "lora.safetensors", "sdxl")
    assert set(written.alphas.values()) == {8.0}  # diffusers' convert_state_dict_to_kohya would write 4 (= rank)
    from safetensors.torch import load_file

    keys = load_file(str(written.path))
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down")
               for k in keys)
    pipe = sdxl_pipe(make_unet())
    pipe.load_lora_weights(str(written.path))  # kohya keys: _convert_non_diffusers_lora_to_diffusers
    out = run_unet(pipe.unet)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)


def test_sdxl_diffusers_format_with_rslora_patterns_and_raw_folder_ignored(tmp_path):
    base = run_unet(make_unet())
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 3},
                        target_modules=SDXL_TARGETS)
    reference = _trained_unet(config, tmp_path / "peft")
    pipe = sdxl_pipe(make_unet())
    pipe.load_lora_weights(str(tmp_path / "peft"), weight_name="adapter_model.safetensors")
    torch.testing.assert_close(run_unet(pipe.unet), base, atol=0, rtol=0)  # PEFT keys: silently nothing loaded
    written = to_diffusers_format(tmp_path / "peft", tmp_path / "diffusers", "StableDiffusionXLPipeline")
    assert written.prefix == "unet."
    pipe = sdxl_pipe(make_unet())
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    torch.testing.assert_close(run_unet(pipe.unet), reference, atol=ATOL, rtol=0)
