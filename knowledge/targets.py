"""Which modules an adapter targets, per architecture.

peftpick's method catalogue names targets by role: "q", "k", "v", "o" (attention projections), "gate", "up",
"down" (MLP projections), and the shortcuts "attn_qv", "attn", "mlp" and "all-linear". This module finds the
module names that play each role in a given architecture by building one decoder layer on the meta device and
reading its Linear (and transformers Conv1D) modules, so new families work without a table per model. Only the
leaf-name vocabulary below is hand-written, because a name like `c_proj` or `gate` cannot tell its role alone.

Targets are returned as the suffixes PEFT's `target_modules` matches (`key == t or key.endswith("." + t)`), the
shortest that picks exactly the intended modules in a layer: "q_proj", but "attn.c_proj" / "mlp.c_proj" for
GPT-2, whose attention output and MLP down projection share the leaf name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from peftpick.errors import PeftpickError
from peftpick.types import Architecture

from .architectures import build_model

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
SHORTCUTS: dict[str, tuple[str, ...]] = {
    "attn_qv": ("q", "v"),
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
}
ALL_LINEAR = "all-linear"

# Leaf names whose role does not depend on where they sit.
_ROLES_BY_LEAF: dict[str, tuple[str, ...]] = {
    "q_proj": ("q",), "query": ("q",), "wq": ("q",),
    "k_proj": ("k",), "key": ("k",), "wk": ("k",),
    "v_proj": ("v",), "value": ("v",), "wv": ("v",),
    "o_proj": ("o",), "out_proj": ("o",), "wo": ("o",),
    "qkv_proj": ("q", "k", "v"), "c_attn": ("q", "k", "v"), "query_key_value": ("q", "k", "v"),
    "wqkv": ("q", "k", "v"), "w_pack": ("q", "k", "v"),
    "kv_proj": ("k", "v"),
    "gate_proj": ("gate",),
    "up_proj": ("up",), "c_fc": ("up",), "fc1": ("up",), "fc_in": ("up",), "dense_h_to_4h": ("up",),
    "down_proj": ("down",), "fc2": ("down",), "fc_out": ("down",), "dense_4h_to_h": ("down",),
    "gate_up_proj": ("gate", "up"),
}
# Leaf names whose role depends on the block: GPT-2's c_proj is attention output in `attn`, down projection in
# `mlp`; Phi-2's `dense` is the attention output; `w1`/`w3`/`w2` are gate/up/down in Llama-style MLPs.
_ROLES_BY_BLOCK: dict[tuple[str, str], tuple[str, ...]] = {
    ("attention", "c_proj"): ("o",), ("attention", "dense"): ("o",),
    ("mlp", "c_proj"): ("down",), ("mlp", "w1"): ("gate",), ("mlp", "w3"): ("up",), ("mlp", "w2"): ("down",),
}
_ROUTER_LEAVES = {"gate", "router", "shared_expert_gate", "wg"}


@dataclass(frozen=True)
class LinearModule:
    """A linear projection inside one decoder layer."""

    path: str  # inside the layer, e.g. "self_attn.q_proj"
    target: str  # shortest suffix PEFT matches uniquely within the layer, e.g. "q_proj" or "attn.c_proj"
    roles: tuple[str, ...]  # e.g. ("q", "k", "v") for a fused projection; () when the name tells no role
    in_features: int
    out_features: int
    kind: str  # "Linear" or "Conv1D"
    is_router: bool = False  # MoE routing layer: never an adapter target
    in_experts: bool = False  # one expert of a mixture of experts: not a dense role

    @property
    def fused(self) -> bool:
        return len(self.roles) > 1

    @property
    def targetable(self) -> bool:
        return not self.is_router and not self.in_experts


@dataclass(frozen=True)
class TargetResolution:
    """PEFT `target_modules` for some roles on one architecture, and what the user should know about them."""

    modules: list[str]
    notes: list[str]
    roles_covered: tuple[str, ...] = ()  # every role the adapter touches, fused neighbours included
    fan_in_fan_out: bool = False  # True when targets are transformers Conv1D (GPT-2): LoraConfig needs it
    # PEFT `target_parameters`: fused mixture-of-experts weights (e.g. "mlp.experts.gate_up_proj"); only filled when
    # resolve_targets is asked for them (experts=True)
    parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertParameter:
    """A fused 3-D mixture-of-experts weight in one decoder layer (all experts of one projection in one tensor)."""

    path: str  # inside the layer, e.g. "mlp.experts.gate_up_proj"; PEFT target_parameters matches it as a suffix
    roles: tuple[str, ...]  # ("gate", "up") for gate_up_proj, ("down",) for down_proj; () when the name tells none
    shape: tuple[int, ...]  # (experts, in, out) or (experts, out, in), as the family stores it


def _block_of(path: str) -> str | None:
    parts = [part.lower() for part in path.split(".")[:-1]]
    if any("attn" in part or "attention" in part for part in parts):
        return "attention"
    if any(part in {"mlp", "ffn", "feed_forward", "feedforward", "block_sparse_moe", "moe"} for part in parts):
        return "mlp"
    return None


def _roles_of(path: str) -> tuple[str, ...]:
    leaf = path.rsplit(".", 1)[-1]
    block = _block_of(path)
    if block is not None and (block, leaf) in _ROLES_BY_BLOCK:
        return _ROLES_BY_BLOCK[(block, leaf)]
    return _ROLES_BY_LEAF.get(leaf.lower(), ())


def _shortest_unique_suffix(path: str, all_paths: list[str]) -> str:
    parts = path.split(".")
    for start in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[start:])
        clashes = [other for other in all_paths if other != path and (other == suffix or other.endswith("." + suffix))]
        if not clashes:
            return suffix
    return path


def decoder_layer_modules(arch: Architecture) -> list[LinearModule]:
    """The linear projections of the first decoder layer of `arch`, in module order.

    Built from a one-layer model on the meta device. Routers of mixture-of-experts blocks and per-expert linears
    are listed but flagged; transformers 5 keeps most experts as fused 3-D parameters, which are not listed here
    (see `expert_parameter_names`).
    """
    if "layer_modules" in arch.facts:  # worked out by an earlier run (knowledge.architectures.with_facts)
        return [LinearModule(**{**fields, "roles": tuple(fields["roles"])}) for fields in arch.facts["layer_modules"]]
    import torch
    from transformers.pytorch_utils import Conv1D

    model = build_model(arch, device="meta", num_layers=1)
    layer_prefix = _first_layer_prefix(model)
    layer = model.get_submodule(layer_prefix)
    found: list[tuple[str, torch.nn.Module]] = [
        (name, module) for name, module in layer.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))
    ]
    paths = [name for name, _ in found]
    modules = []
    for path, module in found:
        if isinstance(module, Conv1D):
            in_features, out_features, kind = module.weight.shape[0], module.weight.shape[1], "Conv1D"
        else:
            in_features, out_features, kind = module.in_features, module.out_features, "Linear"
        parts = path.split(".")
        in_experts = any(part in {"experts", "expert"} for part in parts[:-1])
        is_router = parts[-1] in _ROUTER_LEAVES and (arch.num_experts > 0 or out_features in {1, arch.num_experts})
        modules.append(LinearModule(
            path=path,
            target=_shortest_unique_suffix(path, paths),
            roles=() if is_router or in_experts else _roles_of(path),
            in_features=int(in_features),
            out_features=int(out_features),
            kind=kind,
            is_router=is_router,
            in_experts=in_experts,
        ))
    return modules


def _first_layer_prefix(model) -> str:
    """Name of the first decoder layer: element 0 of the first ModuleList whose elements hold linear layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            first = module[0]
            if any(isinstance(child, (torch.nn.Linear, Conv1D)) for child in first.modules()):
                return f"{name}.0"
    raise PeftpickError(
        f"cannot find the decoder layers of {type(model).__name__}",
        "peftpick supports transformers causal LMs whose layers sit in a ModuleList",
    )


