"""From a request to a ranked, justified recommendation.

Flow: validate the request (`request.py`), resolve the architecture, build every candidate method's concrete
settings for it (`peftpick.methods`), apply the hard constraints (serving route on the chosen stack, quantized
base, the VRAM: `planning.py` finds settings that fit), then rank the rest (`ranking.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.recommender.planning import CONTEXT_RESERVE_BYTES, FIT_HEADROOM, Planner, WorkerPool, fit_of
from peftpick.recommender.ranking import GOAL_WEIGHTS, Assessed, quality_of, rank, speed_of
from peftpick.recommender.request import validate_request
from peftpick.types import (
    GIB,
    Candidate,
    Exclusion,
    ProbeResult,
    Quant,
    RankedCandidate,
    Recommendation,
    Request,
    Serve,
    TrainingPlan,
)

BENCHMARK = "MetaMathQA"  # the text benchmark: the one whose base model is a causal LM like the user's
PROBE_TOP = 8  # candidates probed before ranking
TOP_COMPARED = 5  # candidates whose quality intervals the report compares

Progress = Callable[[str], None]


def recommend(
    model: Any,
    vram_gb: float | None = None,
    serve: str = "vllm",
    multi_adapter: bool = False,
    quant: str = "none",
    goal: str = "balanced",
    seq_len: int = 768,
    batch_size: int = 4,
    *,
    methods: list[str] | None = None,
    kb: Any = None,
    progress: Progress | None = None,
    workers: int | None = None,
    probe: bool | None = None,
    probe_steps: int = 10,
    probe_top: int = PROBE_TOP,
    data: Any = None,
    probe_device: str | None = None,
) -> Recommendation:
    """Rank PEFT methods for training `model` on a GPU with `vram_gb` GiB and serving on `serve`.

    model: bundled name (see `peftpick models`), local folder or config.json, hub id, or a PretrainedConfig.
    vram_gb: GiB of the training GPU; None reads the local GPU through NVML.
    methods: restrict to these catalogue keys (default: every method).
    workers: processes estimating memory at once (default 1: forking is unsafe in a process that has run
        multi-threaded CPU work, which a training script has; the command line passes `default_workers()`).
    probe: micro-train the shortlist (the `probe_top` candidates that may fit, best prior first, plain LoRA
        among them as the reference) before ranking. None: when a CUDA GPU is present; True: also on the CPU
        (small models; loss and speed, no memory); False: estimates only.
    probe_steps: measured optimizer steps per probe. data: the probes' training data (see `peftpick.probe`).
    probe_device: "cuda", "cuda:N" or "cpu"; None: the GPU when there is one.
    """
    request = validate_request(model, vram_gb, serve, multi_adapter, quant, goal, seq_len, batch_size)
    if probe not in (None, True, False):
        raise PeftpickError(f"probe must be True, False or None (automatic), got {probe!r}",
                            "pass probe=False for estimates only")
    if isinstance(probe_top, bool) or not isinstance(probe_top, int) or probe_top < 1:
        raise PeftpickError(f"probe_top must be a whole number of at least 1, got {probe_top!r}", "pass e.g. 8")
    probing = ProbeRequest(probe, probe_steps, probe_top, data, probe_device)
    with WorkerPool(workers or 1) as pool:
        return _recommend(request, model, methods, kb, progress, pool, probing)


@dataclass(frozen=True)
class ProbeRequest:
    """Whether and how to probe the shortlist (see `recommend`)."""

    wanted: bool | None = None
    steps: int = 10
    top: int = PROBE_TOP
    data: Any = None
    device: str | None = None


def _recommend(request: Request, model: Any, methods, kb, progress, pool: WorkerPool,
               probing: ProbeRequest = ProbeRequest(False)) -> Recommendation:
    from peftpick.knowledge import KnowledgeBase
    from peftpick.knowledge.architectures import resolve_model
    from peftpick.methods import candidates_for
    from peftpick.recommender.quality import QualityAssessor

    say = progress or (lambda _message: None)
    kb = kb or KnowledgeBase.load()
    say(f"resolving {request.model}")
    arch = resolve_model(model, kb.architectures)
    candidates, excluded = candidates_for(arch, kb, methods)
    if not candidates:
        if methods and excluded:  # the user named the methods: say why the first cannot be used
            raise PeftpickError(excluded[0].reason)
        raise PeftpickError(f"no method in the catalogue can be applied to {arch.name}", "check `peftpick models` and --methods")

    planner = Planner(arch, request.vram_gib, request.batch_size, request.seq_len, request.quant)
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

    say("fitting the quality model to the benchmark runs")
    assessor = QualityAssessor.from_knowledge(kb, BENCHMARK)
    lora_speeds = _benchmark_speeds(kb)
    full_model_bytes = _full_model_bytes(arch)

    def assess(candidate: Candidate, plan: TrainingPlan, probe: ProbeResult | None = None,
               reference: ProbeResult | None = None, use_losses: bool = False) -> Assessed:
        estimate = plan.estimate
        losses = list(probe.losses) if use_losses and probe is not None and probe.status == "ok" else None
        reference_losses = (list(reference.losses) if losses is not None and reference is not None
                            and reference.status == "ok" else None)
        quality = assessor.assess(candidate, arch, estimate.trainable_params or None, estimate.total_params or None,
                                  losses, reference_losses)
        speed, speed_source, measured = _speed(candidate, probe, reference, lora_speeds)
        return Assessed(candidate, plan, serving(candidate),
                        _evidence(candidate, kb), quality, speed, speed_source, full_model_bytes, probe, measured)

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

    ranked = rank(assessed, request.goal, request.vram_gib)
    ranked = _with_runner_up_advice(ranked, assessed, request)
    uncertainty = _uncertainty(ranked)
    return Recommendation(
        request=request,
        architecture=arch,
        assumptions=_assumptions(request, arch, probes, gpu_name, probing.wanted),
        ranked=tuple(ranked),
        excluded=tuple(excluded),
        gpu=gpu_name,
        verdict=_verdict(ranked, excluded, request, arch, uncertainty),
        goal_weights=dict(GOAL_WEIGHTS[request.goal]),
        uncertainty=uncertainty,
        probes=probes,
    )


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
                           random_weights=random_weights, device=probing.device, data=probing.data)
    shapes = {item.candidate.method: item.plan for item in shortlist}
    results = run_probes(arch, [item.candidate for item in shortlist], shapes, options,
                         progress=progress if progress is not None else False)
    return tuple(results), not random_weights


def _measured_plan(item: Assessed, result: ProbeResult, request: Request) -> tuple[TrainingPlan, Exclusion | None]:
    """The plan with the probe's measured figures in place of the estimate, or the exclusion the probe showed."""
    import dataclasses

    from peftpick.probes.results import probe_to_estimate

    label = item.candidate.display_name
    if result.status == "oom":
        tried = result.shape
        return item.plan, Exclusion(
            item.candidate.method, label, "memory",
            f"{label}: ran out of memory on {result.device} (measured by a probe) even with micro-batch "
            f"{tried.batch_size} and gradient checkpointing; use a larger GPU, a shorter --seq-len or --quant 4bit")
    if result.status != "ok" or result.peak_reserved_bytes is None:
        return item.plan, None  # not measured (CPU, or the probe failed): the estimate stands
    estimate = probe_to_estimate(result, estimate=item.plan.estimate)
    shape = result.shape
    fit = fit_of(estimate, request.vram_gib)
    if fit == "does not fit":
        need = (estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB
        return item.plan, Exclusion(
            item.candidate.method, label, "memory",
            f"{label}: needs {need:.1f} GiB measured on {result.device} with micro-batch {shape.batch_size}, more "
            f"than {request.vram_gib:g} GiB; use a larger GPU, a shorter --seq-len or --quant 4bit")
    plan = dataclasses.replace(item.plan, micro_batch=shape.batch_size,
                               gradient_accumulation=shape.gradient_accumulation,
                               gradient_checkpointing=shape.gradient_checkpointing, estimate=estimate, fit=fit)
    return plan, None


# ------------------------------------------------------------------------------------ speed and size


def _benchmark_speeds(kb) -> dict[str, float]:
    """Training time of the LoRA reference over each run's, by experiment."""
    table = kb.benchmarks
    lora_time = float(table.lora_reference(BENCHMARK)["train_time"])
    frame = table.frame[table.frame["benchmark"] == BENCHMARK]
    return {str(row["experiment"]): lora_time / float(row["train_time"])
            for _, row in frame.iterrows() if float(row["train_time"]) > 0}


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
    from peftpick.knowledge.architectures import count_parameters

    bytes_per_value = 4 if str(arch.dtype).endswith("float32") else 2
    return count_parameters(arch) * bytes_per_value


def _uncertainty(ranked: list[RankedCandidate]) -> tuple[str, ...]:
    """Notes for the groups of top candidates that the quality figures cannot order (the best one's group first)."""
    from peftpick.recommender.quality import overlap_note, overlapping

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
        from peftpick.knowledge.serving import LaunchArgs, installed_version

        self._kb, self._request = kb, request
        stack = kb.stack(request.serve)
        self.installed = installed_version(stack) if stack is not None else None
        named = (arch.local_path or arch.hub_id) if arch is not None else None
        self._launch = LaunchArgs(base=named or request.model)

    def __call__(self, candidate: Candidate):
        return self._kb.serving_verdict(self._request.serve, candidate, self._request.multi_adapter,
                                        self.installed, self._launch)


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


def _memory_exclusion(candidate: Candidate, plan, request: Request) -> Exclusion:
    need = (plan.estimate.peak_reserved_bytes + CONTEXT_RESERVE_BYTES) / GIB
    return Exclusion(
        candidate.method, candidate.display_name, "memory",
        f"{candidate.display_name}: needs about {need:.1f} GiB even with micro-batch {plan.micro_batch} and "
        f"gradient checkpointing (estimated), more than {request.vram_gib:g} GiB; use a larger GPU, a shorter "
        f"--seq-len or --quant 4bit",
    )


# ------------------------------------------------------------------------------------ evidence


def _evidence(candidate: Candidate, kb):
    """The benchmark run behind the candidate's settings, or None."""
    table = kb.benchmarks
    run = candidate.benchmark_run
    if run is None or not table.has(BENCHMARK, run):
        return None
    return table.evidence(BENCHMARK, run)


# ------------------------------------------------------------------------------------ words


def _settings_words(ranked: RankedCandidate) -> str:
    kwargs = ranked.candidate.peft_kwargs
    parts = []
    if "r" in kwargs:
        parts.append(f"r={kwargs['r']}")
    if "lora_alpha" in kwargs:
        parts.append(f"alpha={kwargs['lora_alpha']}")
    targets = kwargs.get("target_modules")
    if targets:
        parts.append("on " + (", ".join(targets) if isinstance(targets, (list, tuple, set)) else str(targets)))
    return " ".join(parts)


def _verdict(ranked: list[RankedCandidate], excluded: list[Exclusion], request: Request, arch,
             uncertainty: tuple[str, ...] = ()) -> str:
    stack = "no particular serving stack" if request.serve is Serve.NONE else request.serve.value
    if not ranked:
        reasons = {e.constraint for e in excluded}
        return (f"No method fits {arch.name} on {request.vram_gib:g} GiB with {stack} "
                f"({', '.join(sorted(reasons))} ruled them all out); see the exclusions for what to change.")
    best = ranked[0]
    plan = best.plan
    words = [f"For {arch.name} on a {request.vram_gib:g} GiB GPU serving with {stack}, use "
             f"{best.candidate.display_name} ({_settings_words(best)})."]
    quality = best.quality
    if quality is not None and quality.source == "benchmark run" and best.evidence is not None:
        words.append(f"It scores {best.evidence.score:.1%} {best.evidence.metric} on {best.evidence.benchmark} "
                     f"({quality.relative:.2f}x plain LoRA, run {best.evidence.experiment}).")
    elif quality is not None:
        words.append(f"Expected quality {quality.relative:.2f}x plain LoRA ({quality.level:.0%} interval "
                     f"{quality.low:.2f}-{quality.high:.2f}, from the quality model).")
    source = plan.estimate.source or "estimated"
    words.append(f"Peak: {plan.estimate.peak_reserved_bytes / GIB:.1f} GiB reserved ({source}) with micro-batch "
                 f"{plan.micro_batch}" + (f" x {plan.gradient_accumulation} accumulation" if plan.gradient_accumulation > 1 else "")
                 + (" and gradient checkpointing" if plan.gradient_checkpointing else "") + f" ({plan.fit}).")
    words.append(best.serving.reason.rstrip(".") + ".")
    if best.flags:
        words.append("Warning: every ranked method was flagged: " + best.flags[0] + ".")
    if len(ranked) > 1:
        second = ranked[1]
        words.append(f"Runner-up: {second.candidate.display_name}" + (f"; prefer it when {second.prefer_when}" if second.prefer_when else "") + ".")
    if uncertainty and best.candidate.display_name in uncertainty[0]:
        words.append(uncertainty[0])
    words.append(f"The benchmark is one model (Llama-3.2-3B on {BENCHMARK}): its scores are a prior for your "
                 "model and task; a probe on your model is the check.")
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


def _assumptions(request: Request, arch, probes: tuple[ProbeResult, ...] = (), gpu_name: str | None = None,
                 probe_wanted: bool | None = False) -> tuple[str, ...]:
    """What the figures rest on, beyond what the report states from the request itself."""
    weights = GOAL_WEIGHTS[request.goal]
    defaults = [name for name, value, default in (("--seq-len", request.seq_len, 768), ("--batch-size", request.batch_size, 4))
                if value == default]
    if gpu_name is not None:
        memory = (f"memory of the {sum(p.status == 'ok' for p in probes)} probed candidates measured on {gpu_name} "
                  "(peak reserved over the probe's optimizer steps); the others are estimates")
    elif probes:
        memory = (f"probes ran on {probes[0].device}, which measures loss and speed, not GPU memory: memory figures "
                  "are estimates from tracing the training step on the meta device")
    elif probe_wanted is None:  # automatic probing found no CUDA GPU that torch can use
        memory = ("no CUDA GPU usable here, so nothing was probed: memory figures are estimates from tracing the "
                  "training step on the meta device")
    else:
        memory = ("not probed (--no-probe): memory figures are estimates from tracing the training step on the "
                  "meta device")
    items = [
        f"base weights in {arch.dtype}" + ("" if request.quant is Quant.NONE else f", quantized to {request.quant.value} with bitsandbytes"),
        f"sequence length {request.seq_len} and effective batch {request.batch_size}"
        + (f" (defaults: change with {' and '.join(defaults)})" if defaults else "")
        + "; every sequence filled to the full length with labels on every token (the worst batch)",
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
        f"expected quality: the benchmark run where the candidate is one (interval: the test set's sampling noise), "
        f"else a random forest fit on the {BENCHMARK} runs (80 % conformal interval); PEFT's method comparison "
        f"suite, {BENCHMARK}: Llama-3.2-3B, one run per setting, scores relative to plain LoRA r32 on q_proj, v_proj",
    ]
    return tuple(items)
