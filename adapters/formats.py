"""Writing a saved PEFT adapter in the file formats image tools read: diffusers' LoRA format and kohya / LyCORIS.

Input: a folder written by `peft_model.save_pretrained` on a diffusers denoiser (adapter_config.json +
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`, `...hada_w1_a`, `...lokr_w1` ...).

- `to_diffusers_format(adapter_dir, out_dir, pipeline_class)`: the file diffusers' own `save_lora_weights` writes
  (`pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A.weight` or `unet.<...>`, the PEFT config
  as safetensors metadata). Written by the pipeline class's own `save_lora_weights` classmethod with
  `<component>_lora_adapter_metadata=config`, because without that metadata diffusers assumes lora_alpha = r
  (diffusers 0.42.1 utils/peft_utils.py get_peft_kwargs; measured in tests/test_diffusers_client.py). LoRA, DoRA
  (`lora_magnitude_vector`) and LoKr (diffusers loads LoKr for FLUX.2 / Z-Image only) are written.
- `to_kohya_format(adapter_dir, out_file, family)`: one safetensors file in the kohya / LyCORIS layout that
  ComfyUI, Forge and InvokeAI read: `<prefix><module with _>.lora_down.weight / .lora_up.weight / .alpha` for LoRA,
  `.hada_w1_a ... .alpha` for LoHa, `.lokr_w1 ... .alpha` for LoKr. The prefix depends on the family, because the
  tools map keys per model (ComfyUI comfy/lora.py `model_lora_keys_unet`): SDXL `lora_unet_<diffusers name>`
  (via `unet_to_diffusers`), FLUX.1 / SD3 `lora_transformer_<diffusers name>` (the OneTrainer form ComfyUI, Forge
  and InvokeAI all map), Qwen-Image `lycoris_<diffusers name>` (ComfyUI).

Alpha: kohya tools scale an update by `.alpha / rank` (ComfyUI weight_adapter/lora.py `alpha = v[2] /
mat2.shape[0]`, loha.py `alpha / w1b.shape[0]`). diffusers' own `convert_state_dict_to_kohya` writes
`alpha = rank` (scale 1), which drops PEFT's lora_alpha / r; here every module gets `alpha = scale x rank` with
PEFT's scale for that module (lora_alpha / r, lora_alpha / sqrt(r) for rsLoRA, alpha_pattern / rank_pattern
entries), so alpha / rank is exactly PEFT's scale. LoKr: the tools divide alpha by `w1_b` / `w2_b`'s rank and
ignore alpha when neither factor is split (ComfyUI weight_adapter/lokr.py, Forge backend/patcher/lora.py:182-224,
InvokeAI lokr_layer.py `_rank`), so PEFT's scale is baked into `lokr_w1` (or `lokr_w1_a`) and alpha is written
equal to that rank: exact for all three whichever factor they read.

DoRA: PEFT's magnitude is one norm per output row (`lora_magnitude_vector`, shape [out]); it is written as
`dora_scale` of shape [out, 1], the output-axis orientation ComfyUI's `weight_decompose` detects
(`wd_on_output_axis = dora_scale.shape[0] == weight_calc.shape[0]`, comfy/weight_adapter/base.py @9c0cf36); a 1-D
[out] tensor broadcasts to [out, out] there (Comfy-Org/ComfyUI issue #12938). But that branch divides by the norm
of the *base* weight, not of W + dW (the fix, PR #15458, was open when read), Forge copies it
(backend/patcher/lora.py:52-77 @dfdcbab) and InvokeAI normalises over the input axis only (dora_layer.py), so no
kohya tool reproduces PEFT's DoRA exactly: `to_kohya_format` refuses DoRA unless `allow_inexact_dora=True`.

Where diffusers has a converter it is used: `diffusers.utils.convert_state_dict_to_kohya` names SDXL LoRA keys
(its alpha values are replaced); the FLUX / SD3 / Qwen-Image prefixes, LoHa / LoKr naming, the real alpha and the
DoRA orientation are written here (diffusers has only the import direction for those).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftpick.adapters.files import CONFIG_NAME, SAFETENSORS_NAME
from peftpick.errors import PeftpickError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."

# Key prefix of each family in the kohya / LyCORIS layout (see the module docstring for the sources).
KOHYA_PREFIXES: dict[str, str] = {
    "sdxl": "lora_unet_",
    "sd15": "lora_unet_",
    "flux": "lora_transformer_",
    "sd3": "lora_transformer_",
    "qwen-image": "lycoris_",
}

_LORA_TYPES = ("LORA",)
_KOHYA_TYPES = ("LORA", "LOHA", "LOKR")
_DIFFUSERS_TYPES = ("LORA", "LOKR")


@dataclass(frozen=True)
class WrittenAdapter:
    """What a writer wrote: the file, its format, tensors, the alpha per module and anything to know about it."""

    path: Path  # the weights file
    format: str  # "diffusers" or "kohya"
    peft_type: str
    tensors: int
    modules: int
    prefix: str  # "transformer." / "unet." (diffusers) or "lora_unet_" / "lora_transformer_" / "lycoris_" (kohya)
    alphas: Mapping[str, float] = field(default_factory=dict)  # kohya: module -> written .alpha
    metadata: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- reading


def _read(adapter_dir: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json as written, module-keyed state dict without the `base_model.model.` prefix)."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config_file, weights = folder / CONFIG_NAME, folder / SAFETENSORS_NAME
    if not config_file.is_file() or not weights.is_file():
        raise PeftpickError(f"{folder} is not a PEFT adapter folder with {CONFIG_NAME} and {SAFETENSORS_NAME}",
                            "pass the folder peft_model.save_pretrained wrote (safetensors)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    state = load_file(str(weights))
    stripped = {key.removeprefix(PEFT_PREFIX): value for key, value in state.items()}
    return config, stripped


def _check_plain(config: Mapping[str, Any], where: str) -> None:
    """Options whose saved tensors no image tool reads in these layouts."""
    problems = []
    if config.get("modules_to_save"):
        problems.append("modules_to_save (full copies of modules)")
    if config.get("bias") not in (None, "none") or config.get("lora_bias"):
        problems.append("trained biases")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        problems.append(f"init_lora_weights={init!r} (the factors only fit the base PEFT rewrote; run `peftpick "
                        "convert` first, which saves them as a plain LoRA on the original base)")
    if config.get("use_bdlora"):
        problems.append("BD-LoRA's packed block-diagonal factors")
    if problems:
        raise PeftpickError(f"{where}: the adapter has {', '.join(problems)}, which this format cannot carry",
                            "merge the adapter instead (`peftpick merge`), or retrain without these options")


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern rule: the first key matching the module path's end."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's LoRA scale of `module`: lora_alpha (or its alpha_pattern entry) / r, or / sqrt(r) for rsLoRA."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lycoris_scale(config: Mapping[str, Any], module: str) -> float:
    """PEFT's LoHa / LoKr scale of `module`: alpha / r, each from its pattern where one matches."""
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("alpha", 8))
    return alpha / r


