"""Which layers of a diffusion denoiser an adapter targets, by role.

PEFT's image-generation suite trains FLUX.2-klein-base-4B with `target_modules` add_k_proj|add_q_proj|add_v_proj|
linear_in|linear_out|to_add_out|to_k|to_out.0|to_q|to_qkv_mlp_proj|to_v: the attention projections of the image
and text streams, the feed-forward input and output of both streams, and the single blocks' fused qkv+mlp input
projection. peftpick names those parts by role and finds the modules that play each role in any registry family
by building the model on the meta device and reading its Linear / Conv2d modules:

| role | what | examples |
|---|---|---|
| attn | self-attention q, k, v, out (image, joint or text-refiner stream) | to_q, to_out.0, attn1.to_q |
| context_attn | text-stream side of joint attention; cross-attention to the text | add_q_proj, to_add_out, attn2.to_k |
| mlp | feed-forward input and output, both streams | linear_in, ff.net.2, ffn.net.0.proj, proj_mlp |
| fused | FLUX.2 single blocks' fused qkv + mlp input projection | to_qkv_mlp_proj |
| fused_out | single-stream blocks' fused attention-out + mlp-down projection | single attn.to_out, single proj_out |
| proj | UNet Transformer2DModel input / output projections | proj_in, proj_out |
| conv | UNet resnet convolutions | conv1, conv2 |

The default roles (attn, context_attn, mlp, fused) are the suite's set. `fused_out` is not in it: the suite's
"to_out.0" does not match FLUX.2's single-block `to_out` (a bare Linear, not a list), so the suite never trains
it, and the FLUX.1 / HunyuanVideo equivalent is left out to match. Timestep / guidance / text embedders,
modulation (AdaLN `norm*.linear`, `img_mod`), patch embedding and the final projection are never targets: the
suite leaves them out and they are neither attention nor feed-forward (they sit outside the blocks or feed scale
and shift vectors).

Paths (`LinearModule.path`) are relative to the model, in the first block of each block list
("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"); a UNet lists the first
instance of each distinct layer shape. `LinearModule.target` is the shortest suffix PEFT matches
(`key == t or key.endswith("." + t)`) that reaches that layer in every block and nothing of another role; where
no such suffix exists (FLUX.1's single-block proj_out shares its name with the final projection) it is the full
path, and `resolve_denoiser_targets` lists the path of every block. `resolve_denoiser_targets` returns exactly the
targets of the selected layers, so `layer.target in resolution.modules` picks them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import Architecture

from .denoisers import build_denoiser
from .targets import LinearModule, TargetResolution

DENOISER_ROLES: tuple[str, ...] = ("attn", "context_attn", "mlp", "fused", "fused_out", "proj", "conv")
DEFAULT_ROLES: tuple[str, ...] = ("attn", "context_attn", "mlp", "fused")
# The suite's targets (huggingface/peft method_comparison/image-gen, every adapter run on FLUX.2-klein-base-4B).
SUITE_TARGET_MODULES: tuple[str, ...] = ("add_k_proj", "add_q_proj", "add_v_proj", "linear_in", "linear_out",
                                         "to_add_out", "to_k", "to_out.0", "to_q", "to_qkv_mlp_proj", "to_v")

_ROLE_WORDS = {
    "attn": "self-attention projections",
    "context_attn": "text-stream or cross-attention projections",
    "mlp": "feed-forward projections",
    "fused": "fused qkv+mlp projections (a FLUX.2 single-block design)",
    "fused_out": "single-stream fused output projections",
    "proj": "UNet transformer proj_in / proj_out",
    "conv": "UNet resnet convolutions",
}
_FF_PARTS = {"ff", "ff_context", "ffn", "img_mlp", "txt_mlp", "mlp", "feed_forward"}
# Path parts that name nothing by themselves (FeedForward's Sequential and GELU's projection): a target starting
# there ("net.2", "proj") would be correct but unreadable, so targets start at the part that names the block.
_GENERIC_PARTS = {"net", "proj"}
_INDEX = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True)
class _Layer:
    path: str
    roles: tuple[str, ...]
    in_features: int
    out_features: int
    kind: str  # "Linear" or "Conv2d"


def _attention_roles(parts: list[str], model: Any) -> tuple[str, ...]:
    leaf = parts[-1]
    owner = parts[:-2] if leaf.isdigit() else parts[:-1]  # the attention module (to_out.0 sits one deeper)
    attention = model.get_submodule(".".join(owner))
    if "token_refiner" in parts:
        # HunyuanVideo's text token refiner is plain self-attention and shares the main blocks' names (to_q,
        # to_out.0): as "attn" one target reaches both, as the suite's names would.
        return ("attn",)
    if leaf == "to_out" and hasattr(attention, "to_qkv_mlp_proj"):
        return ("fused_out",)  # FLUX.2 single blocks: attention output and MLP down projection in one Linear
    # attn2 is cross-attention, except SD3.5 Medium's second self-attention (is_cross_attention False).
    if owner[-1] == "attn2" and getattr(attention, "is_cross_attention", True) is not False:
        return ("context_attn",)
    return ("attn",)


def _roles_of(path: str, module: Any, model: Any, block_lists: set[str]) -> tuple[str, ...]:
    """The role of one Linear / Conv2d, () for layers that are never targets."""
    import torch

    parts = path.split(".")
    in_block = parts[0] in block_lists or "token_refiner" in parts
    if not in_block:
        return ()  # embedders, patch embedding, final norm and projection
    if any(part.startswith("norm") or part.endswith("_mod") for part in parts[:-1]):
        return ()  # AdaLN modulation: scale / shift from the timestep embedding
    leaf = parts[-1]
    if leaf in {"time_emb_proj", "conv_shortcut"} or "downsamplers" in parts or "upsamplers" in parts:
        return ()  # timestep injection into resnets, skip and resampling convolutions
    if leaf in {"to_q", "to_k", "to_v", "to_out"} or (leaf.isdigit() and parts[-2] == "to_out"):
        return _attention_roles(parts, model)
    if leaf in {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}:
        return ("context_attn",)
    if leaf == "to_qkv_mlp_proj":
        return ("fused",)
    if leaf == "proj_mlp":
        return ("mlp",)  # FLUX.1 / HunyuanVideo single blocks: the MLP input beside separate q, k, v
    if leaf in {"proj_in", "proj_out"}:
        return ("proj",) if "attentions" in parts else ("fused_out",) if leaf == "proj_out" else ()
    if any(part in _FF_PARTS for part in parts[:-1]):
        if isinstance(module, torch.nn.Linear):
            return ("mlp",)
        # Sana's feed-forward is convolutional: its 1x1 convolutions are the FF input and output; the depthwise
        # 3x3 between them mixes neighbouring tokens and is left alone.
        if tuple(module.kernel_size) == (1, 1) and module.groups == 1:
            return ("mlp",)
        return ()
    if "resnets" in parts and leaf in {"conv1", "conv2"}:
        return ("conv",)
    return ()


def _layers(model: Any) -> list[_Layer]:
    import torch

    block_lists = {name for name, child in model.named_children() if isinstance(child, torch.nn.ModuleList)}
    block_lists.add("mid_block")
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shape, kind = (module.in_features, module.out_features), "Linear"
        elif isinstance(module, torch.nn.Conv2d):
            shape, kind = (module.in_channels, module.out_channels), "Conv2d"
        else:
            continue
        layers.append(_Layer(path, _roles_of(path, module, model, block_lists), int(shape[0]), int(shape[1]), kind))
    return layers


def _targets(model: Any, layers: list[_Layer]) -> dict[str, str]:
    """PEFT target name of every layer with a role: the shortest readable suffix that matches only layers of
    the same role (never a container, an embedder or a layer of another role)."""
    keys = [name for name, _ in model.named_modules()]
    group_of = {layer.path: layer.roles for layer in layers if layer.roles}
    valid: dict[tuple[str, tuple[str, ...]], bool] = {}

    def only_group(suffix: str, roles: tuple[str, ...]) -> bool:
        if (suffix, roles) not in valid:
            valid[(suffix, roles)] = all(
                group_of.get(key) == roles for key in keys if key == suffix or key.endswith("." + suffix))
        return valid[(suffix, roles)]

    names = {}
    for path, roles in group_of.items():
        parts = path.split(".")
        names[path] = path
        for start in range(len(parts) - 1, -1, -1):
            if parts[start].isdigit() or parts[start] in _GENERIC_PARTS:
                continue
            suffix = ".".join(parts[start:])
            if only_group(suffix, roles):
                names[path] = suffix
                break
    return names


# Blocks built for reading layer names and roles: every block list keeps at least two blocks (and SD3's
# dual-attention blocks one of each kind), which names every distinct layer; a full 4B build takes 10x longer.
_ANALYSIS_LAYERS = 4


def analysis_model(arch: Architecture) -> Any:
    """The denoiser of `arch` with a few blocks of each kind, on meta: enough to read every layer's name and roles
    (pass it as `model` with `shrunk=True` to the functions below to build it once for several calls)."""
    return _model_of(arch, None)


def layer_source(arch: Architecture) -> Any:
    """What the functions below should read `arch`'s layers from, as their `model`: None where `arch.facts`
    holds them (no build, no torch), else `analysis_model(arch)`."""
    return None if _FACTS in arch.facts else analysis_model(arch)


def _model_of(arch: Architecture, model: Any | None, full: bool = False) -> Any:
    if arch.denoiser is None:
        raise PeftpickError(f"{arch.name} is not a diffusion denoiser", "use knowledge.targets for causal LMs")
    if model is not None:
        return model
    return build_denoiser(arch) if full else build_denoiser(arch, num_layers=_ANALYSIS_LAYERS)


# The layer tables `layer_facts` works out, as `Architecture.facts` keys: the analysis build's, and (only where
# some layer can be named by nothing shorter than its path in each block) the full build's.
_FACTS, _FULL_FACTS = "denoiser_layers", "denoiser_layers_full"


def _table(model: Any) -> tuple[list[_Layer], dict[str, str]]:
    layers = _layers(model)
    return layers, _targets(model, layers)


def _named_by_path(layers: Iterable[_Layer], names: dict[str, str]) -> bool:
    return any(names[layer.path] == layer.path and _INDEX.search(layer.path) for layer in layers if layer.roles)


def _layer_table(arch: Architecture, model: Any | None, full: bool = False) -> tuple[list[_Layer], dict[str, str]]:
    """The layers and PEFT target names of `model`; else of `arch`'s analysis (or `full`) build, read from
    `arch.facts` where they are there, built otherwise."""
    if model is None and arch.denoiser is not None:
        stored = arch.facts.get(_FULL_FACTS if full else _FACTS)
        if stored is not None:
            layers = [_Layer(**{**row, "roles": tuple(row["roles"])}) for row in stored["layers"]]
            return layers, dict(stored["names"])
    return _table(_model_of(arch, model, full=full))


def layer_facts(arch: Architecture) -> dict[str, Any]:
    """`arch`'s layer tables in the JSON form `Architecture.facts` keeps (knowledge.denoisers caches them with
    the parameter count, so that a later run chooses targets without importing torch or diffusers)."""
    def as_json(layers, names):
        return {"layers": [dataclasses.asdict(layer) for layer in layers], "names": names}

    layers, names = _table(analysis_model(arch))
    facts = {_FACTS: as_json(layers, names)}
    if _named_by_path(layers, names):
        facts[_FULL_FACTS] = as_json(*_table(_model_of(arch, None, full=True)))
    return facts


def denoiser_layer_modules(arch: Architecture, model: Any | None = None) -> list[LinearModule]:
    """The targetable Linear / Conv2d layers of `arch` with their roles, one per distinct layer.

    Read from `model` (the same denoiser built already), else from `arch.facts`, else from a meta build. Layers
    that are never targets (embedders, modulation, final projection) are not listed.
    """
    layers, names = _layer_table(arch, model)
    seen: set[tuple[str, str, int, int]] = set()
    modules = []
    for layer in layers:
        key = (_INDEX.sub(".N", layer.path), layer.kind, layer.in_features, layer.out_features)
        if not layer.roles or key in seen:
            continue
        seen.add(key)
        modules.append(LinearModule(path=layer.path, target=names[layer.path], roles=layer.roles,
                                    in_features=layer.in_features, out_features=layer.out_features, kind=layer.kind))
    return modules


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resolve_denoiser_targets(arch: Architecture, roles: str | Iterable[str] = DEFAULT_ROLES,
                             include_conv: bool = False, model: Any | None = None,
                             shrunk: bool = False) -> TargetResolution:
    """PEFT `target_modules` for `roles` (DENOISER_ROLES) on `arch`, with notes for the user.

    The defaults are the PEFT image suite's set; `include_conv` adds the UNet resnet convolutions. Roles the
    family lacks are noted (Wan has no fused projection), an unknown role or a selection with no layer is a
    PeftpickError. `model` skips the meta build when the caller has built the denoiser already (`shrunk`: it is
    `analysis_model(arch)`, so the full model is built where a layer must be named by each block's path); without
    it the layers come from `arch.facts` where they are there.
    """
    named = [roles] if isinstance(roles, str) else list(roles)
    unknown = [role for role in named if role not in DENOISER_ROLES]
    if unknown:
        raise PeftpickError(f"unknown denoiser target role(s) {', '.join(map(repr, unknown))}",
                            f"use some of {', '.join(DENOISER_ROLES)}")
    # include_conv means "convolutions too, where the model has them": no note when it has none.
    requested = [*named, "conv"] if include_conv and "conv" not in named else named
    if not requested:
        raise PeftpickError("no denoiser target roles given", f"use some of {', '.join(DEFAULT_ROLES)}")
    layers, names = _layer_table(arch, model)
    chosen = [layer for layer in layers if set(layer.roles) & set(requested)]
    if (model is None or shrunk) and _named_by_path(chosen, names):
        # some layer can only be named by its full path: list every block's
        layers, names = _layer_table(arch, None, full=True)
        chosen = [layer for layer in layers if set(layer.roles) & set(requested)]
    present = {role for layer in layers for role in layer.roles}
    if not chosen:
        has = ", ".join(role for role in DENOISER_ROLES if role in present) or "none"
        raise PeftpickError(f"{arch.name} has no {', '.join(requested)} layers", f"its blocks have roles: {has}")
    modules = sorted(dict.fromkeys(names[layer.path] for layer in chosen), key=_natural)
    notes = [f"{arch.name} has no {_ROLE_WORDS[role]}" for role in named if role not in present]
    left_out = [role for role in ("fused_out", "proj", "conv") if role in present and role not in requested]
    hints = {"fused_out": "role 'fused_out' adds the single-stream output projections (the PEFT image suite leaves "
                          "FLUX.2's out)",
             "proj": "role 'proj' adds the UNet transformers' proj_in / proj_out",
             "conv": "include_conv=True adds the UNet resnet conv1 / conv2"}
    notes += [hints[role] for role in left_out]
    per_block = {layer.path for layer in chosen if names[layer.path] == layer.path}
    if per_block:
        notes.append(f"{len(per_block)} targets name single blocks: no shorter name reaches those layers without "
                     "also reaching a layer of another role")
    if any(layer.kind == "Conv2d" for layer in chosen):
        notes.append("some targets are Conv2d layers: the adapter type must support convolutions")
    if any("token_refiner" in layer.path for layer in chosen):
        notes.append("the names also reach the text token refiner's attention and feed-forward (HunyuanVideo)")
    covered = tuple(role for role in DENOISER_ROLES if any(role in layer.roles for layer in chosen))
    return TargetResolution(modules=modules, notes=notes, roles_covered=covered, fan_in_fan_out=False)
