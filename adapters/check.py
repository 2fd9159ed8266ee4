"""Does a serving stack load a saved adapter as it is? `check_adapter` answers from the adapter's files.

It reads adapter_config.json and the safetensors header (no tensor data), checks that config and tensors belong
together (and, given the base model, that the tensors fit it), describes the adapter as a `Candidate` and asks
the one place that decides serving, `knowledge.serving.serving_verdict`. Where the engine itself is installed
here (vLLM), its own validation runs too, in a child process; when the two disagree, the engine's word wins and
the report says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftpick.adapters.convert import method_label
from peftpick.adapters.engines import EngineVerdict, validate_with_engine
from peftpick.adapters.files import SavedAdapter, read_adapter, split_tensor_name
from peftpick.errors import PeftpickError
from peftpick.types import Candidate, ServingVerdict

# Keys of adapter_config.json that say where or when it was saved, not what the adapter is.
_BOOKKEEPING = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                          "revision", "inference_mode"})


@dataclass(frozen=True)
class AdapterCheck:
    """The answer of `check_adapter`. `loads_as_is` is the final word (the engine's, when it ran)."""

    adapter: SavedAdapter
    method: str  # "PiSSA", "rsLoRA", "LoHa" ...
    stack: str  # the stack's display name
    installed: str | None  # the stack's version here, None when not installed
    verdict: ServingVerdict  # peftpick's verdict from the knowledge base
    loads_as_is: bool
    fix: tuple[str, ...]  # commands that make it loadable (convert / merge), empty when it loads as is
    engine: EngineVerdict | None  # the engine's own validation, when it ran
    agreement: str  # "agree", "disagree" or "engine not run"
    notes: tuple[str, ...] = ()
    rank: int | None = None
    target_modules: tuple[str, ...] = field(default_factory=tuple)


def _leaf_name(path: str) -> str:
    """A module's name without its block path: "transformer_blocks.0.attn.to_out.0" -> "to_out.0" (a layer that
    sits in a ModuleList keeps its list's name, as PEFT target names do)."""
    parts = path.split(".")
    keep = 2 if len(parts) > 1 and parts[-1].isdigit() else 1
    return ".".join(parts[-keep:])


def adapter_candidate(adapter: SavedAdapter) -> Candidate:
    """The adapter as a Candidate: its config's settings, with targets and rank as the tensors show them."""
    from peftpick.methods import METHODS

    kwargs = {key: value for key, value in adapter.config.items() if key not in _BOOKKEEPING}
    modules = adapter_modules(adapter)
    if modules:
        kwargs["target_modules"] = sorted({_leaf_name(module) for module in modules})
    ranks = adapter.lora_ranks()
    if ranks:
        kwargs["r"] = max(ranks.values())
        kwargs.pop("rank_pattern", None)
    label = method_label(adapter.config)
    key = next((spec.key for spec in METHODS if spec.display_name == label), label.lower())
    return Candidate(method=key, display_name=label, peft_type=adapter.peft_type,
                     peft_config_class=adapter.config_class, peft_kwargs=kwargs)


def adapter_modules(adapter: SavedAdapter) -> list[str]:
    """Paths of the modules that carry adapter weights (LoRA factors, or any method's per-layer tensors)."""
    modules = []
    for tensor in adapter.tensors:
        kind, module = split_tensor_name(tensor.name)
        if kind in ("lora_A", "lora_embedding_A"):
            modules.append(module)
    return list(dict.fromkeys(modules))


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    # PEFT's get_pattern_key: a key matches a module name it ends (at a '.' boundary); the first match wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _check_consistency(adapter: SavedAdapter) -> list[str]:
    """Errors between adapter_config.json and the saved tensors (a config that belongs to other weights)."""
    if adapter.peft_type != "LORA":
        return []
    config = adapter.config
    problems = []
    for module, rank in adapter.lora_ranks().items():
        expected = _pattern_value(config.get("rank_pattern") or {}, module) or config.get("r", 8)
        if rank != expected:
            problems.append(f"adapter_config.json gives {module} rank {expected}, but its lora_A tensor has rank {rank}")
    return problems


def _base_modules(arch: Any) -> dict[str, Any]:
    """Module path -> module of `arch`, built on the meta device (no memory)."""
    from peftpick.workloads import workload_of

    return dict(workload_of(arch).hook("build_model")(arch, device="meta").named_modules())


def _architecture_problems(adapter: SavedAdapter, arch: Any, modules: Mapping[str, Any]) -> list[str]:
    """Tensors that do not fit `arch` (missing modules, other widths): the adapter belongs to another model."""
    import torch

    problems = []
    for tensor in adapter.tensors:
        kind, module_path = split_tensor_name(tensor.name)
        if kind == "other":
            continue
        module = modules.get(module_path)
        if module is None:
            problems.append(f"{arch.name} has no module {module_path}")
            continue
        shape = tensor.shape
        if isinstance(module, torch.nn.Linear) and len(shape) == 2:
            if kind == "lora_A" and shape[1] != module.in_features:
                problems.append(f"{module_path} takes {module.in_features} inputs in {arch.name}, the adapter's "
                                f"lora_A has {shape[1]}")
            if kind == "lora_B" and shape[0] != module.out_features:
                problems.append(f"{module_path} gives {module.out_features} outputs in {arch.name}, the adapter's "
                                f"lora_B has {shape[0]}")
        if isinstance(module, torch.nn.Embedding) and kind == "lora_embedding_A" and shape[-1] != module.num_embeddings:
            problems.append(f"{module_path} has {module.num_embeddings} rows in {arch.name}, the adapter's "
                            f"lora_embedding_A has {shape[-1]}")
        if len(problems) >= 3:
            break
    return problems


def _unmergeable(adapter: SavedAdapter, arch: Any, modules: Mapping[str, Any]) -> str | None:
    """Why PEFT could not merge this adapter into `arch`, where the base decides it: a LoRA bias needs a bias in
    the base layer (PEFT: "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias")."""
    if adapter.peft_type != "LORA" or not adapter.config.get("lora_bias"):
        return None
    without = sorted({_leaf_name(path) for path in adapter_modules(adapter)
                      if path in modules and getattr(modules[path], "bias", None) is None})
    if not without:
        return None
    return f"lora_bias needs a bias in the base layer, and {', '.join(without)} of {arch.name} have none"


def _resolve_base(adapter: SavedAdapter, base: str | None):
    """The Architecture of `base`, else of the adapter's base_model_name_or_path when it resolves offline."""
    from peftpick.knowledge.architectures import load_registry, resolve_model

    if base:
        return resolve_model(base)
    named = adapter.base_model
    if not named:
        return None
    if Path(named).is_dir():
        try:
            return resolve_model(named)
        except PeftpickError:
            return None
    entry = load_registry().lookup(named)
    return resolve_model(entry.name) if entry is not None else None


def check_adapter(path: Path | str, serve: str, *, multi_adapter: bool = False, base: str | None = None,
                  run_engine: bool = True, kb: Any = None) -> AdapterCheck:
    """Whether `serve` loads the adapter at `path` as it is, with the launch commands or the fix.

    Bad input (missing folder, malformed config or weights, an adapter that does not fit `base`) raises
    PeftpickError. `run_engine`: also run the engine's own validation when the engine is installed here.
    """
    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge import ImageLaunchArgs, ImageTool
    from peftpick.knowledge.serving import LaunchArgs, installed_version

    kb = kb or KnowledgeBase.load()
    stack = kb.stack(serve)
    if stack is None:
        raise PeftpickError("`peftpick check` needs a serving stack", f"pass --serve {'/'.join(sorted(kb.serving))}")
    adapter = read_adapter(path)
    problems = _check_consistency(adapter)
    if problems:
        raise PeftpickError(f"{adapter.path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                                 else ""),
                            "the config does not belong to these weights; re-save the adapter with save_pretrained")
    notes = []
    arch = _resolve_base(adapter, base)
    modules = _base_modules(arch) if arch is not None else {}
    if arch is not None:
        mismatch = _architecture_problems(adapter, arch, modules)
        if mismatch:
            raise PeftpickError(f"{adapter.path} is an adapter for another architecture than {arch.name}: "
                                + "; ".join(mismatch), "pass the base model it was trained on with --base")
    else:
        notes.append("architecture not checked: pass --base MODEL to check the tensors against the base model")
    candidate = adapter_candidate(adapter)
    unmergeable = _unmergeable(adapter, arch, modules) if arch is not None else None
    installed = installed_version(stack)
    base_words = base or adapter.base_model or "BASE_MODEL"
    family = None
    if isinstance(stack, ImageTool):
        if arch is None or arch.denoiser is None:
            raise PeftpickError(f"{stack.display_name} loads image-model adapters, and the base of {adapter.path} is "
                                "not known to be one", "pass --base with the diffusion model it was trained on")
        denoiser = arch.denoiser
        family = denoiser.family
        launch_args = ImageLaunchArgs(base=base_words, adapter=str(adapter.path), name=_adapter_name(adapter.path),
                                      pipeline=denoiser.pipeline_class or "DiffusionPipeline",
                                      denoiser_class=denoiser.diffusers_class,
                                      component="unet" if denoiser.diffusers_class.startswith("UNet") else "transformer")
    else:
        launch_args = LaunchArgs(base=base_words, adapter=str(adapter.path), name=_adapter_name(adapter.path))
    verdict = kb.serving_verdict(stack.name, candidate, multi_adapter, installed=installed, launch_args=launch_args,
                                 unmergeable=unmergeable, family=family)
    ours = verdict.route == "native"
    fix = _fix_commands(adapter, verdict, base_words, multi_adapter)
    base_dir = arch.local_path if arch is not None else None
    engine = None
    if run_engine and installed and not isinstance(stack, ImageTool):
        rank_limit = stack.rank_limit_for(candidate.rank or 8) or stack.largest_rank or 8
        engine = validate_with_engine(stack.name, adapter, rank_limit, base_dir)
    if engine is None:
        agreement, loads = "engine not run", ours
    elif engine.accepts == ours:
        agreement, loads = "agree", ours
    else:
        agreement, loads = "disagree", engine.accepts
        if engine.accepts and not ours:
            notes.append(f"peftpick's facts say {stack.display_name} does not load it as it is, but the installed "
                         f"{engine.engine} accepts it: the engine's word counts (the facts may be out of date, or "
                         "the adapter loads but is served at the wrong scale or on the wrong base: "
                         + verdict.reason + ")")
        else:
            notes.append(f"peftpick's facts say {stack.display_name} loads it as it is, but the installed "
                         f"{engine.engine} refuses it: the engine's word counts")
    ranks = adapter.lora_ranks()
    return AdapterCheck(adapter=adapter, method=candidate.display_name, stack=stack.display_name, installed=installed,
                        verdict=verdict, loads_as_is=loads, fix=() if loads else fix, engine=engine,
                        agreement=agreement, notes=tuple(notes), rank=max(ranks.values()) if ranks else None,
                        target_modules=tuple(candidate.peft_kwargs.get("target_modules") or ()))


def _adapter_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.resolve().name).strip("-.")
    return name or "adapter"


