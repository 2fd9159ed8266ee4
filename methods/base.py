"""The shape every catalogue entry shares: a `MethodSpec` that turns a benchmark run into a `Candidate`.

A spec names one run of PEFT's MetaMathQA comparison suite (Llama-3.2-3B). Its candidate for an architecture takes
the run's stored PEFT config and training settings from the knowledge base, converts the run's Llama target names
to roles and resolves them for that architecture, and then lets the method's own module fix the settings that
depend on layer widths (block sizes, shard sizes ...). Subclasses override only the hooks (`_fit_to_architecture`,
`_uses_targets`), the way PEFT's tuners share one `BaseTuner` and differ in their layers.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from peftpick.errors import PeftpickError
from peftpick.types import Architecture, Candidate
from peftpick.workloads import DENOISER, workload_of

if TYPE_CHECKING:
    import pandas as pd

    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge.targets import LinearModule

BENCHMARK = "MetaMathQA"
Optimizer = Literal["adamw", "lora-fa"]

# Keys that say where or when a config was saved, or that `Candidate.peft_config` sets itself. The knowledge base
# already drops them; dropping them again keeps a hand-edited table from breaking `peft_config()`.
_BOOKKEEPING_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "megatron_core",
})
ALL_LINEAR_ROLE = "all-linear"  # knowledge.targets.ALL_LINEAR, without importing it at module load
# The suite's optimizer_type spellings -> Candidate.optimizer.
_OPTIMIZERS: Mapping[str, Optimizer] = MappingProxyType({"adamw": "adamw", "lora-fa": "lora-fa", "lorafa": "lora-fa"})


class ArchitectureNotSupported(PeftpickError):
    """The method cannot be applied to this architecture (`candidates_for` turns it into an Exclusion)."""


@dataclass(frozen=True)
class BuildContext:
    """What a spec's hooks need to know about one build: the architecture, the targeted layers, the run."""

    arch: Architecture
    reference_arch: Architecture  # the model the benchmark run trained (Llama-3.2-3B)
    layers: tuple[LinearModule, ...]  # targeted linear projections of one decoder layer of `arch`
    run: pd.Series