def expert_parameters(arch: Architecture) -> list[ExpertParameter]:
    """The fused mixture-of-experts weights of the first decoder layer that holds experts, with their roles.

    transformers 5 stores the experts of Mixtral, Qwen3-MoE, gpt-oss, Llama 4 ... as 3-D nn.Parameters
    (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`); PEFT reaches these through LoraConfig's
    `target_parameters`, not `target_modules`. Dense models give [].
    """
    if not arch.num_experts:
        return []
    if "expert_parameters" in arch.facts:
        return [ExpertParameter(path=fields["path"], roles=tuple(fields["roles"]), shape=tuple(fields["shape"]))
                for fields in arch.facts["expert_parameters"]]
    model = build_model(arch, device="meta", num_layers=1)
    layer = model.get_submodule(_first_layer_prefix(model))
    found = []
    for name, parameter in layer.named_parameters():
        parts = name.split(".")
        if parameter.dim() != 3 or not any("expert" in part for part in parts[:-1]):
            continue
        found.append(ExpertParameter(path=name, roles=_ROLES_BY_LEAF.get(parts[-1].lower(), ()),
                                     shape=tuple(int(d) for d in parameter.shape)))
    return found


def expert_parameter_names(arch: Architecture) -> list[str]:
    """Paths of the fused mixture-of-experts weights in one layer (e.g. "mlp.experts.gate_up_proj")."""
    return [parameter.path for parameter in expert_parameters(arch)]


