"""Denoiser registry, resolution, meta builds and target roles (knowledge/denoisers.py, denoiser_targets.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402

from peftpick.errors import PeftpickError  # noqa: E402
from peftpick.knowledge.architectures import load_registry, resolve_model  # noqa: E402
from peftpick.knowledge.denoiser_targets import (  # noqa: E402
    DEFAULT_ROLES,
    DENOISER_ROLES,
    SUITE_TARGET_MODULES,
    analysis_model,
    denoiser_layer_modules,
    resolve_denoiser_targets,
)
from peftpick.knowledge.denoisers import (  # noqa: E402
    architecture_from_entry,
    build_denoiser,
    load_denoiser_registry,
    resolve_denoiser,
)
from peftpick.types import Workload  # noqa: E402

KLEIN = "flux.2-klein-4b"
KLEIN_PARAMS = 3_875_544_576  # PEFT image suite, full fine-tuning run: num_total_params
KLEIN_LORA_R32 = 38_338_560  # PEFT image suite, lora/default (r 32) and gralora/shira/deft: num_trainable_params


@pytest.fixture(scope="module")
def registry():
    return load_denoiser_registry()


@pytest.fixture(scope="module")
def built(registry):
    """Every registry entry as (architecture, full model on meta), built once for the module."""
    return {entry.name: (arch := architecture_from_entry(entry), build_denoiser(arch)) for entry in registry}


def _write(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _diffusers_folder(root: Path, entry, pipeline: str | None = None, component: str | None = None) -> Path:
    """A diffusers pipeline folder with model_index.json and the denoiser config of `entry` (no weights)."""
    component = component or ("unet" if entry.diffusers_class.startswith("UNet") else "transformer")
    _write(root / "model_index.json", {"_class_name": pipeline or entry.denoiser.pipeline_class,
                                       "_diffusers_version": "0.42.1", component: ["diffusers", entry.diffusers_class],
                                       "vae": ["diffusers", "AutoencoderKL"]})
    _write(root / component / "config.json", {"_class_name": entry.diffusers_class, **entry.config})
    return root


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "; " in text, text  # "<problem>; <fix>" on one line
    return text


# ------------------------------------------------------------------------------------------------ registry


def test_registry_holds_the_required_denoisers_with_sources(registry):
    assert len(registry) >= 12
    for name in (KLEIN, "flux.1-dev", "flux.1-schnell", "flux.2-dev", "sdxl-base-1.0", "sd3.5-medium",
                 "sd3.5-large", "qwen-image", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        assert registry.lookup(name) is not None, name
    for entry in registry:
        assert entry.name == entry.name.lower()
        assert entry.source["repo"] and entry.source["path"], entry.name
        assert entry.checked.startswith("built on the meta device with diffusers"), entry.name
        assert entry.published_params and entry.published_params_source, entry.name
        assert entry.dtype in {"bfloat16", "float16"} and entry.dtype_source, entry.name
        assert entry.denoiser.family == entry.family and entry.denoiser.diffusers_class == entry.diffusers_class
        assert entry.denoiser.latent_channels > 0 and entry.denoiser.text_dim > 0 and entry.denoiser.text_len > 0
        if entry.denoiser.vae_temporal:  # video models: a clip length with its source
            assert entry.denoiser.default_frames > 0 and "default_frames" in entry.facts_sources, entry.name


def test_denoiser_spellings_do_not_clash_with_language_models(registry):
    lm_keys = {key for entry in load_registry() for key in entry.lookup_keys()}
    denoiser_keys = {key for entry in registry for key in entry.lookup_keys()}
    assert not lm_keys & denoiser_keys


def test_every_entry_builds_on_meta_with_its_published_size(registry, built):
    for entry in registry:
        _, model = built[entry.name]
        assert next(model.parameters()).device.type == "meta"
        total = sum(p.numel() for p in model.parameters())
        if entry.published_params_includes_buffers:
            total += sum(b.numel() for b in model.buffers())
        deviation = abs(total - entry.published_params) / entry.published_params
        assert deviation <= entry.published_params_tolerance, (entry.name, total)
        assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in entry.checked, entry.name


def test_klein_builds_exactly_the_benchmark_model(built):
    arch, model = built[KLEIN]
    assert sum(p.numel() for p in model.parameters()) == KLEIN_PARAMS
    assert next(model.parameters()).dtype == torch.bfloat16


def test_figures_of_known_denoisers(built):
    klein = built[KLEIN][0]
    assert (klein.model_type, klein.hidden_size, klein.num_layers, klein.num_heads, klein.num_kv_heads,
            klein.head_dim, klein.intermediate_size, klein.vocab_size, klein.tie_word_embeddings) == (
        "Flux2Transformer2DModel", 3072, 25, 24, 24, 128, 9216, 0, False)
    assert klein.workload is Workload.DENOISER and klein.hub_id == "black-forest-labs/FLUX.2-klein-base-4B"
    facts = klein.denoiser
    assert (facts.family, facts.objective, facts.latent_channels, facts.vae_scale, facts.patch, facts.text_dim,
            facts.text_len, facts.pipeline_class, facts.guidance) == (
        "flux2", "flow", 32, 8, 2, 7680, 512, "Flux2KleinPipeline", False)
    sdxl = built["sdxl-base-1.0"][0]
    figures = (sdxl.hidden_size, sdxl.num_layers, sdxl.num_heads, sdxl.head_dim, sdxl.dtype)
    assert figures == (1280, 11, 20, 64, "float16")
    assert (sdxl.denoiser.objective, sdxl.denoiser.added_time_ids, sdxl.denoiser.pooled_dim) == ("epsilon", 6, 1280)
    wan = built["wan2.1-t2v-1.3b"][0]
    assert (wan.hidden_size, wan.num_layers, wan.intermediate_size) == (1536, 30, 8960)
    assert (wan.denoiser.vae_temporal, wan.denoiser.default_frames) == (4, 81)
    assert built["flux.1-dev"][0].num_layers == 19 + 38 and built["flux.1-dev"][0].denoiser.guidance


def test_fewer_blocks_keep_both_block_kinds():
    klein = resolve_denoiser(KLEIN)
    model = build_denoiser(klein, num_layers=4)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (2, 2)
    flux2_dev = build_denoiser(resolve_denoiser("flux.2-dev"), num_layers=14)
    assert (len(flux2_dev.transformer_blocks), len(flux2_dev.single_transformer_blocks)) == (2, 12)
    medium = build_denoiser(resolve_denoiser("sd3.5-medium"), num_layers=3)
    kinds = [block.attn2 is not None for block in medium.transformer_blocks]
    assert len(kinds) == 3 and any(kinds) and not all(kinds)
    sdxl = resolve_denoiser("sdxl-base-1.0")
    assert sum(p.numel() for p in build_denoiser(sdxl, num_layers=2).parameters()) == 2_567_463_684  # whole UNet
    with pytest.raises(PeftpickError):
        build_denoiser(klein, num_layers=0)


# ------------------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize("spec", ["flux.2-klein-4b", "FLUX.2-klein-base-4B", "flux2-klein-base-4b",
                                  "black-forest-labs/FLUX.2-klein-base-4B", "  Flux2_Klein_4B "])
def test_resolution_by_name_alias_and_hub_id(spec):
    arch = resolve_model(spec)
    assert arch.name == KLEIN and arch.denoiser is not None


def test_unknown_names_are_not_denoisers():
    assert resolve_denoiser("llama-3.2-3b") is None
    assert resolve_denoiser("not-a-model-at-all") is None
    assert resolve_denoiser(42) is None


def test_language_model_resolution_is_unchanged(tmp_path):
    llama = resolve_model("llama-3.2-3b")
    assert (llama.denoiser, llama.workload, llama.model_type) == (None, Workload.CAUSAL_LM, "llama")
    assert llama.num_layers == 28
    _write(tmp_path / "lm" / "config.json", {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "vocab_size": 1000})
    assert resolve_model(tmp_path / "lm").model_type == "llama"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PeftpickError, match="not valid JSON"):  # the LM reader's message, as before
        resolve_model(tmp_path / "broken")


@pytest.mark.parametrize("name", [KLEIN, "flux.1-dev", "sdxl-base-1.0", "wan2.1-t2v-14b"])
def test_local_diffusers_folder_resolves_to_the_registry_entry(tmp_path, registry, name):
    entry = registry.lookup(name)
    folder = _diffusers_folder(tmp_path / "my-model", entry)
    for spec in (folder, str(folder), folder / "model_index.json"):
        arch = resolve_model(spec)
        assert arch.name == "my-model" and arch.local_path and arch.denoiser == entry.denoiser
        assert arch.num_layers == architecture_from_entry(entry).num_layers
    component = next(p for p in folder.iterdir() if p.is_dir())
    assert resolve_denoiser(component).denoiser == entry.denoiser  # a bare transformer/ or unet/ folder
    assert resolve_denoiser(component / "config.json").denoiser == entry.denoiser


def test_hub_config_with_class_defaults_left_out_matches(tmp_path, registry):
    # The hub's FLUX.1-dev transformer/config.json states no axes_dims_rope (the class default).
    entry = registry.lookup("flux.1-dev")
    config = {key: value for key, value in entry.config.items() if key != "axes_dims_rope"}
    _write(tmp_path / "flux" / "config.json", {"_class_name": "FluxTransformer2DModel", **config})
    assert resolve_denoiser(tmp_path / "flux").denoiser == entry.denoiser


def test_unbundled_config_of_a_known_class_is_derived(tmp_path, registry):
    entry = registry.lookup(KLEIN)
    config = {**entry.config, "num_layers": 3, "num_single_layers": 6, "joint_attention_dim": 3072}
    _write(tmp_path / "tiny-klein" / "transformer" / "config.json", {"_class_name": entry.diffusers_class, **config})
    arch = resolve_denoiser(tmp_path / "tiny-klein" / "transformer")
    assert arch.name == "tiny-klein" and arch.num_layers == 9
    assert (arch.denoiser.latent_channels, arch.denoiser.text_dim, arch.denoiser.text_encoders) == (32, 3072, ())
    assert "no bundled model has this config" in arch.source
    model = build_denoiser(arch)
    assert len(model.single_transformer_blocks) == 6


def test_bad_diffusers_folders_give_one_line_errors(tmp_path, registry):
    entry = registry.lookup(KLEIN)
    no_denoiser = _write(tmp_path / "a" / "model_index.json", {"_class_name": "Flux2KleinPipeline",
                                                               "vae": ["diffusers", "AutoencoderKLFlux2"]}).parent
    with pytest.raises(PeftpickError, match="names no transformer or unet") as error:
        resolve_model(no_denoiser)
    _one_line(error)
    missing = _write(tmp_path / "b" / "model_index.json", {"transformer": ["diffusers", entry.diffusers_class]}).parent
    with pytest.raises(PeftpickError, match="transformer/config.json is missing") as error:
        resolve_model(missing)
    _one_line(error)
    broken_index = tmp_path / "c"
    broken_index.mkdir()
    (broken_index / "model_index.json").write_text('{"transformer": [', encoding="utf-8")
    with pytest.raises(PeftpickError, match="model_index.json .* is not valid JSON") as error:
        resolve_model(broken_index)
    _one_line(error)
    broken_config = _diffusers_folder(tmp_path / "d", entry)
    (broken_config / "transformer" / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(PeftpickError, match="transformer/config.json .* is not valid JSON") as error:
        resolve_model(broken_config)
    _one_line(error)
    unknown = _write(tmp_path / "e" / "config.json", {"_class_name": "HiDreamImageTransformer2DModel"}).parent
    with pytest.raises(PeftpickError, match="HiDreamImageTransformer2DModel.*not a diffusion denoiser") as error:
        resolve_model(unknown)
    _one_line(error)
    other_vae = _write(tmp_path / "f" / "config.json", {"_class_name": "WanTransformer3DModel",
                                                        **{**registry.lookup("wan2.1-t2v-1.3b").config,
                                                           "in_channels": 48, "out_channels": 48}}).parent
    with pytest.raises(PeftpickError, match="48 latent channels") as error:
        resolve_model(other_vae)
    _one_line(error)


# ------------------------------------------------------------------------------------------------ targets


def test_klein_default_targets_are_the_suite_set_and_give_its_lora_count(built):
    arch, model = built[KLEIN]
    resolution = resolve_denoiser_targets(arch, model=model)
    assert sorted(resolution.modules) == sorted(SUITE_TARGET_MODULES)
    assert resolution.roles_covered == DEFAULT_ROLES
    peft_model = get_peft_model(build_denoiser(arch), LoraConfig(target_modules=resolution.modules, r=32),
                                low_cpu_mem_usage=True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == KLEIN_LORA_R32


def test_targets_of_every_entry_match_linear_layers_with_peft(registry, built):
    for entry in registry:
        arch, model = built[entry.name]
        resolution = resolve_denoiser_targets(arch, model=model, include_conv=True)
        config = LoraConfig(target_modules=resolution.modules, r=32)
        matched: dict[str, int] = {name: 0 for name in resolution.modules}
        for key, module in model.named_modules():
            if check_target_module_exists(config, key):
                assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)), (entry.name, key, type(module))
                parts = key.split(".")
                never = key == "proj_out" or any(p.startswith("norm") or p.endswith("_mod") or "embed" in p
                                                 for p in parts)
                assert not never or "token_refiner" in parts, (entry.name, key)
                for name in resolution.modules:
                    matched[name] += key == name or key.endswith("." + name)
        assert all(matched.values()), (entry.name, [n for n, c in matched.items() if not c])
        assert {"attn", "mlp"} <= set(resolution.roles_covered), entry.name
        # The layer listing and the resolution agree: every selected layer's target is in the module list.
        layers = denoiser_layer_modules(arch, model=model)
        assert {layer.target for layer in layers if set(layer.roles) & set(resolution.roles_covered)} == \
            set(resolution.modules), entry.name
        # PEFT wraps the names on a few-block copy (the names do not depend on the block count).
        small = build_denoiser(arch, num_layers=4)
        default = resolve_denoiser_targets(arch, model=model).modules
        get_peft_model(small, LoraConfig(target_modules=default, r=4), low_cpu_mem_usage=True)


def test_family_mappings(built):
    def targets(name, **kwargs):
        arch, model = built[name]
        return set(resolve_denoiser_targets(arch, model=model, **kwargs).modules)

    flux1 = targets("flux.1-dev")
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2",
            "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"} == flux1
    sdxl = targets("sdxl-base-1.0")
    assert {"attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"} <= sdxl
    assert not sdxl & {"conv1", "conv2", "proj_in", "proj_out"}
    assert {"conv1", "conv2"} <= targets("sdxl-base-1.0", include_conv=True)
    assert {"proj_in", "proj_out"} <= targets("sdxl-base-1.0", roles=("attn", "proj"))
    assert {"attn1.to_q", "attn2.to_q", "ffn.net.0.proj", "ffn.net.2"} <= targets("wan2.1-t2v-14b")
    assert {"img_mlp.net.2", "txt_mlp.net.0.proj", "add_k_proj", "to_q"} <= targets("qwen-image")
    assert {"to_q", "add_q_proj", "ff_context.net.2"} <= targets("sd3.5-medium")
    assert targets("wan2.1-t2v-1.3b", roles=("attn",)) == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"}
    # FLUX.1 single-block proj_out shares its name with the final projection: each block is named.
    fused_out = targets("flux.1-dev", roles=("fused_out",))
    assert len(fused_out) == 38 and "proj_out" not in fused_out


def test_layer_listing_of_klein_names_both_block_kinds(built):
    arch, model = built[KLEIN]
    layers = {layer.path: layer for layer in denoiser_layer_modules(arch, model=model)}
    assert layers["transformer_blocks.0.attn.to_q"].roles == ("attn",)
    assert layers["transformer_blocks.0.attn.add_k_proj"].roles == ("context_attn",)
    assert layers["transformer_blocks.0.ff.linear_in"].out_features == 18432
    fused = layers["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    assert (fused.target, fused.roles) == ("to_qkv_mlp_proj", ("fused",))
    assert (fused.in_features, fused.out_features) == (3072, 27648)
    assert all(not path.startswith(("x_embedder", "context_embedder", "proj_out", "norm_out", "time_guidance"))
               for path in layers)


def test_bad_roles_give_one_line_errors(built):
    arch, model = built["wan2.1-t2v-1.3b"]
    with pytest.raises(PeftpickError, match="unknown denoiser target role") as error:
        resolve_denoiser_targets(arch, roles=("attention",), model=model)
    _one_line(error)
    with pytest.raises(PeftpickError, match="has no fused layers") as error:
        resolve_denoiser_targets(arch, roles=("fused",), model=model)
    _one_line(error)
    assert set(DEFAULT_ROLES) <= set(DENOISER_ROLES)


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2-dev", "sd3.5-large", "sdxl-base-1.0", "wan2.1-t2v-1.3b"])
def test_targets_read_from_a_few_blocks_equal_those_of_the_full_model(built, name):
    """Targets are resolved on a model of a few blocks (fast); where a role can only be named by each block's
    path (FLUX single blocks' output projections), the full model is read, so every block is listed."""
    arch, model = built[name]
    small = analysis_model(arch)
    for role in DENOISER_ROLES:
        try:
            full = resolve_denoiser_targets(arch, [role], include_conv=True, model=model)
        except PeftpickError as error:
            with pytest.raises(PeftpickError, match=str(error).split(":")[0]):
                resolve_denoiser_targets(arch, [role], include_conv=True)
            continue
        assert resolve_denoiser_targets(arch, [role], include_conv=True) == full, role
        assert resolve_denoiser_targets(arch, [role], include_conv=True, model=small, shrunk=True) == full, role
    assert [m.target for m in denoiser_layer_modules(arch)] == [m.target for m in denoiser_layer_modules(arch, model)]
    assert [m.target for m in denoiser_layer_modules(arch, small)] == [m.target for m in denoiser_layer_modules(arch, model)]


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.2-klein-4b", "sdxl-base-1.0"])
def test_cached_facts_give_the_same_targets_without_building_the_denoiser(built, name, tmp_path, monkeypatch):
    """A bundled denoiser resolved through the cache keeps its parameter count and layer tables (the full build's
    too where a role is named block by block, FLUX.1's single blocks); the next run reads them back and chooses
    targets without building the model, so without importing torch or diffusers."""
    from peftpick.estimator.cache import EstimateCache
    from peftpick.knowledge import denoiser_targets, denoisers
    from peftpick.knowledge.denoisers import count_denoiser_parameters, resolve_denoiser

    arch, model = built[name]
    cache = EstimateCache.open(tmp_path / "cache.sqlite")
    try:
        resolve_denoiser(name, cache=cache.architectures)  # works the facts out and keeps them
        cached = resolve_denoiser(name, cache=cache.architectures)
    finally:
        cache.close()

    def refuse(*_args, **_kwargs):
        raise AssertionError("the denoiser was built although its facts are cached")

    monkeypatch.setattr(denoiser_targets, "build_denoiser", refuse)
    monkeypatch.setattr(denoisers, "build_denoiser", refuse)
    assert denoiser_targets.layer_source(cached) is None
    assert count_denoiser_parameters(cached) == sum(p.numel() for p in model.parameters())
    assert denoiser_layer_modules(cached) == denoiser_layer_modules(arch, model)
    for role in DENOISER_ROLES:
        try:
            expected = resolve_denoiser_targets(arch, [role], include_conv=True, model=model)
        except PeftpickError:
            continue
        assert resolve_denoiser_targets(cached, [role], include_conv=True) == expected, role