@dataclass(frozen=True)
class MethodSpec:
    """One catalogue entry. `candidate()` gives its concrete settings for an architecture."""

    key: str  # catalogue key, e.g. "rslora"
    display_name: str  # e.g. "rsLoRA"
    peft_type: str | None  # PEFT's PeftType name as the capability table spells it; None for full fine-tuning
    config_class: str | None  # e.g. "LoraConfig"; None for full fine-tuning
    family: str  # the PEFT tuner package it comes from: "lora", "oft", "prompt_tuning" ...
    summary: str  # one line for people: what the method does
    benchmark_run: str | None  # MetaMathQA experiment the settings come from; None when the suite has no run
    optimizer: Optimizer = "adamw"
    aliases: tuple[str, ...] = ()
    # Run whose settings are borrowed when the method has none of its own (PiSSA, OLoRA use LoRA r32's).
    settings_run: str | None = None
    # Settings that make the method what it is on top of the borrowed run, e.g. (("init_lora_weights", "pissa"),).
    fixed_settings: tuple[tuple[str, Any], ...] = ()
    # The suite's `variant` value of this method's runs (None: every run of peft_type is this method's).
    run_variant: str | None = None
    # Why `benchmark_run` is not the method's highest-scoring run; empty when it is.
    run_choice: str = ""
    # Layer kinds ("Conv1D" ...) this method cannot wrap although its PEFT type can, with the reason, e.g. an
    # initialisation that ignores fan_in_fan_out.
    unsupported_layer_kinds: tuple[tuple[str, str], ...] = ()
    rank_key: str | None = "r"  # config key that `rank=` sets; None when the method has no rank
    alpha_key: str | None = None  # scaling key kept proportional to the rank when `rank=` changes it
    benchmark: str = BENCHMARK

    # ------------------------------------------------------------------------------------------ public

    @property
    def source_run(self) -> str | None:
        """The run the settings are read from (own run, or the borrowed one)."""
        return self.benchmark_run or self.settings_run

    def candidate(self, arch: Architecture, kb: KnowledgeBase, rank: int | None = None,
                  targets: Sequence[str] | str | None = None) -> Candidate:
        """Concrete settings of this method for `arch`; ArchitectureNotSupported when it cannot target `arch`."""
        run = self._run(kb)
        reference_arch = self._reference_arch(kb, run)
        settings = self._settings_from_run(run)
        settings.update(dict(self.fixed_settings))
        notes = self._provenance_notes(kb, run)
        if rank is not None:
            notes += self._apply_rank(settings, rank)
        layers, target_notes = self._choose_targets(settings, arch, kb, reference_arch, run, targets)
        notes += target_notes
        context = BuildContext(arch=arch, reference_arch=reference_arch, layers=layers, run=run)
        notes += self._fit_to_architecture(settings, context)
        kwargs, dropped_notes = self._accepted_kwargs(settings, kb.architectures.cache)
        notes += dropped_notes
        return Candidate(
            method=self.key,
            display_name=self.display_name,
            peft_type=self.peft_type,
            peft_config_class=self.config_class,
            peft_kwargs=kwargs,
            learning_rate=self._learning_rate(run),
            optimizer=self._optimizer(run),
            benchmark_run=self.benchmark_run,
            notes=tuple(notes),
            task_type=workload_of(arch).task_type,
            peft_defaults=peft_config_facts(self.config_class, kb.architectures.cache)[2] if self.config_class else {},
        )

    # ------------------------------------------------------------------------------------------ hooks

    def _fit_to_architecture(self, settings: dict[str, Any], context: BuildContext) -> list[str]:
        """Make width-dependent settings valid for `context.arch` (in place); return notes on what changed."""
        return []

    def _uses_targets(self) -> bool:
        """False for methods that do not wrap layers (prompt learning, full fine-tuning)."""
        return True

    # ------------------------------------------------------------------------------------------ run and settings

    def _run(self, kb: KnowledgeBase) -> pd.Series:
        experiment = self.source_run
        if experiment is None:
            raise PeftpickError(f"{self.display_name} names no benchmark run to take its settings from",
                                "set benchmark_run or settings_run in its catalogue entry")
        try:
            return kb.benchmarks.get(self.benchmark, experiment)
        except KeyError as missing:
            raise PeftpickError(
                f"the knowledge base has no {self.benchmark} run {experiment!r} for {self.display_name} "
                f"({missing.args[0] if missing.args else ''})",
                "restore knowledge/data from git, or rebuild it with python -m peftpick.knowledge.extract",
            ) from None

    def _reference_arch(self, kb: KnowledgeBase, run: pd.Series) -> Architecture:
        from peftpick.knowledge.architectures import resolve_model

        base_model = str(run["base_model"])
        if self.benchmark == DENOISER.benchmark:
            from peftpick.knowledge.denoisers import resolve_denoiser

            found = resolve_denoiser(base_model, cache=kb.architectures.cache)
            if found is None:
                raise PeftpickError(f"the benchmark model {base_model} of run {run['experiment']} is not in the "
                                    "denoiser registry", "add it to knowledge/data/denoisers.json")
            return found
        entry = kb.architectures.lookup(base_model)
        if entry is None:
            raise PeftpickError(
                f"the benchmark model {base_model} of run {run['experiment']} is not in the model registry",
                "add it to knowledge/data/architectures.json; peftpick reads the run's target names from it",
            )
        return resolve_model(entry.name, kb.architectures)

    def _settings_from_run(self, run: pd.Series) -> dict[str, Any]:
        text = run["peft_config_json"]
        if not text:
            return {}
        try:
            stored = json.loads(text)
        except json.JSONDecodeError as error:
            raise PeftpickError(f"run {run['experiment']} has an unreadable PEFT config ({error.msg})",
                                "rebuild the knowledge base with python -m peftpick.knowledge.extract") from None
        return {key: value for key, value in stored.items() if key not in _BOOKKEEPING_KEYS}

    def _learning_rate(self, run: pd.Series) -> float:
        value = float(run["learning_rate"])
        if not math.isfinite(value) or value <= 0:
            raise PeftpickError(f"run {run['experiment']} has no learning rate",
                                "rebuild the knowledge base with python -m peftpick.knowledge.extract")
        return value

    def _optimizer(self, run: pd.Series) -> Optimizer:
        if self.benchmark_run is None:
            return self.optimizer  # borrowed settings: the method's own optimizer, not the borrowed run's
        name = str(run["optimizer"]).strip().lower()
        if name not in _OPTIMIZERS:
            raise PeftpickError(f"run {run['experiment']} used optimizer {run['optimizer']!r}, which peftpick "
                                "cannot plan for", f"use a run trained with one of {', '.join(_OPTIMIZERS)}")
        return _OPTIMIZERS[name]

    def _provenance_notes(self, kb: KnowledgeBase, run: pd.Series) -> list[str]:
        model = str(run["base_model"]).split("/")[-1]
        score = f"{run['metric']} {float(run['score']):.1%}"
        if self.benchmark_run is None:
            changed = ", ".join(f"{key}={value!r}" for key, value in self.fixed_settings)
            notes = [f"{self.display_name} has no run in the comparison suite: settings of the {self.benchmark} run "
                     f"{run['experiment']} ({model}, {score}) with {changed}; no benchmark evidence of its own"]
        else:
            notes = [f"settings from the {self.benchmark} run {run['experiment']} ({model}, {score})"]
            better = self._best_run_of_method(kb) if self.run_choice else None
            if better is not None and better["experiment"] != run["experiment"]:
                notes.append(f"the suite's highest-scoring {self.display_name} run is {better['experiment']} "
                             f"({float(better['score']):.1%}); {self.run_choice}")
        notes.append(_training_note(run))
        return notes

    def _best_run_of_method(self, kb: KnowledgeBase) -> pd.Series | None:
        if self.peft_type is None:
            return kb.benchmarks.best_run(self.benchmark, "FULL_FINETUNING")
        variant = self.run_variant
        return kb.benchmarks.best_run(
            self.benchmark, self.peft_type,
            None if variant is None else (lambda row: str(row["variant"]) == variant),
        )

    def _apply_rank(self, settings: dict[str, Any], rank: int) -> list[str]:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise PeftpickError(f"rank must be a positive whole number, got {rank!r}", "pass e.g. rank=16")
        if self.rank_key is None:
            raise PeftpickError(f"{self.display_name} has no rank to set",
                                "leave rank unset for it, or pick a rank-based method such as LoRA")
        old_rank = int(settings.get(self.rank_key) or 0)
        settings[self.rank_key] = rank
        if self.alpha_key is None or self.alpha_key not in settings or not old_rank:
            return []
        if settings.get("use_rslora"):
            # rsLoRA scales by alpha/sqrt(r): the run's alpha is meant to stay put when r changes.
            return [f"rank {rank} instead of the run's {old_rank}; {self.alpha_key} stays {settings[self.alpha_key]} "
                    "(rsLoRA scales by alpha/sqrt(r))"]
        alpha = settings[self.alpha_key] * rank / old_rank
        settings[self.alpha_key] = int(alpha) if float(alpha).is_integer() else alpha
        return [f"rank {rank} instead of the run's {old_rank}; {self.alpha_key} {settings[self.alpha_key]} keeps the "
                f"run's alpha/r = {settings[self.alpha_key] / rank:g}"]

    def _accepted_kwargs(self, settings: dict[str, Any], cache: Any = None) -> tuple[dict[str, Any], list[str]]:
        """Settings the installed PEFT's config class accepts; a note names any it does not know."""
        if self.config_class is None:
            return {}, []
        version, known, _ = peft_config_facts(self.config_class, cache)
        if known is None:
            raise PeftpickError(f"peft {version} has no {self.config_class} for {self.display_name}",
                                "upgrade peft (pip install -U peft)")
        kwargs = {key: value for key, value in settings.items() if key in known}
        unknown = sorted(set(settings) - known)
        if not unknown:
            return kwargs, []
        return kwargs, [f"peft {version}'s {self.config_class} has no {', '.join(unknown)}: left out"]

    # ------------------------------------------------------------------------------------------ targets

    def _choose_targets(self, settings: dict[str, Any], arch: Architecture, kb: KnowledgeBase,
                        reference_arch: Architecture, run: pd.Series,
                        targets: Sequence[str] | str | None) -> tuple[tuple[LinearModule, ...], list[str]]:
        """Set settings["target_modules"] (and fan_in_fan_out) for `arch`; return the targeted layers and notes."""
        if not self._uses_targets():
            if targets is not None:
                raise PeftpickError(f"{self.display_name} has no target modules to choose",
                                    "leave targets unset for it")
            return (), []
        if self.benchmark == DENOISER.benchmark:
            return self._choose_denoiser_targets(settings, arch, kb, reference_arch, run, targets)
        layer_modules = workload_of(arch).hook("layer_modules")
        arch_layers = layer_modules(arch)
        reference_layers = layer_modules(reference_arch)
        notes: list[str] = []
        # only a mixture of experts has expert weights to ask about (the question imports PEFT)
        unsupported = self._expert_parameters_unsupported(settings) if arch.num_experts else None
        if targets is None:
            roles = _roles_of_run_targets(run, reference_layers)
            resolution = self._resolve(arch, roles, from_run=True, unsupported=unsupported)
            extra_modules: list[str] = []
        else:
            roles, extra_modules, name_notes = _roles_of_user_targets(targets, arch, arch_layers, reference_layers,
                                                                     reference_arch)
            notes += name_notes
            resolution = self._resolve(arch, roles, from_run=False, unsupported=unsupported) if roles else None
        modules = list(dict.fromkeys([*(resolution.modules if resolution else []), *extra_modules]))
        notes += list(resolution.notes) if resolution else []
        parameters = list(resolution.parameters) if resolution else []
        if (arch.num_experts and not parameters and unsupported is None and targets is None
                and not set(roles) & {"mlp", "gate", "up", "down", ALL_LINEAR_ROLE}):
            notes.append(f"the run targets no MLP, so {arch.name}'s {arch.num_experts} experts per layer stay frozen; "
                         "targets=['mlp'] reaches them with PEFT target_parameters")
        layers = tuple(layer for layer in arch_layers if layer.target in modules)
        self._check_layer_kinds(arch, kb, layers)
        settings["target_modules"] = modules
        if parameters:
            settings["target_parameters"] = parameters
        if "fan_in_fan_out" in settings or any(layer.kind == "Conv1D" for layer in layers):
            settings["fan_in_fan_out"] = any(layer.kind == "Conv1D" for layer in layers)
        return layers, notes

    def _expert_parameters_unsupported(self, settings: dict[str, Any]) -> str | None:
        """None when this method's PEFT config can wrap fused MoE expert weights (`target_parameters`), else why not.

        peft 0.21's lora.ParamWrapper is the only layer that wraps a bare nn.Parameter; it refuses DoRA, dropout,
        lora_bias and fan_in_fan_out, and the PiSSA / OLoRA / CorDA / LoftQ initialisations read the wrapped
        module's `.weight`, which an experts module does not have (measured on a tiny gpt-oss).
        """
        import dataclasses

        import peft

        config_class = getattr(peft, self.config_class or "", None)
        if config_class is None or "target_parameters" not in {f.name for f in dataclasses.fields(config_class)}:
            return (f"PEFT's {self.config_class} has no target_parameters (only LoraConfig wraps bare parameters)"
                    if self.config_class else "it wraps no layers")
        if settings.get("use_dora"):
            return "PEFT's lora.ParamWrapper does not work with use_dora=True"
        init = settings.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
            return (f"PEFT's {init} initialisation decomposes the wrapped layer's .weight, which the fused experts "
                    "module does not have")
        for key, label in (("lora_dropout", "lora_dropout != 0"), ("lora_bias", "lora_bias=True"),
                           ("fan_in_fan_out", "fan_in_fan_out=True")):
            if settings.get(key):
                return f"PEFT's lora.ParamWrapper does not work with {label}"
        return None

    def _choose_denoiser_targets(self, settings: dict[str, Any], arch: Architecture, kb: KnowledgeBase,
                                 reference_arch: Architecture, run: pd.Series,
                                 targets: Sequence[str] | str | None) -> tuple[tuple[LinearModule, ...], list[str]]:
        """The image run's targets (module names of the benchmark's FLUX.2-klein) as roles, resolved on `arch`."""
        from peftpick.knowledge.denoiser_targets import (
            DENOISER_ROLES,
            denoiser_layer_modules,
            layer_source,
            resolve_denoiser_targets,
        )

        model = layer_source(arch)  # read (or built) once for the three readings below
        if targets is None:
            names = [n for n in str(run["target_modules"]).split("|") if n]
            reference_layers = denoiser_layer_modules(
                reference_arch, model if reference_arch == arch else layer_source(reference_arch))
            roles = list(dict.fromkeys(role for layer in reference_layers if layer.target in names
                                       for role in layer.roles))
        else:
            items = [targets] if isinstance(targets, str) else list(targets)
            unknown = [item for item in items if item not in DENOISER_ROLES]
            if unknown:
                raise PeftpickError(f"unknown denoiser target role(s) {', '.join(map(repr, unknown))}",
                                    f"use roles: {', '.join(DENOISER_ROLES)}")
            roles = items
        include_conv = bool(self.peft_type) and kb.capabilities_of(self.peft_type).supports_layer("Conv2d") is True
        resolution = resolve_denoiser_targets(arch, roles, include_conv=include_conv, model=model, shrunk=True)
        modules = list(resolution.modules)
        layers = tuple(layer for layer in denoiser_layer_modules(arch, model) if layer.target in modules)
        self._check_layer_kinds(arch, kb, layers)
        settings["target_modules"] = modules
        if "feedforward_modules" in settings:
            settings["feedforward_modules"] = _feedforward_like_run(settings, run, modules)
        return layers, list(resolution.notes)

    def _resolve(self, arch: Architecture, roles: list[str], from_run: bool, unsupported: str | None = None):
        from peftpick.knowledge.targets import resolve_targets

        try:
            return resolve_targets(arch, roles, method=self.display_name, experts=unsupported is None,
                                   experts_unsupported=unsupported)
        except PeftpickError as error:
            if not from_run:
                raise
            # The run's own targets do not exist here: the method as benchmarked cannot be applied.
            raise ArchitectureNotSupported(
                f"{self.display_name} cannot be applied to {arch.name} ({arch.model_type}): its benchmark run "
                f"{self.source_run} targets {_describe_roles(roles)}, and {error.fix}",
                "pass targets= to adapt other layers, or pick another method",
            ) from None

    def _check_layer_kinds(self, arch: Architecture, kb: KnowledgeBase, layers: Iterable[LinearModule]) -> None:
        """Refuse layer types PEFT's implementation of this method does not wrap (GPT-2's Conv1D for OFT ...)."""
        if self.peft_type is None:
            return
        capabilities = kb.capabilities_of(self.peft_type)
        own_limits = dict(self.unsupported_layer_kinds)
        for kind in dict.fromkeys(layer.kind for layer in layers):
            if kind in own_limits:
                why = own_limits[kind]
            elif capabilities.supports_layer(kind) is False:
                supported = ", ".join(capabilities.target_layer_types or ())
                why = f"PEFT's {self.config_class} wraps only {supported}"
            else:
                continue
            names = ", ".join(layer.target for layer in layers if layer.kind == kind)
            wrapping = sorted(name for name, caps in kb.capabilities.items() if caps.supports_layer(kind))
            raise ArchitectureNotSupported(
                f"{self.display_name} cannot be applied to {arch.name} ({arch.model_type}): its {names} "
                f"projections are transformers {kind} layers, and {why}",
                f"pick a method whose PEFT type wraps {kind} layers ({', '.join(wrapping)})",
            )


