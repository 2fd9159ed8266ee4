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


def _live_parts(trace: Trace, last: int) -> Counter[str]:
    """Requested bytes by breakdown part of what is live right after event `last`."""
    live: dict[int, tuple[str, int]] = {}
    for kind, handle, nbytes, _unit in trace.events[:last + 1]:
        if kind == ALLOC:
            live[handle] = (_category(trace, handle), nbytes)
        else:
            live.pop(handle, None)
    parts: Counter[str] = Counter()
    for part, nbytes in live.values():
        parts[part] += nbytes
    return parts


def replay(trace: Trace) -> ReplayResult:
    allocator = CachingAllocatorModel()
    stats = allocator.stats
    malloc, free, live = allocator.malloc, allocator.free, allocator.live_handles
    peak_index = 0
    # first pass: the allocator's peaks and the event that set the allocated peak
    for index, (kind, handle, nbytes, _unit) in enumerate(trace.events):
        if kind == ALLOC:
            before = stats.peak_allocated
            malloc(handle, nbytes)
            if stats.peak_allocated > before:
                peak_index = index
        elif handle in live:
            free(handle)
    peak_parts = _live_parts(trace, peak_index)
    # parts only some runs have (a quantized base's "quantized weights", "fp32 upcasts", "dequantization")
    # follow the weights
    extra = [part for part, n in sorted(peak_parts.items(), reverse=True) if part not in BREAKDOWN_PARTS and n > 0]
    order = [BREAKDOWN_PARTS[0], *extra, *BREAKDOWN_PARTS[1:]]
    breakdown = {part: max(0, peak_parts.get(part, 0)) for part in order}
    # Block rounding and unsplit remainders are allocated bytes no tensor asked for.
    breakdown["overhead"] += stats.peak_allocated - sum(breakdown.values())
    phase = max(((start, name) for name, start in trace.marks.items() if start <= peak_index), default=(0, ""))[1]
    return ReplayResult(stats.peak_allocated, stats.peak_reserved, breakdown, phase)
