"""From a request to a ranked, justified recommendation.

Flow: validate the request (`request.py`), resolve the architecture, build every candidate method's concrete
settings for it (`peftpick.methods`), apply the hard constraints (serving route on the chosen stack, quantized
base, the VRAM: `planning.py` finds settings that fit), then rank the rest (`ranking.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.recommender.planning import (
    CONTEXT_RESERVE_BYTES,
    FIT_HEADROOM,
    Planner,
    WorkerPool,
    fit_of,
    lower_bound_held,
)
from peftpick.recommender.ranking import CHECKPOINTING_SLOWDOWN, GOAL_WEIGHTS, Assessed, quality_of, rank, speed_of
from peftpick.recommender.request import deepspeed_installed, strategies_for, validate_for_model, validate_request
from peftpick.types import (
    GIB,
    Alternative,
    Candidate,
    Exclusion,
    LengthProfile,
    OPTIMIZER_LABELS,
    LossKernel,
    ProbeResult,
    Quant,
    RankedCandidate,
    Recommendation,
    Request,
    Serve,
    Strategy,
    Trainer,
    TrainingPlan,
    TrainingShape,
)
from peftpick.knowledge.benchmarks import LORA_REFERENCE
from peftpick.workloads import CAUSAL_LM, WorkloadSpec, workload_of
PROBE_TOP = 8  # candidates probed before ranking
TOP_COMPARED = 5  # candidates whose quality intervals the report compares

Progress = Callable[[str], None]


def recommend(
    model: Any,
    vram_gb: float | None = None,
    serve: str | None = None,
    multi_adapter: bool = False,
    quant: str = "none",
    goal: str = "balanced",
    seq_len: int = 768,
    batch_size: int | None = None,
    *,
    resolution: int | None = None,
    frames: int | None = None,
    cached_inputs: bool = True,
    methods: list[str] | None = None,
    kb: Any = None,
    progress: Progress | None = None,
    workers: int | None = None,
    probe: bool | None = None,
    probe_steps: int = 10,
    probe_top: int = PROBE_TOP,
    data: Any = None,
    probe_device: str | None = None,
    loss: str | None = None,
    trainer: str = "plain",
    packing: bool = False,
    cache: bool = True,
    gpus: int = 1,
    strategy: str = "auto",
    optimizer: str | None = None,
) -> Recommendation:
    """Rank PEFT methods for training `model` on a GPU with `vram_gb` GiB and serving on `serve`.

    model: bundled name (see `peftpick models`), local folder or config.json (or a diffusers folder), hub id, or a
        PretrainedConfig.
    vram_gb: GiB of the training GPU; None reads the local GPU through NVML.
    serve: the serving stack (an LM engine, or for a denoiser an image tool); None: vLLM for language models,
        diffusers for denoisers. batch_size: the effective batch; None: 4 for language models, 2 for denoisers.
    resolution, frames: a denoiser's training images (pixels per side) and, for video models, frames per clip
        (None: the model's usual). cached_inputs: text embeddings and latents computed beforehand, so the text
        encoders and VAE are off the GPU while training (the usual low-memory recipe).
    methods: restrict to these catalogue keys (default: every method).
    workers: processes estimating memory at once (default 1: forking is unsafe in a process that has run
        multi-threaded CPU work, which a training script has; the command line passes `default_workers()`).
    probe: micro-train the shortlist (the `probe_top` candidates that may fit, best prior first, plain LoRA
        among them as the reference) before ranking. None: when a CUDA GPU is present; True: also on the CPU
        (small models; loss and speed, no memory); False: estimates only.
    probe_steps: measured optimizer steps per probe. data: the probes' training data (see `peftpick.probe`).
    probe_device: "cuda", "cuda:N" or "cpu"; None: the GPU when there is one.
    loss: the language-model loss kernel, "stock", "liger" or "chunked"; None: stock, or Liger's fused
        cross-entropy where the stock loss does not fit without gradient checkpointing (and Liger patches the
        model). trainer: the loop the estimates model, "plain", "hf" (transformers' Trainer) or "trl".
    data (language models): also the length distribution the estimates use, tokenized with the model's
        tokenizer when this machine has it: batches padded to their longest example, so the peak is set by the
        longest (up to seq_len). packing: the examples are packed into full rows of seq_len tokens instead.
    gpus: GPUs of `vram_gb` each on one node; strategy: "auto" (the cheapest that fits: no sharding when one GPU
        is enough), "ddp", "fsdp2", "zero2", "zero3" or their "-offload" variants. With several GPUs the figures
        are per GPU, and the single-GPU QLoRA plan is made beside them (`Recommendation.alternative`).
    optimizer: what every method trains with ("adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd";
        LoRA-FA keeps its own); None: AdamW, switched to bitsandbytes' 8-bit AdamW for a method that fits in no
        other setting (the report says what it saved).
    cache: read and write the estimate and probe caches ($PEFTPICK_CACHE_DIR, else ~/.cache/peftpick): an
        estimate already made for the same model, method, shape and library versions is not traced again.
    """
    request = validate_request(model, vram_gb, serve, multi_adapter, quant, goal, seq_len, batch_size, resolution,
                               frames, cached_inputs, loss, trainer, gpus, strategy, optimizer)
    if probe not in (None, True, False):
        raise PeftpickError(f"probe must be True, False or None (automatic), got {probe!r}",
                            "pass probe=False for estimates only")
    if isinstance(probe_top, bool) or not isinstance(probe_top, int) or probe_top < 1:
        raise PeftpickError(f"probe_top must be a whole number of at least 1, got {probe_top!r}", "pass e.g. 8")
    if packing and data is None:
        raise PeftpickError("--packing packs the examples of --data into full rows, and no --data was given",
                            "pass --data FILE with --packing, or drop --packing")
    request = dataclasses.replace(request, packing=bool(packing))
    if request.gpus > 1 and probe is True:
        raise PeftpickError("the recommendation probes one GPU, and a multi-GPU plan's memory is its sharded "
                            "figure", f"drop --probe, and measure the plan with `peftpick probe --gpus {request.gpus}`")
    if request.gpus > 1:
        probe = False  # the single-GPU probe would not measure the sharded run (see `peftpick probe --gpus`)
    probing = ProbeRequest(probe, probe_steps, probe_top, data, probe_device, bool(cache))
    from peftpick.knowledge import KnowledgeBase
    from peftpick.recommender.background import ForkedService

    kb = kb or KnowledgeBase.load()
    # with workers, the quality models are fitted and asked in a child, beside the torch import and the planning
    with ForkedService(_quality_models, kb, _likely_benchmark(request), fork=(workers or 1) > 1) as quality_models, \
            WorkerPool(workers or 1) as pool, _estimate_cache(cache) as estimates:
        return _recommend(request, model, methods, kb, progress, pool, probing, estimates, quality_models)


def _quality_models(kb, prefit: str | None = None):
    """The quality models (recommender.quality.QualityModels), `prefit`: that benchmark's fitted at once (the forked
    child fits it while this process imports torch), the others when first asked."""
    from peftpick.recommender.quality import QualityModels

    return QualityModels(kb, [prefit] if prefit else ())


def _likely_benchmark(request: Request) -> str:
    """The benchmark the model will need, guessed before it is resolved: the workload of the serving stack asked
    for, else a language model's (a wrong guess costs one more fit when first asked)."""
    from peftpick.workloads import WORKLOADS

    serve = request.serve if request.serve not in (None, Serve.NONE) else None
    return next((spec.benchmark for spec in WORKLOADS.values() if serve is not None and spec.accepts(serve)),
                CAUSAL_LM.benchmark)


@contextlib.contextmanager
def _estimate_cache(wanted: bool):
    """The open estimate cache, or None when not wanted."""
    if not wanted:
        yield None
        return
    from peftpick.estimator.cache import EstimateCache

    with EstimateCache.open() as estimates:
        yield estimates


@dataclass(frozen=True)
class ProbeRequest:
    """Whether and how to probe the shortlist (see `recommend`)."""

    wanted: bool | None = None
    steps: int = 10
    top: int = PROBE_TOP
    data: Any = None
    device: str | None = None
    cache: bool = True


def _recommend(request: Request, model: Any, methods, kb, progress, pool: WorkerPool,
               probing: ProbeRequest, estimates: Any, quality_models: Any) -> Recommendation:
    """`quality_models`: a recommender.background.ForkedService of `_quality_models`."""
    from peftpick.knowledge.architectures import resolve_model, with_facts
    from peftpick.methods import candidates_for

    say = progress or (lambda _message: None)
    say(f"resolving {request.model}")
    if estimates is not None:  # bundled names resolve without transformers once resolved before
        kb = dataclasses.replace(kb, architectures=kb.architectures.with_cache(estimates.architectures))
    arch = resolve_model(model, kb.architectures)
    if not arch.facts and arch.denoiser is None:
        # layer listing and counts once, instead of a meta-device build per method (as a cached name has them)
        arch = with_facts(arch)
    request = validate_for_model(request, arch)
    workload = workload_of(arch)
    lengths, lengths_note = _data_lengths(request, arch, probing.data)
    # the longest batch sets the peak: padded to its longest example, or full rows when packed
    seq_len = request.seq_len if lengths is None or request.packing else min(request.seq_len, lengths.longest)
    candidates, excluded = candidates_for(arch, kb, methods)
    if not candidates:
        if methods and excluded:  # the user named the methods: say why the first cannot be used
            raise PeftpickError(excluded[0].reason)
        raise PeftpickError(f"no method in the catalogue can be applied to {arch.name}", "check `peftpick models` and --methods")

    trl = request.trainer is Trainer.TRL
    base_shape = TrainingShape(seq_len=seq_len, resolution=request.resolution, frames=request.frames,
                               cached_inputs=request.cached_inputs, quant=request.quant.value,
                               trainer=request.trainer.value,
                               loss="chunked" if trl else (request.loss or LossKernel.STOCK).value,
                               **({"dtype": arch.dtype} if arch.denoiser is not None else {}))
    # several GPUs share the effective batch: each takes its part (at least one sequence)
    per_gpu_batch = -(-request.batch_size // request.gpus)
    planner = Planner(arch, request.vram_gib, per_gpu_batch, seq_len, request.quant,
                      base_shape=base_shape, loss_lever=request.loss is None and not trl and _liger_patches(arch),
                      cache=estimates, gpus=request.gpus, strategies=strategies_for(request),
                      optimizer=request.optimizer.value if request.optimizer is not None else None,
                      optimizer_lever=request.optimizer is None)
    serving = _ServingJudge(kb, request, arch)
    allowed = []
    for candidate in candidates:
        verdict = _constraint_violation(candidate, request, kb, serving)
        if verdict is None:
            allowed.append(candidate)
        else:
            excluded.append(verdict)
    plans = planner.plan_all(allowed, say, pool)
    kept: list[tuple[Candidate, TrainingPlan]] = []
    for candidate in allowed:
        plan = plans[candidate.method]
        if isinstance(plan, PeftpickError):
            excluded.append(Exclusion(candidate.method, candidate.display_name, "architecture", str(plan)))
        elif plan.fit == "does not fit":
            excluded.append(_memory_exclusion(candidate, plan, request))
        else:
            kept.append((candidate, plan))

    say("assessing expected quality against the benchmark runs")
    lora_speeds = _benchmark_speeds(kb, workload.benchmark)
    drifts = _benchmark_drifts(kb, workload.benchmark)
    full_model_bytes = _full_model_bytes(arch)
    listed_modules = tuple(workload.hook("layer_modules")(arch))  # made once, here, where torch is loaded

    def assess(candidate: Candidate, plan: TrainingPlan, probe: ProbeResult | None = None,
               reference: ProbeResult | None = None, use_losses: bool = False) -> Assessed:
        estimate = plan.estimate
        losses = list(probe.losses) if use_losses and probe is not None and probe.status == "ok" else None
        reference_losses = (list(reference.losses) if losses is not None and reference is not None
                            and reference.status == "ok" else None)
        quality = quality_models.call("assess", workload.benchmark, candidate, arch, estimate.trainable_params or None,
                                      estimate.total_params or None, losses, reference_losses, listed_modules)
        speed, speed_source, measured = _speed(candidate, probe, reference, lora_speeds)
        return Assessed(candidate, plan, serving(candidate),
                        _evidence(candidate, kb, workload.benchmark), quality, speed, speed_source, full_model_bytes,
                        probe, measured, drifts.get(candidate.benchmark_run or ""))

    assessed = [assess(candidate, plan) for candidate, plan in kept]
    probes: tuple[ProbeResult, ...] = ()
    gpu_name = None
    if assessed and _should_probe(probing, arch):
        shortlist = _shortlist(assessed, request, probing.top)
        probes, use_losses = _run_probes(arch, shortlist, request, probing, progress)
        by_method = {result.method: result for result in probes}
        reference = by_method.get("lora")
        updated = []
        for item in assessed:
            result = by_method.get(item.candidate.method)
            if result is None:
                updated.append(item)
                continue
            plan, exclusion = _measured_plan(item, result, request)
            if exclusion is not None:
                excluded.append(exclusion)
                continue
            if plan.estimate.source.startswith("measured on"):
                gpu_name = result.device
            updated.append(assess(item.candidate, plan, result, reference, use_losses))
        assessed = updated

    ranked = rank(assessed, request.goal, request.vram_gib, with_drift=bool(drifts))
    ranked = _with_runner_up_advice(ranked, assessed, request)
    uncertainty = _uncertainty(ranked)
    alternative = _qlora_alternative(request, arch, candidates, base_shape, seq_len, estimates, pool, ranked, say)
    return Recommendation(
        request=request,
        architecture=arch,
        assumptions=_assumptions(request, arch, probes, gpu_name, probing.wanted, workload, lengths, lengths_note),
        ranked=tuple(ranked),
        excluded=tuple(excluded),
        gpu=gpu_name,
        verdict=_verdict(ranked, excluded, request, arch, uncertainty, workload),
        goal_weights=dict(GOAL_WEIGHTS[request.goal]),
        uncertainty=uncertainty,
        probes=probes,
        lengths=lengths,
        alternative=alternative,
    )


def _qlora_alternative(request: Request, arch, candidates: list[Candidate], base_shape: TrainingShape, seq_len: int,
                       estimates, pool: WorkerPool, ranked: list[RankedCandidate], say) -> Alternative | None:
    """With several GPUs and an unquantized base: plain LoRA on one GPU over a 4-bit base (QLoRA), and which of
    the two plans is cheaper (fewer GPUs first, then the lower peak per GPU)."""
    lora = next((c for c in candidates if c.method == "lora"), None)
    if request.gpus == 1 or request.quant is not Quant.NONE or lora is None or arch.denoiser is not None:
        return None
    say("planning the single-GPU QLoRA alternative")
    planner = Planner(arch, request.vram_gib, request.batch_size, seq_len, Quant.INT4,
                      base_shape=dataclasses.replace(base_shape, quant=Quant.INT4.value), cache=estimates)
    plan = planner.plan_all([lora], say, pool)[lora.method]
    if isinstance(plan, PeftpickError):
        return None
    qlora_peak = (plan.estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB
    best = ranked[0] if ranked else None
    if plan.fit == "does not fit":
        comparison = (f"QLoRA does not fit one {request.vram_gib:g} GiB GPU either (about {qlora_peak:.1f} GiB); "
                      + ("the multi-GPU plan is the way." if best else "neither plan fits."))
    elif best is None:
        comparison = (f"QLoRA fits one GPU ({qlora_peak:.1f} GiB of {request.vram_gib:g}) where no multi-GPU plan "
                      f"fits {request.gpus} GPUs: it is the way.")
    else:
        comparison = (f"QLoRA is cheaper in GPUs: 1 instead of {best.plan.gpus} ({qlora_peak:.1f} GiB on one GPU, "
                      f"against {(best.estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB:.1f} GiB on each of "
                      f"{best.plan.gpus} with {best.plan.strategy}); the {best.plan.gpus}-GPU plan splits each batch "
                      f"over {best.plan.gpus} GPUs and trains the bf16 base, without QLoRA's 4-bit quantization error "
                      "or its dequantization in every step (speeds not measured here).")
    return Alternative("QLoRA on 1 GPU", lora, plan, comparison)


# ------------------------------------------------------------------------------------ probes


def _should_probe(probing: ProbeRequest, arch) -> bool:
    if probing.wanted is False:
        return False
    if probing.wanted is True:
        return True
    from peftpick.probes.runner import choose_device

    # automatic: only where memory can be measured (a CUDA GPU that the installed torch can use)
    try:
        device, _ = choose_device(probing.device)
    except PeftpickError:
        return False
    return device.startswith("cuda")


def _shortlist(assessed: list[Assessed], request: Request, top: int) -> list[Assessed]:
    """The `top` candidates with the best prior utility (estimates and benchmark), plain LoRA always among them:
    its probe is the reference the others' losses and speeds are compared with."""
    from peftpick.recommender.ranking import utility

    ordered = sorted(assessed, key=lambda item: -utility(item, request.goal, request.vram_gib))
    chosen = ordered[:top]
    lora = next((item for item in assessed if item.candidate.method == "lora"), None)
    if lora is not None and lora not in chosen:
        chosen = [lora, *chosen[:top - 1]] if top > 1 else [lora]
    return sorted(chosen, key=lambda item: item.candidate.method != "lora")  # LoRA first: the reference


def _run_probes(arch, shortlist: list[Assessed], request: Request, probing: ProbeRequest,
                progress) -> tuple[tuple[ProbeResult, ...], bool]:
    """Probe the shortlist at each plan's settings; (results, whether their losses may feed the quality model)."""
    from peftpick.probes.runner import ProbeOptions, run_probes, weights_source

    try:
        weights_source(arch, random_weights=False)
        random_weights = False
    except PeftpickError:
        random_weights = True  # memory and speed are the same; losses from random weights say nothing of quality
    options = ProbeOptions(steps=probing.steps, batch_size=request.batch_size, seq_len=request.seq_len,
                           random_weights=random_weights, device=probing.device, data=probing.data,
                           resolution=request.resolution, frames=request.frames, cache=probing.cache)
    shapes = {item.candidate.method: item.plan for item in shortlist}
    results = run_probes(arch, [item.candidate for item in shortlist], shapes, options,
                         progress=progress if progress is not None else False)
    return tuple(results), not random_weights and workload_of(arch).probe_losses_inform_quality


def _measured_plan(item: Assessed, result: ProbeResult, request: Request) -> tuple[TrainingPlan, Exclusion | None]:
    """The plan with the probe's measured figures in place of the estimate, or the exclusion the probe showed."""
    import dataclasses

    from peftpick.probes.results import StackMismatch, probe_to_estimate

    label = item.candidate.display_name
    if result.status == "oom":
        tried = result.shape
        return item.plan, Exclusion(
            item.candidate.method, label, "memory",
            f"{label}: ran out of memory on {result.device} (measured by a probe) even with micro-batch "
            f"{tried.batch_size} and gradient checkpointing; {_shrink_hint(request)}")
    if result.status != "ok" or result.peak_reserved_bytes is None:
        return item.plan, None  # not measured (CPU, or the probe failed): the estimate stands
    try:
        estimate = probe_to_estimate(result, estimate=item.plan.estimate)
    except StackMismatch:  # the probe ran another stack than the plan's (a fallback): its figures are not the plan's
        return item.plan, None
    shape = result.shape
    fit = fit_of(estimate, request.vram_gib)
    if fit == "does not fit":
        need = (estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB
        return item.plan, Exclusion(
            item.candidate.method, label, "memory",
            f"{label}: needs {need:.1f} GiB measured on {result.device} with micro-batch {shape.batch_size}, more "
            f"than {request.vram_gib:g} GiB; {_shrink_hint(request)}")
    plan = dataclasses.replace(item.plan, micro_batch=shape.batch_size,
                               gradient_accumulation=shape.gradient_accumulation,
                               gradient_checkpointing=shape.gradient_checkpointing, estimate=estimate, fit=fit)
    return plan, None


# ------------------------------------------------------------------------------------ speed and size


def _benchmark_speeds(kb, benchmark: str) -> dict[str, float]:
    """Training time of the LoRA reference over each run's, by experiment (per step: full fine-tuning's image
    run trained fewer steps)."""
    table = kb.benchmarks
    reference = table.lora_reference(benchmark)
    lora_step = float(reference["train_time"]) / max(float(reference["max_steps"]), 1.0)
    frame = table.frame[table.frame["benchmark"] == benchmark]
    return {str(row["experiment"]): lora_step / (float(row["train_time"]) / max(float(row["max_steps"]), 1.0))
            for _, row in frame.iterrows() if float(row["train_time"]) > 0}


def _benchmark_drifts(kb, benchmark: str) -> dict[str, float]:
    """Drift (how far outputs for unrelated prompts move; lower is better) of each run, by experiment; empty when
    the benchmark measures none (MetaMathQA)."""
    import math

    frame = kb.benchmarks.frame
    frame = frame[frame["benchmark"] == benchmark]
    return {str(row["experiment"]): float(row["drift"]) for _, row in frame.iterrows()
            if isinstance(row["drift"], float) and math.isfinite(row["drift"])}


def _speed(candidate: Candidate, probe: ProbeResult | None, reference: ProbeResult | None,
           benchmark_speeds: dict[str, float]) -> tuple[float | None, str, bool]:
    """(steps per second relative to LoRA, where the figure comes from, whether it was measured at the plan)."""
    if (probe is not None and reference is not None and probe.status == "ok" and reference.status == "ok"
            and probe.step_seconds and reference.step_seconds and probe.device == reference.device
            and probe.device != "cpu"):
        return reference.step_seconds / probe.step_seconds, f"measured on {probe.device}", True
    run = candidate.benchmark_run
    if run is not None and run in benchmark_speeds:
        return benchmark_speeds[run], f"benchmark {run}", False
    if candidate.peft_type == "LORA" and candidate.optimizer == "adamw" and not candidate.peft_kwargs.get("use_dora"):
        # another initialisation of plain LoRA (PiSSA, OLoRA): the same computation per step as LoRA
        return 1.0, "benchmark: plain LoRA's (same computation per step)", False
    return None, "unknown (taken as LoRA's)", False


def _full_model_bytes(arch) -> int:
    bytes_per_value = 4 if str(arch.dtype).endswith("float32") else 2
    return workload_of(arch).hook("count_parameters")(arch) * bytes_per_value


def _uncertainty(ranked: list[RankedCandidate]) -> tuple[str, ...]:
    """Notes for the groups of top candidates that the quality figures cannot order (the best one's group first)."""
    from peftpick.recommender.uncertainty import overlap_note, overlapping

    top = [r for r in ranked[:TOP_COMPARED] if r.quality is not None and not r.flags]
    predictions = {r.candidate.display_name: r.quality for r in top}
    groups = overlapping(predictions)
    if not top:
        return ()
    best = top[0].candidate.display_name
    groups.sort(key=lambda group: best not in group)
    return tuple(overlap_note(group, predictions) for group in groups)


def default_workers() -> int:
    """One estimate worker per CPU core available to this process, at most 4."""
    import os

    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# ------------------------------------------------------------------------------------ hard constraints


class _ServingJudge:
    """Serving verdicts for one request: the stack's installed version is looked up once."""

    def __init__(self, kb, request: Request, arch=None):
        from peftpick.knowledge import ImageLaunchArgs
        from peftpick.knowledge.serving import LaunchArgs, installed_version

        self._kb, self._request = kb, request
        stack = kb.stack(request.serve)
        self.installed = installed_version(stack) if stack is not None else None
        named = ((arch.local_path or arch.hub_id) if arch is not None else None) or request.model
        denoiser = arch.denoiser if arch is not None else None
        self._family = denoiser.family if denoiser is not None else None
        self._launch = (ImageLaunchArgs(base=named, pipeline=denoiser.pipeline_class or "DiffusionPipeline",
                                        denoiser_class=denoiser.diffusers_class,
                                        component="unet" if denoiser.diffusers_class.startswith("UNet")
                                        else "transformer")
                        if denoiser is not None else LaunchArgs(base=named))

    def __call__(self, candidate: Candidate):
        return self._kb.serving_verdict(self._request.serve, candidate, self._request.multi_adapter,
                                        self.installed, self._launch, family=self._family)


def _constraint_violation(candidate: Candidate, request: Request, kb,
                          serving: _ServingJudge | None = None) -> Exclusion | None:
    label = candidate.display_name
    if request.quant is not Quant.NONE:
        if candidate.peft_type is None:
            return Exclusion(candidate.method, label, "quantization",
                             f"{label}: updates the base weights, which a {request.quant.value} quantized base cannot "
                             "hold; drop --quant or pick an adapter")
        backend = "bnb_8bit" if request.quant is Quant.INT8 else "bnb_4bit"
        caps = kb.capabilities_of(candidate.peft_type)
        if caps.supports_quantization(backend) is False:
            return Exclusion(candidate.method, label, "quantization",
                             f"{label}: PEFT has no bitsandbytes {request.quant.value} support for "
                             f"{candidate.peft_type} layers; drop --quant or pick LoRA, OFT, IA3 or VeRA")
    verdict = (serving or _ServingJudge(kb, request))(candidate)
    if verdict.route == "cannot":
        constraint = "multi-adapter" if request.multi_adapter else "serving"
        return Exclusion(candidate.method, label, constraint, verdict.reason)
    return None


def _liger_patches(arch) -> bool:
    if arch.denoiser is not None:
        return False
    from peftpick.estimator.liger_models import liger_model_types

    return arch.model_type in liger_model_types()[0]


def _shrink_hint(request: Request) -> str:
    """What to change when nothing fits: the GPU, the size of a sample, the base's precision."""
    if request.resolution is not None:  # a denoiser
        return "use a larger GPU, a lower --resolution" + (" or fewer --frames" if request.frames else "")
    if request.gpus > 1:
        return "use more or larger GPUs, a CPU-offload --strategy (fsdp2-offload, zero3-offload) or a shorter --seq-len"
    if request.quant is Quant.NONE:
        return "use a larger GPU (or --gpus N), a shorter --seq-len or --quant 4bit"
    return "use a larger GPU or a shorter --seq-len"


def _memory_exclusion(candidate: Candidate, plan, request: Request) -> Exclusion:
    need = (plan.estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB
    held = lower_bound_held(plan.estimate)
    if held is not None:
        return Exclusion(
            candidate.method, candidate.display_name, "memory",
            f"{candidate.display_name}: needs more than {need:.1f} GiB whatever the micro-batch (its {held} alone, "
            f"not traced), more than {request.vram_gib:g} GiB; use a larger GPU or an adapter",
        )
    upcast = plan.estimate.breakdown.get("fp32 upcasts", 0)
    trl_hint = (f"; or --trainer trl: PEFT's prepare_model_for_kbit_training holds {upcast / GIB:.1f} GiB of float32 "
                "copies of the embeddings, norms and output head, which TRL's SFTTrainer keeps in bf16 (and it "
                "never builds the full logits)" if upcast and request.trainer is not Trainer.TRL else "")
    return Exclusion(
        candidate.method, candidate.display_name, "memory",
        f"{candidate.display_name}: needs about {need:.1f} GiB{_per_gpu_words(plan)} even with micro-batch "
        f"{plan.micro_batch} and gradient checkpointing"
        + (f" and {OPTIMIZER_LABELS[plan.optimizer]}" if plan.optimizer != candidate.optimizer else "")
        + f" (estimated), more than {request.vram_gib:g} GiB; "
        f"{_shrink_hint(request)}{trl_hint}",
    )


# ------------------------------------------------------------------------------------ evidence


def _evidence(candidate: Candidate, kb, benchmark: str):
    """The benchmark run behind the candidate's settings, or None."""
    table = kb.benchmarks
    run = candidate.benchmark_run
    if run is None or not table.has(benchmark, run):
        return None
    return table.evidence(benchmark, run)


# ------------------------------------------------------------------------------------ words


def _settings_words(ranked: RankedCandidate) -> str:
    kwargs = ranked.candidate.peft_kwargs
    parts = []
    # the method's size setting (OFT and BOFT save r=0 and size their blocks instead)
    size_key = next((key for key in ("r", "oft_block_size", "boft_block_size") if kwargs.get(key) not in (None, 0)), None)
    if size_key is not None:
        parts.append(f"{size_key}={kwargs[size_key]}")
    if "lora_alpha" in kwargs:
        parts.append(f"alpha={kwargs['lora_alpha']}")
    targets = kwargs.get("target_modules")
    if targets:
        parts.append("on " + (", ".join(targets) if isinstance(targets, (list, tuple, set)) else str(targets)))
    return " ".join(parts)


def _loss_lever_words(plan: TrainingPlan) -> str | None:
    """What the planner's switch to Liger's loss bought, in one sentence (None when it did not switch)."""
    if plan.loss != "liger" or plan.loss_saving_bytes is None:
        return None
    saved = f"Liger's fused cross-entropy (pip install liger-kernel) saves {plan.loss_saving_bytes / GIB:.1f} GiB"
    if plan.gradient_checkpointing:
        return saved + " (no full logits); gradient checkpointing is still needed to fit."
    return (saved + ", so gradient checkpointing can stay off (the ranking counts checkpointing as "
            f"{CHECKPOINTING_SLOWDOWN:g}x slower: it recomputes the forward in backward; not measured here).")


def _optimizer_lever_words(plan: TrainingPlan) -> str | None:
    """What the planner's switch to 8-bit AdamW bought, in one sentence (None when it did not switch)."""
    if plan.optimizer_saving_bytes is None:
        return None
    return (f"bitsandbytes' 8-bit AdamW (pip install bitsandbytes; CUDA) keeps {plan.optimizer_saving_bytes / GIB:.1f} "
            "GiB less optimizer state than AdamW, which does not fit here; the benchmark's quality figures were "
            "measured with AdamW.")


def _per_gpu_words(plan: TrainingPlan) -> str:
    """" per GPU with fsdp2 over 4 GPUs" for a multi-GPU plan, "" for one GPU."""
    return "" if plan.gpus == 1 and plan.strategy == "single" else f" per GPU with {plan.strategy} over {plan.gpus} GPUs"


def _gpu_words(request: Request) -> str:
    return f"a {request.vram_gib:g} GiB GPU" if request.gpus == 1 else f"{request.gpus} x {request.vram_gib:g} GiB GPUs"


def _verdict(ranked: list[RankedCandidate], excluded: list[Exclusion], request: Request, arch,
             uncertainty: tuple[str, ...] = (), workload: WorkloadSpec = CAUSAL_LM) -> str:
    stack = "no particular serving stack" if request.serve is Serve.NONE else request.serve.value
    if not ranked:
        reasons = {e.constraint for e in excluded}
        return (f"No method fits {arch.name} on {_gpu_words(request).removeprefix('a ')} with {stack} "
                f"({', '.join(sorted(reasons))} ruled them all out); see the exclusions for what to change.")
    best = ranked[0]
    plan = best.plan
    words = [f"For {arch.name} on {_gpu_words(request)} serving with {stack}, use "
             f"{best.candidate.display_name} ({_settings_words(best)})."]
    quality = best.quality
    if quality is not None and quality.source == "benchmark run" and best.evidence is not None:
        words.append(f"It scores {best.evidence.score:.1%} {best.evidence.metric} on {best.evidence.benchmark} "
                     f"({quality.relative:.2f}x plain LoRA, run {best.evidence.experiment}).")
    elif quality is not None:
        words.append(f"Expected quality {quality.relative:.2f}x plain LoRA ({quality.level:.0%} interval "
                     f"{quality.low:.2f}-{quality.high:.2f}, from the quality model).")
    source = plan.estimate.source or "estimated"
    if plan.gpus > 1 or plan.strategy != "single":
        words.append(f"Train with {plan.strategy} over {plan.gpus} GPUs (the report shows the launch command and "
                     "its config).")
    words.append(f"Peak: {plan.estimate.peak_reserved_bytes / GIB:.1f} GiB reserved ({source}) with micro-batch "
                 f"{plan.micro_batch}" + (f" x {plan.gradient_accumulation} accumulation" if plan.gradient_accumulation > 1 else "")
                 + (" and gradient checkpointing" if plan.gradient_checkpointing else "") + f" ({plan.fit}).")
    for lever in (_loss_lever_words(plan), _optimizer_lever_words(plan)):
        if lever:
            words.append(lever)
    words.append(best.serving.reason.rstrip(".") + ".")
    if best.flags:
        words.append("Warning: every ranked method was flagged: " + best.flags[0] + ".")
    if len(ranked) > 1:
        second = ranked[1]
        words.append(f"Runner-up: {second.candidate.display_name}" + (f"; prefer it when {second.prefer_when}" if second.prefer_when else "") + ".")
    if uncertainty and best.candidate.display_name in uncertainty[0]:
        words.append(uncertainty[0])
    words.append(f"The benchmark is one model ({workload.benchmark_model} on {workload.benchmark}): its scores are a "
                 "prior for your model and task; a probe on your model is the check.")
    return " ".join(words)


def _with_runner_up_advice(ranked: list[RankedCandidate], assessed: list[Assessed], request: Request) -> list[RankedCandidate]:
    if len(ranked) < 2:
        return ranked
    import dataclasses

    by_method = {a.candidate.method: a for a in assessed}
    best, second = by_method[ranked[0].method], by_method[ranked[1].method]
    # Each reason completes "prefer it when ...".
    reasons = []
    saved = best.plan.estimate.peak_reserved_bytes - second.plan.estimate.peak_reserved_bytes
    if saved > 0.02 * request.vram_gib * GIB:
        reasons.append(f"memory gets tight (longer sequences, bigger batches): it needs {saved / GIB:.1f} GiB less")
    if quality_of(second) > quality_of(best) + 0.005:
        reasons.append("quality matters more than " + ("serving it as an adapter" if best.serving.route == "native"
                                                       else "memory or speed")
                       + f": it scores {quality_of(second):.2f}x LoRA on the benchmark")
    if speed_of(second) > speed_of(best) * 1.1:
        reasons.append(f"training time counts (many runs, a tight budget): it trained {speed_of(second) / speed_of(best):.1f}x "
                       "as fast in the benchmark")
    if second.serving.route == "native" and best.serving.route in ("merge", "convert"):
        reasons.append(f"adapters must stay swappable on {request.serve.value}: it loads natively")
    if not reasons:
        reasons.append("the top choice disappoints in a probe on your data: it is close behind on the same evidence")
    ranked = list(ranked)
    ranked[1] = dataclasses.replace(ranked[1], prefer_when="; ".join(reasons))
    return ranked


def _data_lengths(request: Request, arch, data) -> tuple[LengthProfile | None, str | None]:
    """The token lengths of the user's data (language models), or why they are not used."""
    if data is None or arch.denoiser is not None:
        return None, None
    from peftpick.probes.data import ModelTokens, length_profile, load_probe_data, model_encoder

    read = data if not isinstance(data, (str, os.PathLike)) else load_probe_data(data)
    encoder = model_encoder(arch)
    if not isinstance(encoder, ModelTokens):
        return None, (f"--data given, but the tokenizer of {arch.name} is not on this machine: its lengths are not "
                      "measured and every sequence is assumed full (pass a local model folder with its tokenizer)")
    return length_profile(read, encoder, request.seq_len), None


def _shape_words(request: Request, arch, lengths: LengthProfile | None = None, lengths_note: str | None = None) -> str:
    """What one training batch is, in words, with the options that change it."""
    denoiser = arch.denoiser
    if denoiser is None:
        defaults = (["--seq-len"] if request.seq_len == 768 else []) + ([] if request.batch_given else ["--batch-size"])
        head = (f"sequence length {request.seq_len} and effective batch {request.batch_size}"
                + (f" (defaults: change with {' and '.join(defaults)})" if defaults else ""))
        if request.gpus > 1:
            share = -(-request.batch_size // request.gpus)
            head += (f", shared by {request.gpus} GPUs: {share} per GPU and step"
                     + (f" (so the effective batch is {share * request.gpus})" if share * request.gpus != request.batch_size else "")
                     + "; strategies tried, cheapest first: " + ", ".join(s.value for s in strategies_for(request))
                     + ("; DeepSpeed is not installed here, so ZeRO was not tried"
                        if request.strategy is Strategy.AUTO and not deepspeed_installed() else ""))
        if lengths is None:
            return (head + "; every sequence filled to the full length with labels on every token (the worst batch)"
                    + (f"; {lengths_note}" if lengths_note else ""))
        measured = (f"; your data ({lengths.source}; {lengths.tokenizer}): {lengths.examples:,} examples, median "
                    f"{lengths.median}, 95th percentile {lengths.p95}, longest {lengths.longest} tokens"
                    + (f", {lengths.over_seq_len:,} longer than --seq-len (truncated)" if lengths.over_seq_len else ""))
        longest = min(lengths.longest, request.seq_len)
        if request.packing:
            return (head + measured + f"; packed into full rows of {request.seq_len} tokens (no padding): the "
                    "estimate is that of full rows")
        return (head + measured + f"; batches padded to their longest example, so the peak is set by a batch "
                f"holding the longest ({longest} tokens, which the estimate uses); on average "
                f"{min(lengths.mean, longest) / longest:.0%} of a padded row is real tokens (--packing fills "
                "rows instead)")
    side = request.resolution // (denoiser.vae_scale * denoiser.patch)
    frames = ""
    tokens = side * side
    if denoiser.vae_temporal and request.frames:
        latent_frames = 1 + (request.frames - 1) // denoiser.vae_temporal
        frames = f", {request.frames} frames ({latent_frames} latent frames)"
        tokens *= latent_frames
    inputs = ("text embeddings and latents computed beforehand (text encoders and VAE off the GPU while training)"
              if request.cached_inputs else
              "text encoders and VAE resident on the GPU in " + arch.dtype + " (modelled from their parameter counts)")
    loss = {"flow": "flow matching (velocity)", "epsilon": "noise prediction", "v": "v-prediction"}[denoiser.objective]
    return (f"{request.resolution} x {request.resolution} pixels{frames}: {tokens:,} latent tokens and "
            f"{denoiser.text_len} text tokens per sample, effective batch {request.batch_size} (change with "
            f"--resolution{', --frames' if denoiser.vae_temporal else ''} and --batch-size); {loss} loss; {inputs}")


def _assumptions(request: Request, arch, probes: tuple[ProbeResult, ...] = (), gpu_name: str | None = None,
                 probe_wanted: bool | None = False, workload: WorkloadSpec = CAUSAL_LM,
                 lengths: LengthProfile | None = None, lengths_note: str | None = None) -> tuple[str, ...]:
    """What the figures rest on, beyond what the report states from the request itself."""
    weights = GOAL_WEIGHTS[request.goal]
    if gpu_name is not None:
        memory = (f"memory of the {sum(p.status == 'ok' for p in probes)} probed candidates measured on {gpu_name} "
                  "(peak reserved over the probe's optimizer steps); the others are estimates")
    elif probes:
        memory = (f"probes ran on {probes[0].device}, which measures loss and speed, not GPU memory: memory figures "
                  "are estimates from tracing the training step on the meta device")
    elif probe_wanted is None:  # automatic probing found no CUDA GPU that torch can use
        memory = ("no CUDA GPU usable here, so nothing was probed: memory figures are estimates from tracing the "
                  "training step on the meta device")
    elif request.gpus > 1:
        memory = (f"not probed (the recommendation's probes run on one GPU): per-GPU figures are estimates from "
                  f"tracing the training step on the meta device; `peftpick probe --gpus {request.gpus}` measures the "
                  "FSDP2 run on this machine's GPUs")
    else:
        memory = ("not probed (--no-probe): memory figures are estimates from tracing the training step on the "
                  "meta device")
    items = [
        f"base weights in {arch.dtype}" + ("" if request.quant is Quant.NONE else f", quantized to {request.quant.value} with bitsandbytes"),
        _shape_words(request, arch, lengths, lengths_note),
        "optimizer: torch AdamW (for LoRA-FA, PEFT's LoRA-FA optimizer); learning rates from the benchmark runs",
        f"'fits' keeps {FIT_HEADROOM:.0%} of the VRAM free after the peak reserved memory plus "
        f"{CONTEXT_RESERVE_BYTES / GIB:.1f} GiB for the CUDA context; 'marginal' fits without that margin",
        memory,
    ]
    if probes:
        data = next((p.data for p in probes if p.data), "")
        items.append(f"probes: {len(probes)} candidates micro-trained" + (f" on {data}" if data else "")
                     + "; a method whose probe loss does not fall is flagged and ranked last")
    items += [
        "ranking: hard constraints, then the Pareto front over expected quality, peak memory, speed and adapter "
        "size first, then a utility with the weights of --goal " + request.goal.value + ": "
        + ", ".join(f"{axis} {weight:g}" for axis, weight in weights.items())
        + " (quality x LoRA, memory: share of the VRAM left free, speed: x LoRA capped at 2, divided by 2; size: "
        "1 - adapter size / full model size)",
        f"expected quality: the benchmark run where the candidate is one (interval: {workload.run_interval_words}), "
        f"else a random forest fit on the {workload.benchmark} runs (80 % conformal interval); PEFT's method "
        f"comparison suite, {workload.benchmark}: {workload.benchmark_model}, one run per setting, "
        f"{workload.metric_words}, relative to the suite's plain LoRA reference run "
        f"({LORA_REFERENCE[workload.benchmark]})",
    ]
    if arch.denoiser is not None:
        items.append("drift (how far the model's images for unrelated prompts move; lower keeps more of the base "
                     "model) from each candidate's image run is a fifth Pareto axis; candidates without a run of "
                     "their own have none")
    return tuple(items)