@dataclass(frozen=True)
class NoTargetSpec(MethodSpec):
    """A method that does not wrap linear layers (prompt learning, full fine-tuning): no targets, no rank."""

    rank_key: str | None = None

    def _uses_targets(self) -> bool:
        return False


# Prompt-learning config keys that describe the model, not the method: PEFT reads them from the model's config in
# get_peft_model (grouped-query attention and per-layer head sizes included), so the run's Llama values must go.
_MODEL_DERIVED_KEYS = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size",
                       "num_transformer_submodules")


@dataclass(frozen=True)
class PromptLearningSpec(NoTargetSpec):
    """Prompt tuning and prefix tuning: virtual tokens instead of wrapped layers."""

    def _fit_to_architecture(self, settings: dict[str, Any], context: BuildContext) -> list[str]:
        dropped = [key for key in _MODEL_DERIVED_KEYS if key in settings]
        for key in dropped:
            del settings[key]
        if not dropped:
            return []
        return [f"the run's {', '.join(dropped)} describe {context.reference_arch.name}: left out, PEFT reads them "
                f"from the model's config in get_peft_model"]


# ---------------------------------------------------------------------------------------------- helpers


def _training_note(run: pd.Series) -> str:
    decay = run.get("weight_decay")
    decay_text = (f"weight decay {float(decay):g}" if decay is not None and math.isfinite(float(decay))
                  else "the optimizer's default weight decay")
    schedule = f"{run['lr_scheduler']} schedule" if run.get("lr_scheduler") else "constant learning rate"
    return (f"the run trained {int(run['max_steps']):,} steps of batch {int(run['batch_size'])} with "
            f"{run['optimizer']} at lr {float(run['learning_rate']):g}, {decay_text}, {schedule}")


