"""The seam between workloads: what each stage does differently for a causal LM and for a diffusion denoiser.

A stage never branches on the model type itself; it asks `workload_of(arch)` (or `spec_for(workload)`) and calls
the hook it names. Hooks are "module:function" paths, imported when first called, so that a language-model run
never imports diffusers and the CLI's start-up stays light:

| hook | stage | what it does |
|---|---|---|
| `estimate` | estimator | peak memory of (arch, peft_config, shape) on the meta device |
| `build_model` | knowledge | the model built from its config (on the meta device by default) |
| `count_parameters` | knowledge | its parameter count |
| `layer_modules` | methods | the linear (and conv) layers a method can target, with their roles |
| `snippet` | report | the copy-paste training code |
| `probe_program` | probes | the micro-training a probe runs |

Plain values (the benchmark whose runs give settings and quality, the serving stacks that apply, the metric's
words) sit in the spec itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.types import Architecture, Serve, Workload


@dataclass(frozen=True)
class WorkloadSpec:
    workload: Workload
    display_name: str  # "causal language model", "diffusion denoiser"
    benchmark: str  # the knowledge base benchmark whose runs give settings, quality and speed
    benchmark_model: str  # the model that benchmark trained, for the report's words
    metric_words: str  # what the benchmark's score measures
    stacks: tuple[Serve, ...]  # the --serve values that apply (Serve.NONE always does)
    default_serve: Serve
    task_type: str | None  # PEFT's task_type for the config (None: PEFT wraps the bare module)
    default_batch_size: int  # the effective batch when none is asked for (the benchmark's)
    probe_losses_inform_quality: bool  # a probe's early losses may feed the quality model (real data, real weights)
    run_interval_words: str  # what a benchmark run's quality interval is made of
    hooks: dict[str, str] = field(default_factory=dict)

    def hook(self, name: str) -> Callable[..., Any]:
        """The stage function behind `name`, imported on first use."""
        try:
            path = self.hooks[name]
        except KeyError:
            raise PeftpickError(f"{self.display_name}s have no {name!r} step in this version of peftpick",
                                "upgrade peftpick, or use a model of another kind") from None
        module, _, function = path.partition(":")
        return getattr(importlib.import_module(module), function)

    def accepts(self, serve: Serve) -> bool:
        return serve is Serve.NONE or serve in self.stacks


CAUSAL_LM = WorkloadSpec(
    workload=Workload.CAUSAL_LM,
    display_name="causal language model",
    benchmark="MetaMathQA",
    benchmark_model="Llama-3.2-3B",
    metric_words="test accuracy on MetaMathQA",
    stacks=(Serve.VLLM, Serve.SGLANG, Serve.TGI, Serve.LLAMACPP, Serve.OLLAMA),
    default_serve=Serve.VLLM,
    task_type="CAUSAL_LM",
    default_batch_size=4,
    probe_losses_inform_quality=True,
    run_interval_words="the test set's sampling noise",
    hooks={
        "estimate": "peftpick.estimator:estimate_architecture",
        "build_model": "peftpick.knowledge.architectures:build_model",
        "count_parameters": "peftpick.knowledge.architectures:count_parameters",
        "layer_modules": "peftpick.knowledge.targets:decoder_layer_modules",
        "snippet": "peftpick.report.snippet:lm_snippet",
        "probe_program": "peftpick.probes.worker:causal_lm_program",
    },
)

DENOISER = WorkloadSpec(
    workload=Workload.DENOISER,
    display_name="diffusion denoiser",
    benchmark="image-gen",
    benchmark_model="FLUX.2-klein-base-4B",
    metric_words="DINOv2 similarity to the training concept on PEFT's image benchmark",
    stacks=(Serve.DIFFUSERS, Serve.COMFYUI, Serve.FORGE, Serve.INVOKEAI),
    default_serve=Serve.DIFFUSERS,
    task_type=None,
    default_batch_size=2,  # the PEFT image suite's (and the usual one for 8-24 GB cards)
    probe_losses_inform_quality=False,  # probes train on random latents: their loss says nothing of quality
    run_interval_words="the spread of the run's last validation scores, scaled to its test images",
    hooks={
        "estimate": "peftpick.estimator.diffusion:estimate_denoiser",
        "build_model": "peftpick.knowledge.denoisers:build_denoiser",
        "count_parameters": "peftpick.knowledge.denoisers:count_denoiser_parameters",
        "layer_modules": "peftpick.knowledge.denoiser_targets:denoiser_layer_modules",
        "snippet": "peftpick.report.snippet_diffusers:diffusers_snippet",
        "probe_program": "peftpick.probes.diffusion:denoiser_program",
    },
)

WORKLOADS = {spec.workload: spec for spec in (CAUSAL_LM, DENOISER)}


def spec_for(workload: Workload | str) -> WorkloadSpec:
    return WORKLOADS[Workload(workload)]


def workload_of(arch: Architecture) -> WorkloadSpec:
    return spec_for(arch.workload)


def check_serve(arch: Architecture, serve: Serve) -> None:
    """A --serve that does not apply to this kind of model is bad input (vLLM for an image model, ComfyUI for an
    LM): one line naming the stacks that do."""
    spec = workload_of(arch)
    if spec.accepts(serve):
        return
    other = next(s for s in WORKLOADS.values() if s is not spec and s.accepts(serve))
    choices = ", ".join(s.value for s in (*spec.stacks, Serve.NONE))
    raise PeftpickError(f"--serve {serve.value} is for {other.display_name}s, and {arch.name} is a {spec.display_name}",
                        f"use one of: {choices}")
