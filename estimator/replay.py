"""Replay a trace through the caching-allocator model: peaks, and what was live at the allocated peak."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from peftpick.estimator.allocator import CachingAllocatorModel
from peftpick.estimator.tracer import ALLOC, Trace

BREAKDOWN_PARTS = ("weights", "adapter", "grads", "optimizer", "activations", "logits/loss", "overhead")


@dataclass
class ReplayResult:
    peak_allocated: int
    peak_reserved: int
    breakdown: dict[str, int] = field(default_factory=dict)  # sums to peak_allocated
    peak_phase: str = ""


def _category(trace: Trace, handle: int) -> str:
    tag = trace.tags.get(handle)
    if tag is not None:
        return tag
    phase = trace.phase_of.get(handle, "")
    if phase.startswith("optimizer"):
        return "optimizer"
    if phase == "build":
        return "weights"
    return "activations"


def replay(trace: Trace) -> ReplayResult:
    allocator = CachingAllocatorModel()
    stats = allocator.stats
    live_raw: dict[int, int] = {}
    by_part: Counter[str] = Counter()
    category: dict[int, str] = {}
    peak_parts: Counter[str] = Counter()
    peak_index = 0
    for index, (kind, handle, nbytes, _unit) in enumerate(trace.events):
        if kind == ALLOC:
            before = stats.peak_allocated
            allocator.malloc(handle, nbytes)
            part = _category(trace, handle)
            category[handle] = part
            live_raw[handle] = nbytes
            by_part[part] += nbytes
            if stats.peak_allocated > before:
                peak_parts = by_part.copy()
                peak_index = index
        elif handle in live_raw:
            allocator.free(handle)
            by_part[category.pop(handle)] -= live_raw.pop(handle)
    # parts only some runs have (a quantized base's "quantized weights", "fp32 upcasts", "dequantization")
    # follow the weights
    extra = [part for part, n in sorted(peak_parts.items(), reverse=True) if part not in BREAKDOWN_PARTS and n > 0]
    order = [BREAKDOWN_PARTS[0], *extra, *BREAKDOWN_PARTS[1:]]
    breakdown = {part: max(0, peak_parts.get(part, 0)) for part in order}
    # Block rounding and unsplit remainders are allocated bytes no tensor asked for.
    breakdown["overhead"] += stats.peak_allocated - sum(breakdown.values())
    phase = max(((start, name) for name, start in trace.marks.items() if start <= peak_index), default=(0, ""))[1]
    return ReplayResult(stats.peak_allocated, stats.peak_reserved, breakdown, phase)
