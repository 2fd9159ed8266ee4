"""Rank the candidates that passed every hard constraint: Pareto front first, then a utility set by --goal.

Each candidate has four figures, each printed in the report with where it came from:
- expected quality: benchmark score relative to plain LoRA (1.0 = LoRA), the candidate's own run or the quality
  model's prediction (`quality.py`), with an interval;
- peak memory: peak reserved bytes of its training plan, measured by a probe or estimated;
- speed: training steps per second relative to plain LoRA (measured by the probes on the user's GPU when both were
  probed there, else the benchmark's training times), slowed by gradient checkpointing when the plan needs it;
- adapter size: bytes `save_pretrained` writes (the whole model for full fine-tuning).

Candidate A dominates B when A is at least as good on all four and better on one; the front is every candidate
nothing dominates. The front is listed first, each part ordered by the utility

    weights[quality] * quality + weights[memory] * (1 - peak / VRAM) + weights[speed] * min(speed, 2) / 2
    + weights[size] * (1 - adapter bytes / full model bytes)

with the weights of the goal (GOAL_WEIGHTS, printed in the report). A dominated candidate can never have the higher
utility of the two, so the front-first order only moves candidates nothing dominates ahead of dominated ones.
Candidates whose probe loss does not fall go last, whatever their benchmark says. Ties go to the smaller peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peftpick.types import (
    GIB,
    BenchmarkEvidence,
    Candidate,
    Goal,
    ProbeResult,
    QualityPrediction,
    RankedCandidate,
    ServingVerdict,
    TrainingPlan,
)

GOAL_WEIGHTS: dict[Goal, dict[str, float]] = {
    Goal.BALANCED: {"quality": 0.6, "memory": 0.15, "speed": 0.15, "size": 0.1},
    Goal.QUALITY: {"quality": 0.9, "memory": 0.04, "speed": 0.03, "size": 0.03},
    Goal.MEMORY: {"quality": 0.2, "memory": 0.7, "speed": 0.05, "size": 0.05},
    Goal.SPEED: {"quality": 0.2, "memory": 0.05, "speed": 0.7, "size": 0.05},
}
CHECKPOINTING_SLOWDOWN = 1.3  # recomputing the forward in backward costs about a third more time per step
SPEED_CAP = 2.0  # speeds above twice LoRA's earn no more utility
# Differences the Pareto comparison ignores: 1 % of LoRA's score (below a test set's sampling noise), 1 % of peak
# memory (the estimator's error), 5 % of speed (benchmark timings of one run each), 5 % of adapter size.
AXIS_RESOLUTION = {"quality": 0.01, "memory": 0.01, "speed": 0.05, "size": 0.05, "drift": 0.01}
AXES = ("quality", "memory", "speed", "size")  # and "drift" where the benchmark measures it (denoisers)


@dataclass(frozen=True)
class Assessed:
    """A candidate that passed the hard constraints, with everything the ranking looks at."""

    candidate: Candidate
    plan: TrainingPlan
    serving: ServingVerdict
    evidence: BenchmarkEvidence | None
    quality: QualityPrediction
    relative_speed: float | None  # steps per second relative to plain LoRA, before checkpointing; None: unknown
    speed_source: str = ""
    full_model_bytes: int = 0  # what full fine-tuning would save: the size scale for adapters
    probe: ProbeResult | None = None
    speed_measured: bool = False  # relative_speed was measured at the plan's settings (checkpointing included)
    drift: float | None = None  # the candidate's benchmark run's drift (image suite; lower is better)

    @property
    def peak_bytes(self) -> int:
        return self.plan.estimate.peak_reserved_bytes

    @property
    def adapter_bytes(self) -> int:
        return self.plan.estimate.adapter_file_bytes or 0


def quality_of(item: Assessed) -> float:
    return item.quality.relative


def speed_of(item: Assessed) -> float:
    """Relative speed of the plan: unknown counts as LoRA's; checkpointing recomputes the forward."""
    speed = item.relative_speed if item.relative_speed is not None else 1.0
    if item.plan.gradient_checkpointing and not item.speed_measured:
        speed /= CHECKPOINTING_SLOWDOWN
    return speed


def memory_headroom(item: Assessed, vram_gib: float) -> float:
    return max(0.0, 1.0 - item.peak_bytes / (vram_gib * GIB))


def size_share(item: Assessed) -> float:
    """1 - adapter size / full model size (0 for full fine-tuning, close to 1 for small adapters)."""
    if item.full_model_bytes <= 0:
        return 1.0
    return max(0.0, 1.0 - item.adapter_bytes / item.full_model_bytes)


def utility(item: Assessed, goal: Goal, vram_gib: float) -> float:
    weights = GOAL_WEIGHTS[goal]
    return (weights["quality"] * quality_of(item) + weights["memory"] * memory_headroom(item, vram_gib)
            + weights["speed"] * min(speed_of(item), SPEED_CAP) / SPEED_CAP + weights["size"] * size_share(item))