def _fix_commands(adapter: SavedAdapter, verdict: ServingVerdict, base: str, multi_adapter: bool) -> tuple[str, ...]:
    """The peftpick commands of the verdict's route, then the launch commands of their result."""
    source = str(adapter.path)
    out = f"{source.rstrip('/')}-{'lora' if verdict.route == 'convert' else 'merged'}"
    image_format = next((fmt for fmt in ("kohya", "diffusers") if fmt in (verdict.conversion or "")), None)
    if verdict.route == "convert" and image_format is not None:
        steps = (verdict.conversion or "").split("+")
        rank = " --rank R" if "svd" in steps else ""
        target = f"{source.rstrip('/')}-{image_format}" + (".safetensors" if image_format == "kohya" else "")
        first = f"peftpick convert {source} --format {image_format}{rank} --base {base} -o {target}"
        # the tool's load step names the file the convert step writes
        return (first, *(command.replace("CONVERTED_DIR", target).replace("ADAPTER.safetensors", target)
                         for command in verdict.launch))
    if verdict.route == "convert":
        if verdict.conversion == "rescale":
            first = f"peftpick convert {source} --to lora -o {out}"
        elif verdict.conversion == "initial-model":
            first = f"peftpick convert {source} --to lora --base {base} -o {out}"
        else:
            first = f"peftpick convert {source} --to lora --rank R --base {base} -o {out}"
        launch = tuple(command.replace(source, out) for command in verdict.launch)
        return (first, *launch)
    if verdict.route == "merge":
        first = f"peftpick merge {source} --base {base} -o {out}"
        return (first, *(command.replace("MERGED_MODEL_DIR", out) for command in verdict.launch))
    return ()
