"""Diffusion denoiser registry, model resolution and meta-device building.

`resolve_denoiser` turns a bundled denoiser name / alias / hub id, or a local diffusers folder, into a
`peftpick.types.Architecture` whose `denoiser` field holds the training facts (latents, text inputs, objective)
and whose `config` is the diffusers config `build_denoiser` builds the model from. It answers None for anything
that is not a denoiser, so `architectures.resolve_model` falls back to causal LMs.

The bundled registry (`data/denoisers.json`) holds, per model, the diffusers config with the repository, path and
commit it was taken from, the Denoiser facts with their sources, and the published parameter count; tests build
every config on the meta device and compare. Nothing is cached at module level: `load_denoiser_registry()` reads
the file each time. Name lookups need no diffusers; reading a folder's config defaults and building do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import Architecture, Denoiser

from .architectures import Registry, normalize_model_name

DATA_FILE = "denoisers.json"
_COMPONENTS = ("transformer", "unet")  # model_index.json keys that hold the denoiser, in diffusers' spelling


# --------------------------------------------------------------------------------------------- class layouts


@dataclass(frozen=True)
class _Layout:
    """How the figures of one diffusers denoiser class follow from its config."""

    layer_keys: tuple[str, ...]  # config keys that count its transformer blocks (FLUX: double, then single)
    text_key: str  # config key of the text-embedding width it attends to
    pack: int = 1  # latents per token side the pipeline packs before the transformer (FLUX: 2 x 2)
    mlp_ratio: float = 4.0  # MLP width / hidden size where the config has no mlp_ratio or ffn_dim
    unet: bool = False


# The classes the registry holds. A folder of another class is refused: its block layout and training facts
# (latents, text inputs) are unknown to peftpick, and guessing them would give wrong memory figures.
_LAYOUTS: Mapping[str, _Layout] = {
    "Flux2Transformer2DModel": _Layout(("num_layers", "num_single_layers"), "joint_attention_dim", pack=2,
                                       mlp_ratio=3.0),
    "FluxTransformer2DModel": _Layout(("num_layers", "num_single_layers"), "joint_attention_dim", pack=2),
    "HunyuanVideoTransformer3DModel": _Layout(("num_layers", "num_single_layers"), "text_embed_dim"),
    "SD3Transformer2DModel": _Layout(("num_layers",), "joint_attention_dim"),
    "QwenImageTransformer2DModel": _Layout(("num_layers",), "joint_attention_dim", pack=2),
    "WanTransformer3DModel": _Layout(("num_layers",), "text_dim"),
    "LTXVideoTransformer3DModel": _Layout(("num_layers",), "caption_channels"),
    "CogView4Transformer2DModel": _Layout(("num_layers",), "text_embed_dim"),
    "SanaTransformer2DModel": _Layout(("num_layers",), "caption_channels", mlp_ratio=2.5),
    "UNet2DConditionModel": _Layout((), "cross_attention_dim", unet=True),
}

# Config keys that decide parameter shapes; a local config matches a registry entry when all of them agree
# (after filling in the class defaults), whatever its rope, epsilon or metadata keys say.
_MATCH_KEYS = (
    "in_channels", "out_channels", "num_layers", "num_single_layers", "num_refiner_layers", "num_attention_heads",
    "attention_head_dim", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "mlp_ratio", "ffn_dim",
    "text_dim", "text_embed_dim", "cross_attention_dim", "caption_channels", "caption_projection_dim",
    "dual_attention_layers", "num_cross_attention_heads", "cross_attention_head_dim", "block_out_channels",
    "transformer_layers_per_block", "layers_per_block", "down_block_types", "up_block_types", "patch_size",
    "patch_size_t", "time_embed_dim", "condition_dim", "pos_embed_max_size", "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


def known_denoiser_classes() -> tuple[str, ...]:
    return tuple(_LAYOUTS)


def _layout_of(class_name: str, where: str) -> _Layout:
    layout = _LAYOUTS.get(class_name)
    if layout is None:
        raise PeftpickError(
            f"{where} has _class_name {class_name!r}, which is not a diffusion denoiser peftpick knows",
            f"peftpick knows {', '.join(_LAYOUTS)}; pass one of those (or a bundled name: `peftpick models`)",
        )
    return layout


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DenoiserEntry:
    """One bundled denoiser: its diffusers config, training facts and where they came from.

    Shaped like `architectures.RegistryEntry` where the two overlap (name, display_name, family, hub_id,
    aliases, published_params), so `peftpick models` can list both registries.
    """

    name: str
    display_name: str
    family: str
    hub_id: str
    aliases: tuple[str, ...]
    diffusers_class: str
    config: Mapping[str, Any] = field(repr=False)
    denoiser: Denoiser = field(repr=False)
    dtype: str
    source: Mapping[str, str] = field(repr=False)
    checked: str = ""
    published_params: int | None = None
    published_params_source: str | None = None
    published_params_tolerance: float = 0.02  # relative; the published figure is often a rounded name ("12B")
    published_params_includes_buffers: bool = False  # SD3's published totals count its pos_embed buffer
    dtype_source: str = ""
    facts_sources: Mapping[str, str] = field(default_factory=dict, repr=False)
    notes: str | None = None

    @property
    def model_type(self) -> str:
        return self.diffusers_class

    @property
    def source_url(self) -> str:
        """One line naming the config's source, in the LM registry's field name."""
        commit = self.source.get("commit", "")
        at = f" @{commit}" if commit else ""
        return f"{self.source.get('repo', '')} {self.source.get('path', '')}{at}".strip()

    def lookup_keys(self) -> set[str]:
        """Every spelling that should find this entry, normalised with `normalize_model_name`."""
        spellings = {self.name, self.display_name, self.hub_id, self.hub_id.split("/", 1)[-1], *self.aliases}
        return {normalize_model_name(spelling) for spelling in spellings}


def _denoiser_from_json(raw: Mapping[str, Any], family: str, diffusers_class: str) -> Denoiser:
    facts = dict(raw)
    facts["text_encoders"] = tuple((str(name), int(params)) for name, params in facts.get("text_encoders", ()))
    return Denoiser(family=family, diffusers_class=diffusers_class, **facts)


def _entry_from_json(raw: Mapping[str, Any], data_file: str) -> DenoiserEntry:
    try:
        family, diffusers_class = raw["family"], raw["diffusers_class"]
        return DenoiserEntry(
            name=raw["name"],
            display_name=raw.get("display_name", raw["name"]),
            family=family,
            hub_id=raw["hub_id"],
            aliases=tuple(raw.get("aliases", ())),
            diffusers_class=diffusers_class,
            config=dict(raw["config"]),
            denoiser=_denoiser_from_json(raw["denoiser"], family, diffusers_class),
            dtype=raw.get("dtype", "bfloat16"),
            source=dict(raw["source"]),
            checked=raw.get("checked", ""),
            published_params=raw.get("published_params"),
            published_params_source=raw.get("published_params_source"),
            published_params_tolerance=float(raw.get("published_params_tolerance", 0.02)),
            published_params_includes_buffers=bool(raw.get("published_params_includes_buffers", False)),
            dtype_source=raw.get("dtype_source", ""),
            facts_sources=dict(raw.get("facts_sources", {})),
            notes=raw.get("notes") or None,
        )
    except KeyError as missing:
        raise ValueError(f"{data_file}: entry {raw.get('name', '?')!r} lacks {missing}") from None
    except TypeError as error:  # a Denoiser field the dataclass does not have, or one missing
        raise ValueError(f"{data_file}: entry {raw.get('name', '?')!r} has bad denoiser facts ({error})") from None


def load_denoiser_registry(data_dir: Path | None = None) -> Registry:
    """Read `denoisers.json` from `data_dir`, or the copy bundled with peftpick.

    The result is the LM registry's `Registry` type (lookup by name / alias / hub id, closest names) holding
    `DenoiserEntry` items.
    """
    if data_dir is None:
        data_file = resources.files("peftpick.knowledge") / "data" / DATA_FILE
    else:
        data_file = Path(data_dir) / DATA_FILE
    document = json.loads(data_file.read_text(encoding="utf-8"))
    return Registry(tuple(_entry_from_json(raw, str(data_file)) for raw in document["models"]))


# --------------------------------------------------------------------------------------------- figures


def _as_list(value: Any, length: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * length


def _unet_figures(config: Mapping[str, Any]) -> dict[str, int]:
    """UNet figures at its widest level; num_layers counts its Transformer2DModel blocks."""
    widths = list(config["block_out_channels"])
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    per_block = _as_list(config.get("layers_per_block", 2), len(down))
    # Down blocks hold layers_per_block attentions, up blocks one more, the cross-attention mid block one.
    count = sum(n for kind, n in zip(down, per_block) if "CrossAttn" in kind)
    count += sum(n + 1 for kind, n in zip(up, reversed(per_block)) if "CrossAttn" in kind)
    if "CrossAttn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        count += 1
    # diffusers names the SDXL head count attention_head_dim when num_attention_heads is unset.
    heads_per_level = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    level = widths.index(max(widths))
    heads = int(_as_list(heads_per_level, len(widths))[level])
    hidden = int(max(widths))
    return {"hidden_size": hidden, "num_layers": count, "num_heads": heads, "head_dim": hidden // heads,
            "intermediate_size": 4 * hidden}  # BasicTransformerBlock's feed-forward is 4 x wide


def denoiser_figures(class_name: str, config: Mapping[str, Any]) -> dict[str, int]:
    """hidden_size (heads x head size), num_layers (transformer blocks), num_heads, head_dim, intermediate_size."""
    layout = _layout_of(class_name, f"a {class_name} config")
    if layout.unet:
        return _unet_figures(config)
    heads = int(config["num_attention_heads"])
    head_dim = int(config["attention_head_dim"])
    hidden = heads * head_dim
    if config.get("ffn_dim"):
        intermediate = int(config["ffn_dim"])
    else:
        intermediate = int(hidden * float(config.get("mlp_ratio") or layout.mlp_ratio))
    layers = sum(int(config.get(key) or 0) for key in layout.layer_keys)
    return {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "head_dim": head_dim,
            "intermediate_size": intermediate}


def _architecture(name: str, class_name: str, config: Mapping[str, Any], denoiser: Denoiser, dtype: str,
                  source: str, hub_id: str | None = None, local_path: str | None = None) -> Architecture:
    figures = denoiser_figures(class_name, config)
    return Architecture(
        name=name,
        model_type=class_name,
        hidden_size=figures["hidden_size"],
        num_layers=figures["num_layers"],
        num_heads=figures["num_heads"],
        num_kv_heads=figures["num_heads"],
        head_dim=figures["head_dim"],
        intermediate_size=figures["intermediate_size"],
        vocab_size=0,
        tie_word_embeddings=False,
        dtype=dtype,
        source=source,
        hub_id=hub_id,
        local_path=local_path,
        config=dict(config),
        denoiser=denoiser,
    )


def architecture_from_entry(entry: DenoiserEntry) -> Architecture:
    return _architecture(entry.name, entry.diffusers_class, entry.config, entry.denoiser, entry.dtype,
                         source=f"bundled denoiser registry (config: {entry.source_url})", hub_id=entry.hub_id)


# --------------------------------------------------------------------------------------------- resolution


def _diffusers(why: str) -> Any:
    try:
        import diffusers
    except ImportError:
        raise PeftpickError(f"{why} needs the diffusers package", "pip install diffusers") from None
    return diffusers


def _read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from `file`; one-line PeftpickErrors for unreadable, malformed or non-object files."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PeftpickError(
            f"{what} at {file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})",
            "fix the file, or download it again from the model's hub repository",
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PeftpickError(f"cannot read {what} at {file} ({error})", "check the path and its permissions") from None
    except (ValueError, RecursionError) as error:  # a number too long for int(), nesting too deep
        reason = ' '.join(str(error).split(';')[0].split())[:160]
        raise PeftpickError(f"{what} at {file} cannot be read as JSON ({reason})",
                            "fix the file, or download it again from the model's hub repository") from None
    if not isinstance(raw, dict):
        raise PeftpickError(f"{what} at {file} is not a JSON object", "use the file from the model's hub repository")
    return raw


def _peek_class_name(config_file: Path) -> str | None:
    """The `_class_name` of a config.json, or None when it has none or is not readable JSON: such a file is not
    a diffusers config as far as peftpick can tell, and the language-model reader reports its problems."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: undecodable bytes, bad JSON, a too-long number
        return None
    value = raw.get("_class_name") if isinstance(raw, dict) else None
    return str(value) if value else None