def linear_module_names(arch: Architecture) -> dict[str, list[str]]:
    """Role -> PEFT target names present in `arch` (roles absent from the architecture are left out).

    A fused projection is listed under each role it computes: Phi-3's `qkv_proj` under q, k and v.
    """
    names: dict[str, list[str]] = {}
    for module in decoder_layer_modules(arch):
        for role in module.roles:
            names.setdefault(role, [])
            if module.target not in names[role]:
                names[role].append(module.target)
    return {role: names[role] for role in ROLES if role in names}


def _describe_layout(modules: list[LinearModule]) -> str:
    parts = [f"{','.join(m.roles)} ({m.target})" for m in modules if m.targetable and m.roles]
    return "; ".join(parts) if parts else "no projections with a known role"


def _fusion_note(arch: Architecture, module: LinearModule, requested: set[str]) -> str | None:
    extra = [role for role in module.roles if role not in requested]
    if not extra:
        return None
    *first, last = module.roles
    joined = f"{', '.join(first)} and {last}"
    return f"{arch.name} fuses {joined} into {module.target}: the adapter covers {', '.join(extra)} too"


def resolve_targets(arch: Architecture, roles: str | Iterable[str], method: str | None = None,
                    experts: bool = False, experts_unsupported: str | None = None) -> TargetResolution:
    """PEFT target module names for `roles` (roles and shortcuts) on `arch`.

    Explicit roles must exist in the architecture; a shortcut ("attn", "mlp", "attn_qv") takes the roles the
    architecture has and notes the ones it lacks. "all-linear" lists every linear projection of the decoder
    layers by name (never lm_head, embeddings or MoE routers), which also serving engines accept.

    `experts=True` (a method whose PEFT config can take `target_parameters`: LoRA) also resolves the MLP roles on a
    mixture of experts whose weights are fused 3-D parameters, into `TargetResolution.parameters`; all-linear then
    includes them. `experts_unsupported` is the reason a method cannot, stated where the experts are left out.
    """
    requested_roles = [roles] if isinstance(roles, str) else list(roles)
    who = method or "this method"
    if not requested_roles:
        raise PeftpickError(f"{who} names no target roles", f"use some of {', '.join(ROLES)}, or a shortcut")
    modules = decoder_layer_modules(arch)
    notes: list[str] = []

    explicit: list[str] = []
    from_shortcuts: list[str] = []
    wants_all_linear = False
    for role in requested_roles:
        if role == ALL_LINEAR:
            wants_all_linear = True
        elif role in SHORTCUTS:
            from_shortcuts.extend(SHORTCUTS[role])
        elif role in ROLES:
            explicit.append(role)
        else:
            raise PeftpickError(
                f"unknown target role {role!r} for {who}",
                f"use one of {', '.join(ROLES)} or the shortcuts {', '.join(SHORTCUTS)}, {ALL_LINEAR}",
            )

    present = {role for module in modules if module.targetable for role in module.roles}
    has_expert_linears = any(m.in_experts for m in modules)
    # transformers 5 stores most experts as 3-D parameters rather than Linear modules; name them in errors.
    fused = expert_parameters(arch) if arch.num_experts and not has_expert_linears else []
    fused_experts = [p.path for p in fused]
    reachable = fused if experts else []  # expert weights this method targets through target_parameters
    expert_roles = {role for p in reachable for role in p.roles}

    def absent_reason(role: str) -> str:
        if set(role.split("/")) <= set(SHORTCUTS["mlp"]) and arch.num_experts:
            where = ", ".join(fused_experts) if fused_experts else "per-expert linears"
            reach = (f"{who} cannot reach them ({experts_unsupported}); target attention roles, or use LoRA, "
                     "which reaches the experts with PEFT target_parameters" if experts_unsupported else
                     "target attention roles, or reach the experts with PEFT target_parameters")
            return (f"its MLP is a mixture of {arch.num_experts} experts ({where}) with a router, not a dense "
                    f"{role} projection; {reach}")
        return f"its layers have {_describe_layout(modules)}"

    for role in explicit:
        if role not in present and role not in expert_roles:
            raise PeftpickError(f"{who} cannot target {role} on {arch.model_type}", absent_reason(role))

    chosen: list[LinearModule]
    chosen_parameters: list[ExpertParameter] = []
    if wants_all_linear:
        chosen = [m for m in modules if m.targetable]
        chosen_parameters = list(reachable)
        if not chosen and not chosen_parameters:
            raise PeftpickError(f"{who} finds no linear layers to target on {arch.model_type}", absent_reason("q"))
        excluded = ["lm_head", "embeddings"]
        if any(m.is_router for m in modules) or arch.num_experts:
            excluded.append("MoE routers" if chosen_parameters else "MoE routers and experts")
        notes.append(f"all-linear: {len(chosen)} linear projections per decoder layer; "
                     f"{', '.join(excluded)} are not targeted")
        if fused and not chosen_parameters and experts_unsupported:
            notes.append(f"{who} cannot reach the {arch.num_experts} fused experts per layer "
                         f"({', '.join(fused_experts)}): {experts_unsupported}")
        wanted = set(ROLES)
    else:
        missing_from_shortcuts = [role for role in dict.fromkeys(from_shortcuts)
                                  if role not in present and role not in expert_roles]
        wanted = set(explicit) | {role for role in from_shortcuts if role in present or role in expert_roles}
        if not wanted:
            raise PeftpickError(
                f"{who} cannot target {', '.join(requested_roles)} on {arch.model_type}",
                absent_reason(missing_from_shortcuts[0] if missing_from_shortcuts else requested_roles[0]),
            )
        moe_missing = [role for role in missing_from_shortcuts if role in SHORTCUTS["mlp"] and arch.num_experts]
        if moe_missing:  # one note for the whole expert MLP rather than one per role
            notes.append(f"{arch.model_type} has no dense {', '.join(moe_missing)} projection: "
                         f"{absent_reason('/'.join(moe_missing))}")
        for role in missing_from_shortcuts:
            if role not in moe_missing:
                notes.append(f"{arch.model_type} has no {role} projection: {absent_reason(role)}")
        chosen = [m for m in modules if m.targetable and set(m.roles) & wanted]
        chosen_parameters = [p for p in reachable if set(p.roles) & wanted]
        for module in chosen:
            note = _fusion_note(arch, module, wanted)
            if note:
                notes.append(note)
        for parameter in chosen_parameters:
            extra = [role for role in parameter.roles if role not in wanted]
            if extra:
                notes.append(f"{arch.name} fuses {' and '.join(parameter.roles)} of its experts into "
                             f"{parameter.path}: the adapter covers {', '.join(extra)} too")
    if chosen_parameters:
        notes.append(
            f"the {arch.num_experts} experts per layer are fused 3-D weights "
            f"({', '.join(p.path for p in chosen_parameters)}): targeted with PEFT target_parameters, whose "
            f"lora_A / lora_B hold r x {arch.num_experts} rows (one rank-r update per expert); PEFT then requires "
            "lora_dropout 0 and no DoRA")

    targets = list(dict.fromkeys(m.target for m in chosen))
    covered = tuple(role for role in ROLES
                    if any(role in m.roles for m in chosen) or any(role in p.roles for p in chosen_parameters))
    conv1d = any(m.kind == "Conv1D" for m in chosen)
    if conv1d:
        notes.append(f"{arch.model_type} stores these projections as transformers Conv1D (weights transposed): "
                     "set fan_in_fan_out=True in the adapter config")
    return TargetResolution(modules=targets, notes=notes, roles_covered=covered, fan_in_fan_out=conv1d,
                            parameters=tuple(p.path for p in chosen_parameters))