def _feedforward_like_run(settings: dict[str, Any], run: pd.Series, modules: list[str]) -> list[str]:
    """IA3's feed-forward modules on a denoiser: the image suite's run treats every target as feed-forward, so
    when the run's feedforward set equals its target set, so does the candidate's; otherwise none."""
    stored = json.loads(run["peft_config_json"] or "{}")
    run_targets = set(stored.get("target_modules") or [])
    run_feedforward = set(stored.get("feedforward_modules") or [])
    return list(modules) if run_targets and run_feedforward == run_targets else []


def _compact_roles(roles: Iterable[str]) -> list[str]:
    """Roles as shortcuts where a whole shortcut is present, so architectures lacking some of them get a note
    instead of an error (a mixture-of-experts MLP, GPT-2's missing gate): {q, v} -> attn_qv."""
    from peftpick.knowledge.targets import ROLES, SHORTCUTS

    remaining = set(roles)
    chosen: list[str] = []
    for shortcut in ("attn", "mlp", "attn_qv"):
        members = set(SHORTCUTS[shortcut])
        if members <= remaining:
            chosen.append(shortcut)
            remaining -= members
    return chosen + [role for role in ROLES if role in remaining]


def _roles_of_run_targets(run: pd.Series, reference_layers: Sequence[LinearModule]) -> list[str]:
    """The run's target module names (on the benchmark model) as roles."""
    from peftpick.knowledge.targets import ALL_LINEAR

    text = str(run["target_modules"])
    if text.strip().lower() in {ALL_LINEAR, "all_linear"}:
        return [ALL_LINEAR]
    roles: list[str] = []
    for name in text.split("|"):
        found = _layers_named(name, reference_layers)
        if not found or not all(layer.roles for layer in found):
            raise PeftpickError(f"run {run['experiment']} targets {name!r}, which has no known role in its model",
                                "rebuild the knowledge base, or teach knowledge.targets the name's role")
        roles += [role for layer in found for role in layer.roles]
    return _compact_roles(roles)