def axis_values(item: Assessed, with_drift: bool = False, neutral_drift: float = 0.0) -> tuple[float, ...]:
    """The Pareto axes, each oriented so that larger is better and a difference of 1 means the same on each:
    quality in units of AXIS_RESOLUTION (x LoRA), memory, speed and size as log ratios in units of their
    resolution, and with `with_drift` the drift (absolute, lower is better; unknown counts as `neutral_drift`)."""
    values = (quality_of(item) / AXIS_RESOLUTION["quality"],
              -math.log(max(item.peak_bytes, 1)) / AXIS_RESOLUTION["memory"],
              math.log(max(speed_of(item), 1e-9)) / AXIS_RESOLUTION["speed"],
              -math.log(max(item.adapter_bytes, 1)) / AXIS_RESOLUTION["size"])
    if not with_drift:
        return values
    drift = item.drift if item.drift is not None else neutral_drift
    return (*values, -drift / AXIS_RESOLUTION["drift"])


def dominates(a: tuple[float, ...], b: tuple[float, ...], resolution: float = 1.0) -> bool:
    """a is at least as good as b on every axis and better on one (larger is better), where differences below
    `resolution` count as equal: figures that close are the same within what they can tell apart."""
    return (all(x >= y - resolution for x, y in zip(a, b))
            and any(x > y + resolution for x, y in zip(a, b)))


def pareto_front(values: dict[str, tuple[float, ...]]) -> dict[str, tuple[str, ...]]:
    """For each key, the keys that dominate it (empty: it is on the front)."""
    return {key: tuple(other for other, theirs in values.items() if other != key and dominates(theirs, mine))
            for key, mine in values.items()}


def rank(items: list[Assessed], goal: Goal, vram_gib: float, with_drift: bool = False) -> list[RankedCandidate]:
    """`with_drift`: drift is a fifth Pareto axis (the image benchmark measures it); a candidate without a run of
    its own counts as plain LoRA's drift."""
    names = {item.candidate.method: item.candidate.display_name for item in items}
    lora = next((item.drift for item in items if item.candidate.method == "lora" and item.drift is not None), 0.0)
    dominators = pareto_front({item.candidate.method: axis_values(item, with_drift, lora) for item in items})

    def order(item: Assessed):
        learns = item.quality.non_learning is None
        on_front = not dominators[item.candidate.method]
        return (not learns, not on_front, -round(utility(item, goal, vram_gib), 6), item.peak_bytes,
                item.candidate.method)

    ranked = []
    for item in sorted(items, key=order):
        flags = (f"ranked down: {item.quality.non_learning}",) if item.quality.non_learning else ()
        ranked.append(RankedCandidate(
            candidate=item.candidate,
            plan=item.plan,
            serving=item.serving,
            evidence=item.evidence,
            adapter_bytes=item.adapter_bytes,
            score=round(utility(item, goal, vram_gib), 4),
            reason=_reason(item, vram_gib, [names[m] for m in dominators[item.candidate.method]]),
            probe=item.probe,
            quality=item.quality,
            relative_speed=round(speed_of(item), 4),
            speed_source=item.speed_source,
            pareto=not dominators[item.candidate.method],
            dominated_by=tuple(names[m] for m in dominators[item.candidate.method]),
            flags=flags,
            drift=item.drift,
        ))
    return ranked


def _reason(item: Assessed, vram_gib: float, dominated_by: list[str]) -> str:
    plan = item.plan
    quality = item.quality
    parts = []
    if quality.non_learning:
        parts.append(f"ranked down: {quality.non_learning}")
    if quality.source == "benchmark run" and item.evidence is not None:
        e = item.evidence
        parts.append(f"{e.score:.1%} {e.metric} on {e.benchmark} ({quality.relative:.2f}x LoRA)")
    else:
        parts.append(f"expected {quality.relative:.2f}x LoRA [{quality.low:.2f}-{quality.high:.2f}] (quality model"
                     + (", with your probe" if quality.used_probe else "") + ")")
    setting = f"micro-batch {plan.micro_batch}"
    if plan.gradient_accumulation > 1:
        setting += f" x {plan.gradient_accumulation} accumulation"
    if plan.gradient_checkpointing:
        setting += ", checkpointing"
    source = plan.estimate.source or "estimated"
    parts.append(f"{plan.fit} in {plan.estimate.peak_reserved_bytes / GIB:.1f} of {vram_gib:g} GiB ({setting}; "
                 f"{source})")
    parts.append(f"{speed_of(item):.2f}x LoRA's speed")
    if item.drift is not None:
        parts.append(f"drift {item.drift:.3f}")
    parts.append({"native": "loads natively", "merge": "serve merged", "convert": "convert to LoRA first",
                  "not needed": "no serving stack"}.get(item.serving.route, item.serving.route))
    if dominated_by:
        parts.append(f"dominated by {', '.join(dominated_by[:3])}{' and others' if len(dominated_by) > 3 else ''}")
    else:
        parts.append("on the Pareto front")
    return "; ".join(parts)
