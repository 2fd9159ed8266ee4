"""The image-tool verdict rules (knowledge/image_tools.py) and the kohya writer's alpha, checked against the
update formulas ComfyUI / Forge apply (comfy/weight_adapter/lora.py, loha.py, lokr.py; Forge
backend/patcher/lora.py), transcribed here because no PyPI package ships ComfyUI's loader."""

from __future__ import annotations

import copy
import json

import pytest

from peftpick.errors import PeftpickError
from peftpick.knowledge.capabilities import load_capabilities
from peftpick.knowledge.image_tools import (
    ADAPTER_KINDS,
    TOOLS,
    image_tool_verdict,
    image_tools_from_json,
    load_image_tools,
)
from peftpick.knowledge.datafiles import read_json
from peftpick.types import Candidate

CAPS = load_capabilities()
KB = load_image_tools()
FAMILIES = ("flux2", "flux", "sd3", "sdxl", "wan", "qwen-image")


def cand(name, peft_type, **kwargs):
    return Candidate(name, name, peft_type, None, kwargs)


LORA = cand("LoRA", "LORA", r=16, lora_alpha=16)
LORA_A32 = cand("LoRA a32", "LORA", r=16, lora_alpha=32)
DORA = cand("DoRA", "LORA", r=16, lora_alpha=32, use_dora=True)
LOHA = cand("LoHa", "LOHA", r=8, alpha=16)
LOKR = cand("LoKr", "LOKR", r=8, alpha=16)
OFT = cand("OFT", "OFT", r=0, oft_block_size=32)
IA3 = cand("IA3", "IA3")
PROMPT = cand("Prompt tuning", "PROMPT_TUNING", num_virtual_tokens=20)
FULL = Candidate("full", "Full fine-tuning", None, None, {})


def verdict(tool, c, family, **kw):
    return image_tool_verdict(KB[tool], c, CAPS.get((c.peft_type or "").upper()), family, **kw)


def test_table_loads_with_sources_and_versions():
    assert set(KB) == set(TOOLS)
    for tool in KB.values():
        assert tool.versions.read and tool.versions.checked in ("engine", "source")
        for name, fact in tool.facts.items():
            assert fact.sources and all(s.repo and s.path and s.commit for s in fact.sources), (tool.name, name)
            assert fact.read, (tool.name, name)
    assert KB["diffusers"].versions.checked == "engine" and KB["diffusers"].versions.tested == "0.42.1"
    assert {KB[t].versions.checked for t in ("comfyui", "forge", "invokeai")} == {"source"}


def test_table_validation_rejects_unknown_formats():
    data = copy.deepcopy(read_json(None, "image_tools.json"))
    data["tools"]["comfyui"]["facts"]["LORA"]["value"]["flux"] = "gguf"
    with pytest.raises(PeftpickError, match="LORA"):
        image_tools_from_json(data)
    data = copy.deepcopy(read_json(None, "image_tools.json"))
    del data["tools"]["forge"]["facts"]["LORA"]["sources"]
    with pytest.raises(PeftpickError, match="sources"):
        image_tools_from_json(data)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("c", [LORA, LORA_A32, DORA, LOHA, LOKR, OFT, IA3, PROMPT, FULL], ids=lambda c: c.method)
def test_every_verdict_is_sourced(tool, family, c):
    v = verdict(tool, c, family)
    assert v.route in ("native", "convert", "merge", "cannot")
    assert v.source and v.versions and v.reason.startswith(c.display_name)
    if v.route in ("native", "convert", "merge"):
        assert v.launch
    if v.route == "convert":
        assert v.conversion
    if v.route in ("native", "merge"):
        assert v.conversion is None


