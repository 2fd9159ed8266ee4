"""peftpick's method catalogue: one module per PEFT tuner family, each giving `MethodSpec`s, and this registry.

`build_candidate("rslora", arch)` gives the method's concrete settings for an architecture, taken from its run in
PEFT's MetaMathQA comparison suite; `candidates_for(arch)` gives every method that can be applied to `arch` and an
`Exclusion` for each that cannot.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from peftpick.errors import PeftpickError
from peftpick.methods import (
    boft,
    full_finetuning,
    hira,
    ia3,
    lily,
    loha,
    lokr,
    lora,
    miss,
    oft,
    prefix_tuning,
    prompt_tuning,
    shira,
    vera,
)
from peftpick.knowledge.benchmarks import LORA_REFERENCE
from peftpick.methods.base import BENCHMARK, ArchitectureNotSupported, MethodSpec
from peftpick.types import Architecture, Candidate, Exclusion, Workload

if TYPE_CHECKING:
    from peftpick.knowledge import KnowledgeBase

# Catalogue order: LoRA and its variants first, then the other adapters, prompt learning, full fine-tuning.
METHODS: tuple[MethodSpec, ...] = (
    *lora.SPECS,
    *oft.SPECS,
    *boft.SPECS,
    *ia3.SPECS,
    *loha.SPECS,
    *lokr.SPECS,
    *vera.SPECS,
    *lily.SPECS,
    *miss.SPECS,
    *hira.SPECS,
    *shira.SPECS,
    *prompt_tuning.SPECS,
    *prefix_tuning.SPECS,
    *full_finetuning.SPECS,
)

# The runs of PEFT's image suite (FLUX.2-klein-base-4B) each method takes its settings from on a diffusion
# denoiser; methods absent here have no image run and are not candidates for denoisers.
_IMAGE_RUNS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "lora": {"benchmark_run": LORA_REFERENCE["image-gen"], "run_variant": ""},
    "dora": {"benchmark_run": "dora/flux2-klein-rank64", "run_variant": "dora"},
    "pissa": {"settings_run": LORA_REFERENCE["image-gen"]},
    "olora": {"settings_run": LORA_REFERENCE["image-gen"]},
    "oft": {"benchmark_run": "oft/flux2-klein-default"},
    "boft": {"benchmark_run": "boft/flux2-klein-default"},
    "ia3": {"benchmark_run": "ia3/flux2-klein-default"},
    "loha": {"benchmark_run": "loha/flux2-klein-default"},
    "lokr": {"benchmark_run": "lokr/flux2-klein-lr1e-3"},
    "vera": {"benchmark_run": "vera/flux2-klein-default"},
    "lily": {"benchmark_run": "lily/flux2-klein-default"},
    "miss": {"benchmark_run": "miss/flux2-klein-default"},
    "shira": {"benchmark_run": "shira/flux2-klein-default"},
    "full": {"benchmark_run": "full-finetuning/flux2-klein-default"},
})

# The image suite's best-scoring LoRA run is rank 64 (DINO 0.743 against the default r32's 0.697); it gets a
# candidate of its own on denoisers.
LORA_R64 = MethodSpec(
    key="lora-r64",
    display_name="LoRA r64",
    peft_type="LORA",
    config_class="LoraConfig",
    family="lora",
    summary="LoRA at rank 64 on every attention and feed-forward projection: the image suite's best LoRA run.",
    benchmark_run="lora/flux2-klein-rank64",
    run_variant="",
    alpha_key="lora_alpha",
    benchmark="image-gen",
)


def _image_specs() -> tuple[MethodSpec, ...]:
    import dataclasses

    specs = [dataclasses.replace(spec, benchmark="image-gen", run_choice="",
                                 **({"benchmark_run": None} if "settings_run" in _IMAGE_RUNS[spec.key] else {}),
                                 **_IMAGE_RUNS[spec.key])
             for spec in METHODS if spec.key in _IMAGE_RUNS]
    specs.insert(1, LORA_R64)
    return tuple(specs)


IMAGE_METHODS: tuple[MethodSpec, ...] = _image_specs()

_SEPARATORS = re.compile(r"[\s_\-.]+")


def _normalize(name: str) -> str:
    """'LoRA-FA', 'lora_fa' and 'lorafa' compare equal."""
    return _SEPARATORS.sub("", name.strip().lower())


def catalogue(workload: Workload | str = Workload.CAUSAL_LM) -> tuple[MethodSpec, ...]:
    """The specs of one workload: settings from MetaMathQA runs for causal LMs, from image runs for denoisers."""
    return IMAGE_METHODS if Workload(workload) is Workload.DENOISER else METHODS


def method_names(workload: Workload | str | None = None) -> list[str]:
    """Catalogue keys in catalogue order (of both workloads when None)."""
    if workload is not None:
        return [spec.key for spec in catalogue(workload)]
    return list(dict.fromkeys(spec.key for spec in (*METHODS, *IMAGE_METHODS)))


def get_method(name: str | MethodSpec, workload: Workload | str = Workload.CAUSAL_LM) -> MethodSpec:
    """The spec of `workload` whose key, display name or alias is `name` (case, spaces, '-', '_' and '.' ignored).

    A method of the other workload only is an ArchitectureNotSupported (it has no settings for this kind of model).
    """
    if isinstance(name, MethodSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise PeftpickError(f"no method name given ({name!r})", f"use one of {', '.join(method_names())}")
    wanted = _normalize(name)
    specs = catalogue(workload)
    for spec in specs:
        if wanted in {_normalize(spelling) for spelling in (spec.key, spec.display_name, *spec.aliases)}:
            return spec
    others = IMAGE_METHODS if specs is METHODS else METHODS
    for spec in others:
        if wanted in {_normalize(spelling) for spelling in (spec.key, spec.display_name, *spec.aliases)}:
            kind = "diffusion denoisers" if specs is IMAGE_METHODS else "causal language models"
            suite = "image" if specs is IMAGE_METHODS else "MetaMathQA"
            raise ArchitectureNotSupported(
                f"{spec.display_name} has no settings for {kind}: PEFT's {suite} suite has no run of it",
                f"pick one of {', '.join(s.key for s in specs)}")
    spellings = {_normalize(s): spec.key for spec in (*METHODS, *IMAGE_METHODS)
                 for s in (spec.key, spec.display_name, *spec.aliases)}
    close = list(dict.fromkeys(spellings[match] for match in difflib.get_close_matches(wanted, spellings, n=6,
                                                                                         cutoff=0.6)))[:3]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PeftpickError(f"unknown method {name!r}", f"{hint}known methods: {', '.join(method_names())}")


def build_candidate(name: str | MethodSpec, arch: Architecture, kb: KnowledgeBase | None = None,
                    rank: int | None = None, targets: Sequence[str] | str | None = None) -> Candidate:
    """The candidate of method `name` for `arch`, with an optional rank and target override.

    Raises PeftpickError for unknown names and bad overrides, and its subclass ArchitectureNotSupported when the
    method cannot be applied to `arch`.
    """
    spec = get_method(name, arch.workload)
    return spec.candidate(arch, kb if kb is not None else _load_kb(), rank=rank, targets=targets)


def candidates_for(arch: Architecture, kb: KnowledgeBase | None = None,
                   methods: Iterable[str | MethodSpec] | None = None) -> tuple[list[Candidate], list[Exclusion]]:
    """Candidates of every method (or of `methods`) that can be applied to `arch`, and why the others cannot."""
    kb = kb if kb is not None else _load_kb()
    candidates: list[Candidate] = []
    exclusions: list[Exclusion] = []
    if methods is None:
        specs = catalogue(arch.workload)
    else:
        specs = []
        for name in methods:
            try:
                specs.append(get_method(name, arch.workload))
            except ArchitectureNotSupported as error:  # a method of the other workload only
                other = get_method(name, Workload.DENOISER if arch.workload is Workload.CAUSAL_LM
                                   else Workload.CAUSAL_LM)
                exclusions.append(Exclusion(method=other.key, display_name=other.display_name,
                                            constraint="architecture", reason=str(error)))
        specs = tuple(dict.fromkeys(specs))
    for spec in specs:
        try:
            candidates.append(spec.candidate(arch, kb))
        except ArchitectureNotSupported as error:
            exclusions.append(Exclusion(method=spec.key, display_name=spec.display_name,
                                        constraint="architecture", reason=str(error)))
    return candidates, exclusions


def _load_kb() -> KnowledgeBase:
    from peftpick.knowledge import KnowledgeBase

    return KnowledgeBase.load()


__all__ = (
    "BENCHMARK",
    "IMAGE_METHODS",
    "METHODS",
    "ArchitectureNotSupported",
    "MethodSpec",
    "build_candidate",
    "candidates_for",
    "catalogue",
    "get_method",
    "method_names",
)