def _peft_mapping(kind: str):
    from peft.utils import constants

    return getattr(constants, f"TRANSFORMERS_MODELS_TO_{kind}_MAPPING", None)


def _peft_type_name(peft_type) -> str:
    # PeftType values are spelled like "LN_TUNING"; PEFT's constants drop the underscore ("LNTUNING").
    return str(getattr(peft_type, "value", peft_type)).upper().replace("_", "").replace("-", "")


def peft_default_targets(arch: Architecture, peft_type) -> list[str] | None:
    """PEFT's own default `target_modules` for `peft_type` on this model type, or None where PEFT has none.

    Read from `peft.utils.constants` (TRANSFORMERS_MODELS_TO_<TYPE>_TARGET_MODULES_MAPPING), as PEFT states them;
    `missing_targets` tells whether they still match modules in the installed transformers.
    """
    mapping = _peft_mapping(f"{_peft_type_name(peft_type)}_TARGET_MODULES")
    if mapping is None or arch.model_type not in mapping:
        return None
    return list(mapping[arch.model_type])


def peft_default_feedforward_modules(arch: Architecture) -> list[str] | None:
    """PEFT's default IA3 `feedforward_modules` for this model type, or None."""
    mapping = _peft_mapping("IA3_FEEDFORWARD_MODULES")
    if mapping is None or arch.model_type not in mapping:
        return None
    return list(mapping[arch.model_type])


def missing_targets(arch: Architecture, targets: Iterable[str]) -> list[str]:
    """Target names that match no linear module in a decoder layer of `arch` (PEFT would reject them)."""
    paths = [module.path for module in decoder_layer_modules(arch)]
    return [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