def test_diffusers_matrix():
    assert verdict("diffusers", LORA, "flux2").route == "native"  # alpha = r: the saved folder loads as is
    assert "adapter_model.safetensors" in verdict("diffusers", LORA, "flux2").launch[-1]
    v = verdict("diffusers", LORA_A32, "flux2")
    assert (v.route, v.conversion) == ("convert", "diffusers") and "assumes lora_alpha = r" in v.reason
    for family in ("flux", "sdxl", "sd3", "wan", "qwen-image"):
        v = verdict("diffusers", LORA, family)
        assert (v.route, v.conversion) == ("convert", "diffusers"), family
    assert (verdict("diffusers", DORA, "flux").route, verdict("diffusers", DORA, "flux").conversion) == \
        ("convert", "diffusers")
    assert verdict("diffusers", DORA, "wan").route == "merge"  # not verified for Wan
    assert (verdict("diffusers", LOKR, "flux2").route, verdict("diffusers", LOKR, "flux2").conversion) == \
        ("convert", "diffusers")
    assert verdict("diffusers", LOKR, "flux").route == "merge"
    for c in (LOHA, OFT, IA3):
        assert verdict("diffusers", c, "flux2").route == "merge", c.method
    assert verdict("diffusers", PROMPT, "flux").route == "cannot"
    assert verdict("diffusers", FULL, "flux").route == "native"
    assert "from_pretrained" in verdict("diffusers", FULL, "flux").launch[0]
    assert "tests/test_diffusers_client.py" in verdict("diffusers", LORA_A32, "flux").source


def test_comfyui_forge_invokeai_matrix():
    for tool in ("comfyui", "forge", "invokeai"):
        for c in (LORA, LORA_A32):
            v = verdict(tool, c, "sdxl")
            assert (v.route, v.conversion) == ("convert", "kohya"), (tool, c.method)
        assert verdict(tool, DORA, "flux").route == "merge", tool  # dora_scale not reproduced
        assert verdict(tool, OFT, "sdxl").route == "merge", tool  # PEFT's oft_R is not read
        assert verdict(tool, PROMPT, "sdxl").route == "cannot", tool
    for tool in ("comfyui", "forge"):
        for c in (LOHA, LOKR):
            assert verdict(tool, c, "flux").conversion == "kohya", (tool, c.method)
    assert "LoraLoaderModelOnly" in verdict("comfyui", LORA, "flux").launch[-1]
    assert "<lora:" in verdict("forge", LORA, "flux").launch[-1]
    assert "PR #15458" in verdict("comfyui", DORA, "flux").reason or "15458" in verdict("comfyui", DORA, "flux").source
    # FLUX.2 / Wan diffusers names are not verified in ComfyUI: merge, not a kohya file it may half-load.
    assert verdict("comfyui", LORA, "flux2").route == "merge"
    assert verdict("forge", LORA, "wan").route == "cannot"  # Forge is not verified to run Wan at all
    assert verdict("invokeai", LORA, "sd3").route == "cannot"
    v = verdict("invokeai", LORA_A32, "flux2")
    assert (v.route, v.conversion) == ("convert", "rescale+diffusers")
    assert verdict("invokeai", LORA, "flux2").conversion == "diffusers"
    assert verdict("invokeai", LOHA, "sdxl").conversion == "kohya"
    assert verdict("invokeai", LOHA, "flux").route == "merge"


def test_inits_options_and_multi_adapter():
    pissa = cand("PiSSA", "LORA", r=16, lora_alpha=16, init_lora_weights="pissa")
    v = verdict("comfyui", pissa, "flux")
    assert (v.route, v.conversion, v.rank_after) == ("convert", "initial-model+kohya", 32)
    loftq = cand("LoftQ", "LORA", r=16, lora_alpha=16, init_lora_weights="loftq")
    assert verdict("diffusers", loftq, "flux").route == "merge"
    saved = cand("LoRA+mts", "LORA", r=16, lora_alpha=16, modules_to_save=["proj_out"])
    assert verdict("comfyui", saved, "sdxl").route == "merge"
    assert verdict("diffusers", LORA_A32, "flux", multi_adapter=True).route == "convert"
    assert "set_adapters" in verdict("diffusers", LORA_A32, "flux", multi_adapter=True).launch[-1]
    v = verdict("comfyui", DORA, "flux", multi_adapter=True)  # merging would bake one in: an SVD LoRA instead
    assert (v.route, v.conversion) == ("convert", "svd+kohya")
    assert verdict("comfyui", OFT, "flux2", multi_adapter=True).route == "cannot"  # no LoRA form verified either
    v = verdict("diffusers", LOHA, "flux", multi_adapter=True)
    assert (v.route, v.conversion) == ("convert", "svd+diffusers")
    assert verdict("diffusers", FULL, "flux", multi_adapter=True).route == "cannot"
    assert image_tool_verdict(None, LORA, CAPS["LORA"], "flux").route == "not needed"
    assert image_tool_verdict("comfyui", LORA, CAPS["LORA"], "flux").route == "convert"