def _group(state: Mapping[str, Any], params: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """module -> {param: tensor} for keys `<module>.<param>` (params such as "lora_A.weight", "hada_w1_a")."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        for param in params:
            if key.endswith("." + param):
                modules.setdefault(key[:-len(param) - 1], {})[param] = value
                break
        else:
            raise PeftpickError(f"saved tensor {key!r} is not one this writer knows ({', '.join(params)})",
                                "the adapter holds tensors no image tool reads in this layout; merge it instead")
    return modules


# ---------------------------------------------------------------------------------------------- diffusers


def _pipeline(pipeline_class: Any):
    if isinstance(pipeline_class, str):
        import diffusers

        found = getattr(diffusers, pipeline_class, None)
        if found is None:
            raise PeftpickError(f"diffusers {diffusers.__version__} has no pipeline class {pipeline_class!r}",
                                "pass the pipeline the model runs in, e.g. FluxPipeline, Flux2KleinPipeline, "
                                "StableDiffusionXLPipeline")
        pipeline_class = found
    if not hasattr(pipeline_class, "save_lora_weights"):
        raise PeftpickError(f"{getattr(pipeline_class, '__name__', pipeline_class)} cannot save LoRA weights",
                            "pass a diffusers pipeline class with a LoRA loader mixin")
    return pipeline_class


def _json_ready(value: Any) -> Any:
    """PEFT config values as JSON: sets become sorted lists (LoraConfig.target_modules is a set)."""
    if isinstance(value, (set, frozenset)):
        return sorted(_json_ready(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    return value


def to_diffusers_format(adapter_dir: Path | str, out_dir: Path | str, pipeline_class: Any) -> WrittenAdapter:
    """Write the adapter as diffusers' `pytorch_lora_weights.safetensors` in `out_dir`, with its config as metadata.

    `pipeline_class`: the diffusers pipeline (class or name, e.g. "FluxPipeline", "Flux2KleinPipeline",
    "StableDiffusionXLPipeline"); its `save_lora_weights` classmethod writes the file, so the prefix
    ("transformer." or "unet.") and the metadata layout are diffusers' own. Load it with
    `pipe.load_lora_weights(out_dir)`.
    """
    from peftpick.adapters.files import read_adapter_config

    config, state = _read(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in _DIFFUSERS_TYPES:
        raise PeftpickError(f"diffusers' load_lora_weights does not load {peft_type} adapters (it takes LoRA, DoRA "
                            "and, for FLUX.2 / Z-Image, LoKr)",
                            "convert it to LoRA first (`peftpick convert --to lora`) or merge it")
    _check_plain(config, str(adapter_dir))
    _, peft_config = read_adapter_config(adapter_dir)
    cls = _pipeline(pipeline_class)
    parameters = inspect.signature(cls.save_lora_weights).parameters
    component = "transformer" if "transformer_lora_layers" in parameters else "unet"
    if f"{component}_lora_layers" not in parameters:
        raise PeftpickError(f"{cls.__name__}.save_lora_weights takes neither transformer_lora_layers nor "
                            "unet_lora_layers", "pass the pipeline class of the denoiser the adapter was trained on")
    metadata = {k: v for k, v in _json_ready(peft_config.to_dict()).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {f"{component}_lora_layers": state}
    if f"{component}_lora_adapter_metadata" in parameters:
        kwargs[f"{component}_lora_adapter_metadata"] = metadata
    notes = []
    if f"{component}_lora_adapter_metadata" not in parameters:
        notes.append(f"{cls.__name__}.save_lora_weights takes no adapter metadata: diffusers will assume "
                     "lora_alpha = r when loading")
    cls.save_lora_weights(str(out), weight_name=DIFFUSERS_WEIGHT_NAME, safe_serialization=True, **kwargs)
    from peftpick.adapters.files import read_safetensors_header

    written = out / DIFFUSERS_WEIGHT_NAME
    tensors, file_metadata = read_safetensors_header(written)
    modules = {t.name.rsplit(".", 2)[0] for t in tensors}
    return WrittenAdapter(written, "diffusers", peft_type, len(tensors), len(modules), f"{component}.",
                          metadata=file_metadata, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------- kohya / LyCORIS


def _kohya_name(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def to_kohya_format(adapter_dir: Path | str, out_file: Path | str, family: str, *, prefix: str | None = None,
                    allow_inexact_dora: bool = False) -> WrittenAdapter:
    """Write the adapter as one kohya / LyCORIS safetensors file for ComfyUI, Forge and InvokeAI.

    `family`: the model family ("sdxl", "flux", "sd3", "qwen-image"), which sets the key prefix (`prefix`
    overrides it). Every module's `.alpha` is PEFT's scale x the module's rank, so the tools' alpha / rank is
    PEFT's scale exactly. DoRA is refused unless `allow_inexact_dora` (see the module docstring).
    """
    import torch
    from safetensors.torch import save_file

    config, state = _read(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in _KOHYA_TYPES:
        raise PeftpickError(f"the kohya / LyCORIS layout has no form for PEFT's {peft_type} adapters that these "
                            "writers produce (LoRA, LoHa, LoKr)",
                            "convert it to LoRA first (`peftpick convert --to lora`) or merge it")
    _check_plain(config, str(adapter_dir))
    if prefix is None:
        if family not in KOHYA_PREFIXES:
            raise PeftpickError(f"no verified kohya key form for the {family!r} family",
                                f"known: {', '.join(sorted(KOHYA_PREFIXES))}; use diffusers, or merge the adapter")
        prefix = KOHYA_PREFIXES[family]
    notes: list[str] = []
    out: dict[str, Any] = {}
    alphas: dict[str, float] = {}

    if peft_type == "LORA":
        modules = _group(state, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
        dora = any("lora_magnitude_vector" in parts for parts in modules.values())
        if dora and not allow_inexact_dora:
            raise PeftpickError(
                "DoRA: no kohya tool reproduces PEFT's DoRA: ComfyUI and Forge divide an output-axis dora_scale by "
                "the base weight's norm instead of that of W + dW (comfy/weight_adapter/base.py, Comfy-Org/ComfyUI "
                "PR #15458 open), InvokeAI normalises over the input axis only",
                "merge the adapter (`peftpick merge`), load it in diffusers (which reads PEFT's DoRA), or pass "
                "allow_inexact_dora=True to write dora_scale [out, 1] anyway")
        if dora:
            notes.append("DoRA written as dora_scale [out, 1]; ComfyUI / Forge normalise it by the base weight's "
                         "norm, so the result differs from PEFT's DoRA")
        for module, parts in sorted(modules.items()):
            if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
                raise PeftpickError(f"module {module} lacks lora_A or lora_B", "re-save the adapter")
            rank = int(parts["lora_A.weight"].shape[0])
            alphas[module] = lora_scale(config, module, rank) * rank
        if prefix == "lora_unet_":
            # diffusers' own converter names SDXL / SD UNet keys; its alpha (= rank) is replaced below.
            from diffusers.utils import convert_state_dict_to_kohya

            peft_state = {f"unet.{m}.{p}": t for m, parts in modules.items() for p, t in parts.items()
                          if p != "lora_magnitude_vector"}
            named = convert_state_dict_to_kohya(peft_state)
            for key, tensor in named.items():
                if key.endswith(".alpha"):
                    continue
                out[key] = tensor.contiguous()
            for module in modules:
                name = _kohya_name(prefix, module)
                if f"{name}.lora_down.weight" not in out:
                    raise PeftpickError(f"diffusers' convert_state_dict_to_kohya named {module} differently than "
                                        "expected", "report this; the SDXL key form may have changed")
        else:
            for module, parts in modules.items():
                name = _kohya_name(prefix, module)
                out[f"{name}.lora_down.weight"] = parts["lora_A.weight"].contiguous()
                out[f"{name}.lora_up.weight"] = parts["lora_B.weight"].contiguous()
        for module, parts in modules.items():
            name = _kohya_name(prefix, module)
            out[f"{name}.alpha"] = torch.tensor(alphas[module], dtype=torch.float32)
            if "lora_magnitude_vector" in parts:
                out[f"{name}.dora_scale"] = parts["lora_magnitude_vector"].reshape(-1, 1).contiguous()
        module_kind = "networks.lora"

    elif peft_type == "LOHA":
        params = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
        modules = _group(state, params)
        for module, parts in sorted(modules.items()):
            name = _kohya_name(prefix, module)
            for param, tensor in parts.items():
                out[f"{name}.{param}"] = tensor.contiguous()
            rank = int(parts["hada_w1_b"].shape[0])  # ComfyUI loha.py / Forge: alpha / w1b.shape[0]
            alphas[module] = lycoris_scale(config, module) * rank
            out[f"{name}.alpha"] = torch.tensor(alphas[module], dtype=torch.float32)
        module_kind = "lycoris.kohya"

    else:  # LOKR
        params = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        modules = _group(state, params)
        for module, parts in sorted(modules.items()):
            name = _kohya_name(prefix, module)
            scale = lycoris_scale(config, module)
            parts = dict(parts)
            # Bake PEFT's scale into w1 (kron is bilinear), then write alpha = the rank the tools divide by.
            first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
            parts[first] = parts[first] * scale
            for param, tensor in parts.items():
                out[f"{name}.{param}"] = tensor.contiguous()
            dims = [int(parts[p].shape[0]) for p in ("lokr_w1_b", "lokr_w2_b") if p in parts]
            if len(set(dims)) > 1:
                raise PeftpickError(f"module {module}: LoKr factors of different ranks {dims}",
                                    "the tools read one rank per module; merge the adapter instead")
            if dims:
                alphas[module] = float(dims[0])
                out[f"{name}.alpha"] = torch.tensor(float(dims[0]), dtype=torch.float32)
            else:
                alphas[module] = 0.0  # no alpha: the tools apply scale 1, and the scale is baked in
        notes.append("PEFT's alpha / r is baked into lokr_w1; .alpha equals the factors' rank (scale 1)")
        module_kind = "lycoris.kohya"

    ranks = sorted({int(v) for v in alphas.values()}) if peft_type == "LOKR" else []
    metadata = {"ss_network_module": module_kind, "peftpick_from_peft_type": peft_type,
                "peftpick_family": family, "peftpick_key_prefix": prefix}
    if ranks:
        metadata["peftpick_lokr_ranks"] = ",".join(map(str, ranks))
    target = Path(out_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target), metadata=metadata)
    return WrittenAdapter(target, "kohya", peft_type, len(out), len(alphas), prefix, alphas, metadata, tuple(notes))