def _describe_roles(roles: Sequence[str]) -> str:
    """'mlp (gate, up, down)' for people."""
    from peftpick.knowledge.targets import SHORTCUTS

    return ", ".join(f"{role} ({', '.join(SHORTCUTS[role])})" if role in SHORTCUTS else role for role in roles)


def _layers_named(name: str, layers: Sequence[LinearModule]) -> list[LinearModule]:
    return [layer for layer in layers
            if name in (layer.target, layer.path) or layer.path.endswith("." + name)]


def _roles_of_user_targets(targets: Sequence[str] | str, arch: Architecture, arch_layers: Sequence[LinearModule],
                           reference_layers: Sequence[LinearModule], reference_arch: Architecture,
                           ) -> tuple[list[str], list[str], list[str]]:
    """(roles, module names without a role, notes) for what a user passed as `targets`.

    Each item is a role, a shortcut, "all-linear", a module name of `arch`, or a module name of the benchmark model
    (a Llama name such as "q_proj"), which is taken as its role.
    """
    from peftpick.knowledge.targets import ALL_LINEAR, ROLES, SHORTCUTS

    items = [targets] if isinstance(targets, str) else list(targets)
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise PeftpickError(f"targets must be a non-empty list of roles or module names, got {targets!r}",
                            f"use roles ({', '.join(ROLES)}), shortcuts ({', '.join(SHORTCUTS)}, {ALL_LINEAR}) "
                            "or module names such as q_proj")
    roles: list[str] = []
    verbatim: list[str] = []
    notes: list[str] = []
    for item in (item.strip() for item in items):
        if item in ROLES or item in SHORTCUTS or item == ALL_LINEAR:
            roles.append(item)
            continue
        own = [layer for layer in _layers_named(item, arch_layers) if layer.targetable]
        if own:
            for layer in own:
                if layer.roles:
                    roles += list(layer.roles)
                elif layer.target not in verbatim:
                    verbatim.append(layer.target)
            continue
        borrowed = [layer for layer in _layers_named(item, reference_layers) if layer.roles]
        if borrowed:
            borrowed_roles = [role for layer in borrowed for role in layer.roles]
            roles += borrowed_roles
            notes.append(f"{arch.name} has no module {item}; taken as the {'/'.join(borrowed_roles)} role it plays "
                         f"in {reference_arch.name}")
            continue
        names = ", ".join(dict.fromkeys(layer.target for layer in arch_layers if layer.targetable))
        raise PeftpickError(f"unknown target {item!r} for {arch.name}",
                            f"use roles ({', '.join(ROLES)}), shortcuts ({', '.join(SHORTCUTS)}, {ALL_LINEAR}) "
                            f"or its module names: {names}")
    return list(dict.fromkeys(roles)), verbatim, notes