def test_unverified_values_are_kept():
    assert KB["comfyui"].support("LORA", "flux2") == "unverified"
    assert KB["invokeai"].support("IA3", "sdxl") == "unverified"
    assert KB["forge"].support("IA3", "flux") == "unverified"
    for tool in KB.values():
        for kind in ADAPTER_KINDS:
            assert kind in tool.facts


# ---------------------------------------------------------------------------------------------- writer alpha


torch = pytest.importorskip("torch")


def _tiny(config):
    from peft import get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(24, 24)
            self.to_k = torch.nn.Linear(24, 24)
            self.proj_out = torch.nn.Linear(24, 48)

        def forward(self, x):
            return self.proj_out(self.to_q(x) + self.to_k(x))

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(Block()), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(s in name for s in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn_like(param) * 0.2)
    return model


def _comfy_delta(sd, name, shape):
    """ComfyUI's update for one module (weight_adapter/lora.py, loha.py, lokr.py)."""
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else None
    if f"{name}.lora_up.weight" in sd:
        up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    if f"{name}.hada_w1_a" in sd:
        w1b = sd[f"{name}.hada_w1_b"]
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        return ((sd[f"{name}.hada_w1_a"] @ w1b) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])).reshape(shape) \
            * scale
    dim = None
    w1 = sd.get(f"{name}.lokr_w1")
    if w1 is None:
        dim = sd[f"{name}.lokr_w1_b"].shape[0]
        w1 = sd[f"{name}.lokr_w1_a"] @ sd[f"{name}.lokr_w1_b"]
    w2 = sd.get(f"{name}.lokr_w2")
    if w2 is None:
        dim = sd[f"{name}.lokr_w2_b"].shape[0]
        w2 = sd[f"{name}.lokr_w2_a"] @ sd[f"{name}.lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.parametrize("config_name", ["lora-rslora-patterns", "loha", "lokr", "lokr-full", "lokr-both"])
def test_kohya_alpha_reproduces_peft_update(tmp_path, config_name):
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    from safetensors.torch import load_file

    from peftpick.adapters.formats import to_kohya_format

    targets = ["to_q", "to_k", "proj_out"]
    config = {
        "lora-rslora-patterns": LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"to_q": 2},
                                           alpha_pattern={"to_k": 3}, target_modules=targets),
        "loha": LoHaConfig(r=4, alpha=8, rank_pattern={"to_q": 2}, target_modules=targets),
        "lokr": LoKrConfig(r=2, alpha=7, target_modules=targets),
        "lokr-full": LoKrConfig(r=16, alpha=4, target_modules=targets),  # r large: lokr_w2 is not split
        "lokr-both": LoKrConfig(r=1, alpha=3, decompose_both=True, decompose_factor=4, target_modules=targets),
    }[config_name]
    model = _tiny(config)
    model.save_pretrained(tmp_path / "peft")
    written = to_kohya_format(tmp_path / "peft", tmp_path / "k.safetensors", "flux")
    sd = load_file(str(written.path))
    assert all(k.startswith("lora_transformer_") for k in sd)
    checked = 0
    for module_name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            path = module_name.removeprefix("base_model.model.")
            expected = module.get_delta_weight("default")
            got = _comfy_delta(sd, "lora_transformer_" + path.replace(".", "_"), expected.shape)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked == 3


def test_kohya_writer_refuses_dora_and_unknown_family(tmp_path):
    from peft import LoraConfig

    from peftpick.adapters.formats import to_kohya_format

    model = _tiny(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "proj_out"]))
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(PeftpickError, match="DoRA"):
        to_kohya_format(tmp_path / "dora", tmp_path / "d.safetensors", "sdxl")
    written = to_kohya_format(tmp_path / "dora", tmp_path / "d.safetensors", "flux", allow_inexact_dora=True)
    from safetensors.torch import load_file

    scales = {k: v.shape for k, v in load_file(str(written.path)).items() if k.endswith("dora_scale")}
    assert scales and all(len(s) == 2 and s[1] == 1 for s in scales.values())  # [out, 1]: ComfyUI's output axis
    with pytest.raises(PeftpickError, match="family"):
        to_kohya_format(tmp_path / "dora", tmp_path / "w.safetensors", "wan", allow_inexact_dora=True)
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