def _class_defaults(class_name: str) -> dict[str, Any]:
    cls = getattr(_diffusers("reading a diffusers config"), class_name)
    return {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def _normalised(value: Any) -> Any:
    return [_normalised(item) for item in value] if isinstance(value, (list, tuple)) else value


def _shape_keys(class_name: str, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **config}
    return {key: _normalised(merged.get(key)) for key in _MATCH_KEYS if key in defaults or key in config}


def _matching_entry(class_name: str, config: Mapping[str, Any], registry: Registry) -> DenoiserEntry | None:
    defaults = _class_defaults(class_name)
    wanted = _shape_keys(class_name, config, defaults)
    for entry in registry:
        if entry.diffusers_class == class_name and _shape_keys(class_name, entry.config, defaults) == wanted:
            return entry
    return None


def _derived_denoiser(class_name: str, config: Mapping[str, Any], registry: Registry, where: str,
                      pipeline_class: str | None) -> tuple[Denoiser, str, str]:
    """Denoiser facts for a config no bundled entry matches, from a bundled entry of the same class.

    Latent channels and text width come from the config; the objective, VAE and text-length facts from the
    template entry, which is only safe while the latent channels agree (another VAE would change the tokens).
    """
    templates = [entry for entry in registry if entry.diffusers_class == class_name]
    if not templates:
        raise PeftpickError(f"{where} is a {class_name}, and no bundled model of that class gives its training facts",
                            "pass a bundled name (`peftpick models` lists them)")
    layout = _LAYOUTS[class_name]
    merged = {**_class_defaults(class_name), **config}
    channels = int(merged.get("out_channels") or merged["in_channels"]) // (layout.pack * layout.pack)
    template = next((entry for entry in templates if entry.denoiser.latent_channels == channels), None)
    if template is None:
        known = sorted({entry.denoiser.latent_channels for entry in templates})
        raise PeftpickError(
            f"{where} is a {class_name} with {channels} latent channels, and the bundled {class_name} models have "
            f"{', '.join(map(str, known))}: its VAE and token count are unknown",
            "pass a bundled name (`peftpick models` lists them) or a folder of one of those models",
        )
    base = template.denoiser
    pooled = int(merged.get("pooled_projection_dim") or 0) if base.pooled_dim and not layout.unet else base.pooled_dim
    guidance = merged.get("guidance_embeds")
    denoiser = Denoiser(
        family=base.family, diffusers_class=class_name, objective=base.objective, latent_channels=channels,
        vae_scale=base.vae_scale, patch=base.patch, text_dim=int(merged.get(layout.text_key) or base.text_dim),
        text_len=base.text_len, pipeline_class=pipeline_class or base.pipeline_class, vae_temporal=base.vae_temporal,
        pooled_dim=pooled, guidance=base.guidance if guidance is None else bool(guidance),
        added_time_ids=base.added_time_ids, text_encoders=(),  # another size usually has another text encoder
        vae_params=base.vae_params, default_resolution=base.default_resolution, default_frames=base.default_frames,
    )
    note = (f"no bundled model has this config; objective, VAE and text length taken from {template.name} "
            "(same class and latent channels), text encoders unknown")
    return denoiser, template.dtype, note


def _component_config(folder: Path) -> tuple[Path, str | None, str | None]:
    """The denoiser config.json of a diffusers pipeline folder, its pipeline class and a note on extra experts."""
    index = _read_json(folder / "model_index.json", "model_index.json")
    pipeline_class = index.get("_class_name")
    component = next((name for name in _COMPONENTS if _names_component(index, name)), None)
    if component is None:
        raise PeftpickError(
            f"model_index.json at {folder} names no transformer or unet",
            "pass the folder of a diffusion pipeline whose model_index.json lists its transformer or unet "
            "(or that component folder itself)",
        )
    config_file = folder / component / "config.json"
    if not config_file.is_file():
        raise PeftpickError(
            f"{component}/config.json is missing in {folder}",
            f"download it (e.g. `hf download <repo id> {component}/config.json --local-dir {folder}`)",
        )
    # Wan 2.2 A14B carries a second expert of the same config; one is trained at a time.
    extra = None
    if _names_component(index, "transformer_2"):
        extra = "model_index.json also names transformer_2 (a second expert of the same size): figures are for one"
    return config_file, str(pipeline_class) if pipeline_class else None, extra


def _names_component(index: Mapping[str, Any], name: str) -> bool:
    """model_index.json lists `name` as ["library", "Class"]; optional components are [null, null]."""
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and bool(value[1])


def _local_name(config_file: Path) -> str:
    folder = config_file.parent
    if folder.name in _COMPONENTS and folder.parent.name:
        return folder.parent.name
    return folder.name or str(folder)


def _read_denoiser_config(config_file: Path, registry: Registry, pipeline_class: str | None = None,
                          note: str | None = None) -> Architecture:
    where = f"{config_file.parent.name}/config.json at {config_file.parent}"
    raw = _read_json(config_file, f"{config_file.parent.name}/config.json")
    class_name = raw.get("_class_name")
    if not class_name:
        raise PeftpickError(f"{where} has no _class_name",
                            "use the denoiser's config.json from the model's hub repository (diffusers writes it)")
    _layout_of(str(class_name), where)
    config = {key: value for key, value in raw.items() if not key.startswith("_")}
    entry = _matching_entry(str(class_name), config, registry)
    if entry is not None:
        denoiser, dtype = entry.denoiser, entry.dtype
        if pipeline_class and pipeline_class != denoiser.pipeline_class:
            denoiser = dataclasses.replace(denoiser, pipeline_class=pipeline_class)
        facts = f"training facts of the bundled {entry.name} (same class and shape config)"
    else:
        denoiser, dtype, facts = _derived_denoiser(str(class_name), config, registry, where, pipeline_class)
    parts = [f"local diffusers config at {config_file}", facts, note]
    return _architecture(_local_name(config_file), str(class_name), config, denoiser, dtype,
                         source="; ".join(part for part in parts if part),
                         hub_id=entry.hub_id if entry is not None else None, local_path=str(config_file.parent))


def _resolve_local(path: Path, registry: Registry) -> Architecture | None:
    """A diffusers pipeline folder, component folder or config file; None when `path` is none of those."""
    if path.is_file():
        if path.name == "model_index.json":
            config_file, pipeline_class, note = _component_config(path.parent)
            return _read_denoiser_config(config_file, registry, pipeline_class, note)
        if path.suffix == ".json" and _peek_class_name(path):
            return _read_denoiser_config(path, registry)
        return None
    if (path / "model_index.json").is_file():
        config_file, pipeline_class, note = _component_config(path)
        return _read_denoiser_config(config_file, registry, pipeline_class, note)
    if (path / "config.json").is_file() and _peek_class_name(path / "config.json"):
        return _read_denoiser_config(path / "config.json", registry)
    return None


def resolve_denoiser(spec: Any, registry: Registry | None = None, cache: Any = None) -> Architecture | None:
    """Architecture of a diffusion denoiser, or None when `spec` names none (then it may be a causal LM).

    `spec`: a bundled name, alias or hub id (case and separators ignored), a diffusers pipeline folder (its
    model_index.json names the transformer/ or unet/ component), such a component folder, or its config.json.
    A local config takes its training facts from the bundled entry of the same class and shape keys.
    `cache` (a disk_cache.JsonTable): a bundled entry's facts (parameter count, layer tables) are kept there, so
    that a later run needs no meta build, and so neither torch nor diffusers, to choose targets.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = os.fspath(spec).strip()
    if not text:
        return None
    registry = registry if registry is not None else load_denoiser_registry()
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_local(path, registry)
    entry = registry.lookup(text)
    if entry is None:
        return None
    arch = architecture_from_entry(entry)
    return _with_cached_facts(arch, entry, cache) if cache is not None else arch


def _with_cached_facts(arch: Architecture, entry: DenoiserEntry, cache: Any) -> Architecture:
    from .denoiser_targets import layer_facts

    key, parts = cache.key({"denoiser entry": {"name": entry.name, "class": entry.diffusers_class,
                                               "config": dict(entry.config), "dtype": entry.dtype,
                                               "source_url": entry.source_url}, "layout": 1})
    stored = cache.get(key)
    if not (isinstance(stored, dict) and "parameter_count" in stored):
        # in the JSON form a later run reads back, so that both key and trace the same architecture
        stored = json.loads(json.dumps({"parameter_count": count_denoiser_parameters(arch), **layer_facts(arch)}))
        cache.put(key, stored, parts, entry.name)
    return dataclasses.replace(arch, facts=stored)


# --------------------------------------------------------------------------------------------- building


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise PeftpickError(f"unknown dtype {dtype!r}", "use bfloat16, float16 or float32")
    return value


def _scaled_counts(counts: list[int], total: int) -> list[int]:
    """`total` blocks shared among block kinds in proportion to `counts`, at least 2 of each (both kinds stay)."""
    first = max(2, round(total * counts[0] / sum(counts)))
    return [min(counts[0], first), min(counts[1], max(2, total - first))]


def shrunk_config(arch: Architecture, num_layers: int) -> dict[str, Any]:
    """`arch.config` with about `num_layers` transformer blocks, keeping every block kind.

    FLUX-style models keep double and single blocks in proportion (at least 2 each); SD3.5 Medium keeps some
    dual-attention blocks and some plain ones. A UNet is returned whole: its levels differ, so fewer blocks would
    not be a smaller copy of the same model.
    """
    if num_layers < 1:
        raise PeftpickError(f"cannot build {arch.name} with {num_layers} blocks", "pass num_layers >= 1")
    config = dict(arch.config)
    layout = _layout_of(arch.model_type, f"architecture {arch.name}")
    keys = [key for key in layout.layer_keys if config.get(key)]
    if layout.unet or not keys:
        return config
    counts = [int(config[key]) for key in keys]
    if num_layers >= sum(counts):
        return config
    new_counts = _scaled_counts(counts, num_layers) if len(keys) == 2 else [num_layers]
    config.update(zip(keys, new_counts))
    dual = config.get("dual_attention_layers")
    if isinstance(dual, (list, tuple)) and dual:
        layers, new_layers = counts[0], new_counts[0]
        kept = max(1, round(new_layers * len(dual) / layers))
        if len(dual) < layers and new_layers >= 2:
            kept = min(kept, new_layers - 1)  # keep a block without the second attention too
        config["dual_attention_layers"] = sorted(dual)[:kept]
    return config


def checked_geometry(arch: Architecture, resolution: int | None, frames: int | None) -> tuple[int, int | None]:
    """The training resolution and clip length for `arch` (its defaults where None), or the PeftpickError of a
    value the model cannot take: a resolution that is not a multiple of the latent patch, frames that the video
    VAE cannot pack, frames for an image model. The one place both the recommender and the probes check them."""
    denoiser = arch.denoiser
    if denoiser is None:
        raise PeftpickError(f"{arch.name} is not a diffusion denoiser", "--resolution and --frames are for image models")
    step = denoiser.vae_scale * denoiser.patch
    resolution = resolution or denoiser.default_resolution
    if resolution % step:
        lower, upper = resolution // step * step, (resolution // step + 1) * step
        raise PeftpickError(f"--resolution {resolution} is not a multiple of {arch.name}'s latent patch ({step} "
                            f"pixels: VAE /{denoiser.vae_scale}, patch {denoiser.patch})",
                            f"pass e.g. --resolution {lower or upper} or {upper}")
    if denoiser.vae_temporal:
        frames = frames or denoiser.default_frames or 1
        if (frames - 1) % denoiser.vae_temporal:
            near = (frames - 1) // denoiser.vae_temporal * denoiser.vae_temporal + 1
            raise PeftpickError(f"--frames {frames} does not fit {arch.name}'s VAE, which packs {denoiser.vae_temporal} "
                                f"frames per latent frame after the first",
                                f"pass e.g. --frames {near} or {near + denoiser.vae_temporal}")
    elif frames is not None:
        raise PeftpickError(f"--frames is for video models, and {arch.name} is an image model", "drop --frames")
    return resolution, frames


def build_denoiser(arch: Architecture, device: Any = "meta", dtype: Any = None, num_layers: int | None = None) -> Any:
    """The diffusers model of `arch` (`from_config`), on the meta device by default without initialising weights.

    `num_layers` builds fewer blocks for tracing (see `shrunk_config`); the dtype defaults to `arch.dtype`.
    """
    import torch

    if arch.denoiser is None:
        raise PeftpickError(f"{arch.name} is not a diffusion denoiser", "build causal LMs with build_model")
    diffusers = _diffusers(f"building {arch.name}")
    cls = getattr(diffusers, arch.denoiser.diffusers_class, None)
    if cls is None:
        raise PeftpickError(f"diffusers {diffusers.__version__} has no {arch.denoiser.diffusers_class}",
                            "upgrade diffusers")
    config = shrunk_config(arch, num_layers) if num_layers is not None else dict(arch.config)
    on_meta = torch.device(device).type == "meta"
    # Initialising weights on meta only costs time (there are no values to fill).
    skip_init = diffusers.models.modeling_utils.no_init_weights() if on_meta else contextlib.nullcontext()
    with torch.device(device), skip_init:
        model = cls.from_config(config)
    cast_like_pretrained(model, _torch_dtype(dtype or arch.dtype))
    return model


def cast_like_pretrained(model: Any, dtype: Any) -> None:
    """Cast like `from_pretrained(torch_dtype=...)`: the class's `_keep_in_fp32_modules` (Wan's time embedder and
    norms, ...) stay float32 under a half dtype, as they are when the real weights load."""
    import torch

    half = dtype in (torch.float16, torch.bfloat16)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if half else set()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                wanted = torch.float32 if keep & set(name.split(".")) else dtype
                if tensor.dtype != wanted:
                    tensor.data = tensor.data.to(wanted)


def count_denoiser_parameters(arch: Architecture, buffers: bool = False) -> int:
    """Parameters of the full denoiser (plus persistent-buffer values when `buffers`), from a meta build (or the
    count `arch.facts` holds)."""
    if not buffers and "parameter_count" in arch.facts:
        return int(arch.facts["parameter_count"])
    model = build_denoiser(arch)
    total = sum(parameter.numel() for parameter in model.parameters())
    if buffers:
        total += sum(buffer.numel() for buffer in model.buffers())
    return total