def closest_valid(wanted: int, candidates: Iterable[int]) -> int | None:
    """The candidate nearest `wanted` (the smaller one on a tie), or None when there is none."""
    ordered = sorted(set(candidates))
    if not ordered:
        return None
    return min(ordered, key=lambda value: (abs(value - wanted), value))


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def describe_widths(layers: Sequence[LinearModule], which: str = "in") -> str:
    """'q_proj 3072, v_proj 3072' for people."""
    attribute = "in_features" if which == "in" else "out_features"
    return ", ".join(f"{layer.target} {getattr(layer, attribute)}" for layer in layers)


def peft_config_facts(config_class: str, cache: Any = None) -> tuple[str, frozenset[str] | None, dict[str, Any]]:
    """(the installed PEFT's version, the field names of its config class `config_class` (None when it has no such
    class), the class's defaults that are plain literals). `cache` (a disk_cache.JsonTable keyed by the library
    versions) keeps them for every config class, so that a later run answers without importing PEFT (and torch
    under it); a fresh answer goes through the same JSON form, so both runs give the same."""
    key = parts = None
    stored = None
    if cache is not None:
        key, parts = cache.key({"peft_config_facts": 2})
        stored = cache.get(key)
    if not (isinstance(stored, dict) and isinstance(stored.get("fields"), dict)
            and isinstance(stored.get("defaults"), dict)):
        stored = _read_peft_config_facts()
        if cache is not None:
            cache.put(key, stored, parts, "PEFT config fields and defaults")
    fields = stored["fields"].get(config_class)
    defaults = {}
    for name, text in (stored["defaults"].get(config_class) or {}).items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            defaults[name] = ast.literal_eval(text)
    return str(stored["version"]), frozenset(fields) if fields is not None else None, defaults


def _read_peft_config_facts() -> dict[str, Any]:
    """Each PEFT config class's fields and declared defaults. Read from the dataclass fields rather than from an
    instance: `__post_init__` of some classes imports heavy libraries (AdaMSS imports scikit-learn), and it only
    fills in fields no snippet passes (peft_type, peft_version)."""
    import peft

    fields, defaults = {}, {}
    for name in dir(peft):
        value = getattr(peft, name)
        if not (name.endswith("Config") and isinstance(value, type) and dataclasses.is_dataclass(value)):
            continue
        fields[name] = sorted(field.name for field in dataclasses.fields(value))
        declared = {}
        for field in dataclasses.fields(value):
            if not field.init:
                continue
            if field.default is not dataclasses.MISSING:
                declared[field.name] = repr(field.default)
            elif field.default_factory is not dataclasses.MISSING:
                declared[field.name] = repr(field.default_factory())
        defaults[name] = declared
    return {"version": peft.__version__, "fields": fields, "defaults": defaults}
