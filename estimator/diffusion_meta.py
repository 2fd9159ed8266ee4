"""Machinery the denoiser estimate adds to the tracer, allocator model and replay (`diffusion.py` uses it).

- `FastStorageTracker`: the `StorageTracker` whose value questions `_Answers` answers, and which logs the
  buffers some CUDA kernels allocate inside the call and free before returning, which their meta kernels do
  not make (cuFFT work areas, cuBLAS operand copies: `kernels.cuda_temporaries`).
- `ProgramAllocator`: the caching-allocator model plus `torch.cuda.empty_cache()` (release every segment that
  holds no allocated block), which the PEFT image suite calls before training and after every evaluation.
- `replay_windows`: replay with markers: `BASELINE` (the reserved bytes a measurement subtracts), `EMPTY_CACHE`,
  `RESET_PEAK` (`torch.cuda.reset_peak_memory_stats()`: only peaks after the first reset count).
- `replicate`: copy a stretch of events with fresh handles (the 13 more prompts encoded like the first).
- `apply_order`: the order in which `module.to(device)` allocates a module's tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import contextlib

import torch
from torch.utils._pytree import tree_leaves

from peftpick.estimator.allocator import CachingAllocatorModel
from peftpick.estimator.kernels import cuda_temporaries
from peftpick.estimator.tracer import ALLOC, FREE, MetaValues, StorageTracker, Trace, run_operator

EMPTY_CACHE = 2
RESET_PEAK = 3
BASELINE = 4

# ------------------------------------------------------------------------------------------ value questions

_aten = torch.ops.aten
_CHECKS = (_aten.isinf.default, _aten.isnan.default, _aten.isposinf.default, _aten.isneginf.default)
_REDUCE = (_aten.any.default, _aten.any.dim, _aten.any.dims, _aten.logical_or.default, _aten.bitwise_or.Tensor)


def _meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


class _Answers:
    """What the modelled run's values would say, for the few questions code asks of them (on top of
    MetaValues): a meta tensor copied to the CPU (`.tolist()`, `.cpu()`) reads as zeros; "is anything inf /
    nan?" is no (the check is `isinf(x).any()`, so outputs of those checks are remembered); a boolean mask
    selects every element (torch.nonzero, `x[mask]`; SHiRA's masks say how many they select)."""

    def __init__(self, nonzero_rows=None):
        self.nonzero_rows = nonzero_rows
        self._clean: dict[int, Any] = {}  # storage id -> weakref of the storage, for outputs of inf/nan checks

    def _is_clean(self, t) -> bool:
        ref = self._clean.get(t.untyped_storage()._cdata)
        return ref is not None and ref() is not None

    def _remember(self, out) -> None:
        import weakref

        storage = out.untyped_storage()
        self._clean[storage._cdata] = weakref.ref(storage)

    def _count(self, mask) -> int:
        if self.nonzero_rows is not None:
            return self.nonzero_rows(tuple(mask.shape))
        return mask.numel()

    def __call__(self, func, args, kwargs):
        if func is _aten._local_scalar_dense.default and _meta(args[0]):
            if args[0].dtype == torch.bool:
                return not self._is_clean(args[0])
            return 0
        if func is _aten.nonzero.default and _meta(args[0]):
            return torch.empty((self._count(args[0]), args[0].dim()), dtype=torch.long, device="meta")
        if func is _aten._to_copy.default and _meta(args[0]):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "meta":
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=device)
        if func is _aten.index.Tensor and _meta(args[0]) and any(_meta(i) and i.dtype == torch.bool for i in args[1]):
            indices = []
            for index in args[1]:
                if _meta(index) and index.dtype == torch.bool:
                    count = self._count(index)
                    indices.extend(torch.empty(count, dtype=torch.long, device="meta") for _ in range(index.dim()))
                else:
                    indices.append(index)
            return func(args[0], indices)
        if func in _CHECKS and _meta(args[0]):
            out = func(*args, **kwargs)
            self._remember(out)
            return out
        if func in _REDUCE and _meta(args[0]) and all(self._is_clean(a) for a in args if _meta(a)):
            out = func(*args, **kwargs)
            self._remember(out)
            return out
        return NotImplemented


class MetaAnswers(MetaValues):
    """MetaValues with `_Answers` (used while PEFT builds adapters on the meta device)."""

    def __init__(self, nonzero_rows=None) -> None:
        super().__init__(nonzero_rows)
        self._answers = _Answers(nonzero_rows)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._answers(func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


class FastStorageTracker(StorageTracker):
    """`StorageTracker` whose value questions `_Answers` answers (operators run through the tracer's result
    cache, `tracer.run_operator`)."""

    def __init__(self, vocab_size=None, nonzero_rows=None) -> None:
        super().__init__(vocab_size, nonzero_rows)
        self._answers = _Answers(nonzero_rows)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._answers(func, args, kwargs)
        if out is NotImplemented:
            out = run_operator(func, args, kwargs)
        if isinstance(out, torch.Tensor):
            leaves = (out,)
        elif isinstance(out, (tuple, list)) and all(isinstance(x, torch.Tensor) or x is None for x in out):
            leaves = out
        else:
            leaves = tree_leaves(out)
        owners = (self._input_owners(args) if self.propagate_owner and self.context is None
                  and not self.phase.startswith(("forward", "backward")) else None)
        for index, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta" and leaf.layout == torch.strided:
                owner = None if owners is None else (owners[index] if index < len(owners) else owners[-1])
                self._track(leaf, owner)
        temporaries = cuda_temporaries(func, args, out)
        if temporaries is not None:
            work, copies = temporaries
            # operand copies first, then library work areas (see kernels.cuda_temporaries)
            self.transients([(n, None) for n in copies] + [(n, "overhead") for n in work])
        return out

    def set_phase(self, name: str) -> None:
        # Storages that only a reference cycle keeps alive are freed when Python's cyclic collector runs, which
        # depends on how many Python objects were allocated before: collecting at each phase change (with
        # automatic collection off while tracing, see `deterministic_gc`) makes the trace the same every run.
        import gc

        gc.collect()
        super().set_phase(name)

    def mark(self, kind: int) -> None:
        """Append a marker event (EMPTY_CACHE, RESET_PEAK, BASELINE)."""
        self.trace.events.append((kind, 0, 0, None))

    def free(self, tensor: torch.Tensor) -> None:
        """Log the free of a storage still referenced here (weights moved back to the CPU), once."""
        key = tensor.untyped_storage()._cdata
        handle = self._handle_of.pop(key, None)
        if handle is not None:
            self._refs.pop(key, None)
            self.trace.events.append((FREE, handle, 0, None))


@contextlib.contextmanager
def deterministic_gc():
    """Automatic cyclic garbage collection off (the tracker collects at phase changes instead)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    # Objects made before the trace are moved out of the collector's reach: each collection at a phase change
    # then scans only what the trace made (two seconds of eight full collections otherwise). No collection first:
    # a full one over torch's, transformers' and diffusers' objects takes ~0.2 s, twice an estimate, and garbage
    # left from before is only kept until `unfreeze` hands it back to the collector.
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def apply_order(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in the order `module.to(device)` moves them: `Module._apply` recurses into the
    children first, then moves the module's own parameters, then its buffers. Shared tensors count once."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def visit(m: torch.nn.Module) -> None:
        for child in m.children():
            visit(child)
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)

    visit(module)
    return out


# ------------------------------------------------------------------------------------------ replay


class ProgramAllocator(CachingAllocatorModel):
    def empty_cache(self) -> None:
        """Release every segment that no allocated block uses (a whole segment is a free block with no
        neighbours: blocks of different segments are never adjacent in this model)."""
        for small in (True, False):
            pool = self._free[small]
            keep = []
            for key in pool:
                block = self._by_key[key]
                if block.prev is None and block.next is None:
                    del self._by_key[key]
                    self.stats.reserved -= block.size
                    self.stats.segments -= 1
                else:
                    keep.append(key)
            self._free[small] = keep

    def reset_peak(self) -> None:
        self.stats.peak_allocated = self.stats.allocated
        self.stats.peak_reserved = self.stats.reserved


@dataclass
class WindowReplay:
    peak_allocated: int  # highest allocated bytes in a counted window, minus nothing (allocated baseline is 0)
    peak_reserved: int  # highest reserved bytes in a counted window, minus the BASELINE reserved
    breakdown: dict[str, int] = field(default_factory=dict)  # at the allocated peak; sums to peak_allocated
    peak_phase: str = ""  # phase of the reserved peak
    windows: list[tuple[int, int]] = field(default_factory=list)  # (allocated, reserved) peak per window
    baseline: int = 0
    between_steps: list[tuple[int, int]] = field(default_factory=list)  # (allocated, reserved) as each step ends


def _part_of_phase(phase: str) -> str:
    """The breakdown part of an untagged storage allocated in `phase`."""
    if phase.startswith("optimizer"):
        return "optimizer"
    if phase in ("build", "setup"):
        return "weights"
    return "activations"


def replay_windows(trace: Trace, parts: tuple[str, ...]) -> WindowReplay:
    """Replay `trace`; peaks count from the first RESET_PEAK marker on (from the start when there is none), per
    window between markers; the reserved peak is reported minus the reserved bytes at the BASELINE marker."""
    allocator = ProgramAllocator()
    stats = allocator.stats
    malloc, free = allocator.malloc, allocator.free
    tags, phase_of = trace.tags, trace.phase_of
    counting = RESET_PEAK not in map(itemgetter(0), trace.events)
    baseline = 0
    live: dict[int, tuple[int, str]] = {}
    by_part: Counter[str] = Counter()
    best_alloc, best_parts = -1, Counter()
    best_reserved, reserved_index = -1, 0
    windows: list[tuple[int, int]] = []
    window_alloc = window_reserved = 0
    step_starts = {at for name, at in trace.marks.items() if name.startswith("forward") and name != "forward0"}
    between: list[tuple[int, int]] = []
    for index, (kind, handle, nbytes, _unit) in enumerate(trace.events):
        if index in step_starts:
            between.append((stats.allocated, stats.reserved - baseline))
        if kind == ALLOC:
            malloc(handle, nbytes)
            part = tags.get(handle) or _part_of_phase(phase_of.get(handle, ""))
            live[handle] = (nbytes, part)
            by_part[part] += nbytes
            if counting:
                allocated, reserved = stats.allocated, stats.reserved
                if allocated > best_alloc:
                    best_alloc, best_parts = allocated, by_part.copy()
                if allocated > window_alloc:
                    window_alloc = allocated
                if reserved > window_reserved:
                    window_reserved = reserved
                if reserved > best_reserved:
                    best_reserved, reserved_index = reserved, index
        elif kind == FREE:
            entry = live.pop(handle, None)
            if entry is not None:
                free(handle)
                by_part[entry[1]] -= entry[0]
        elif kind == EMPTY_CACHE:
            allocator.empty_cache()
        elif kind == BASELINE:
            baseline = stats.reserved
        elif kind == RESET_PEAK:
            allocator.reset_peak()
            if counting:
                windows.append((window_alloc, window_reserved))
            counting = True
            window_alloc, window_reserved = stats.allocated, stats.reserved
            if stats.allocated > best_alloc:
                best_alloc, best_parts = stats.allocated, by_part.copy()
            if stats.reserved > best_reserved:
                best_reserved, reserved_index = stats.reserved, index
    if counting:
        windows.append((window_alloc, window_reserved))
    breakdown = {part: max(0, best_parts.get(part, 0)) for part in parts}
    for part, nbytes in best_parts.items():
        if part not in breakdown and nbytes > 0:
            breakdown[part] = nbytes
    breakdown["overhead"] = breakdown.get("overhead", 0) + best_alloc - sum(breakdown.values())
    phase = max(((start, name) for name, start in trace.marks.items() if start <= reserved_index), default=(0, ""))[1]
    return WindowReplay(best_alloc, best_reserved - baseline, breakdown, phase,
                        [(a, r - baseline) for a, r in windows], baseline, between)


# ------------------------------------------------------------------------------------------ trace editing


def replicate(trace: Trace, start: int, end: int, times: int, new_handle) -> list[list[int]]:
    """Insert `times` copies of events[start:end] right after it, with fresh handles from `new_handle()` (the
    tracker's, so that storages it tracks later get other handles). Storages the stretch allocates and does
    not free stay alive in every copy (one prompt embedding more per copy); a free of a storage allocated
    before the stretch is not repeated. Marks after the stretch shift. Returns, per copy, the handles it
    leaves alive (for the caller to free)."""
    if times <= 0:
        return []
    events = trace.events
    stretch = events[start:end]
    inside = {h for k, h, _b, _u in stretch if k == ALLOC}
    copies = []
    survivors = []
    for _ in range(times):
        fresh: dict[int, int] = {}
        alive: dict[int, None] = {}
        for kind, handle, nbytes, unit in stretch:
            if kind == ALLOC:
                copy = fresh[handle] = new_handle()
                for table in (trace.tags, trace.phase_of, trace.owner):
                    if handle in table:
                        table[copy] = table[handle]
                alive[copy] = None
                copies.append((kind, copy, nbytes, unit))
            elif kind == FREE:
                if handle in inside:
                    copies.append((kind, fresh[handle], nbytes, unit))
                    alive.pop(fresh[handle], None)
            else:
                copies.append((kind, handle, nbytes, unit))
        survivors.append(list(alive))
    events[end:end] = copies
    for name, index in trace.marks.items():
        if index >= end:
            trace.marks[name] = index + len(copies)
    return survivors


def insert_markers(trace: Trace, index: int, kinds: tuple[int, ...]) -> None:
    trace.events[index:index] = [(kind, 0, 0, None) for kind in kinds]
    for name, at in trace.marks.items():
        if at >= index:
            trace.marks[name] = at + len(kinds)


__all__ = [
    "BASELINE", "EMPTY_CACHE", "RESET_PEAK", "FastStorageTracker", "ProgramAllocator", "WindowReplay", "apply_order",
    "insert_markers", "replay_windows", "replicate",
]


# ------------------------------------------------------------------------------------------ kernel stand-ins

from peftpick.estimator.kernels import KernelStandIns  # noqa: E402


class _FusedRMSNorm(torch.autograd.Function):
    """Memory model of aten::_fused_rms_norm, which torch.rms_norm calls on CUDA when the weight's dtype matches
    the input's (aten/src/ATen/native/layer_norm.cpp rms_norm_symint): the output and a float32 reciprocal-std
    per row; backward keeps the input, rstd and weight (derivatives.yaml) and returns the input's gradient.
    On meta (and the CPU) the same call runs rms_norm_composite, which upcasts the input to float32 and saves
    float32 intermediates: two to three float32 copies of every normalised tensor more than the GPU holds."""

    @staticmethod
    def forward(ctx, x, weight, normalized_shape):
        stat = tuple(x.shape[: x.dim() - len(normalized_shape)]) + (1,) * len(normalized_shape)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = torch.empty(stat, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        grad_input = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
        return grad_input, grad_weight, None


_RMS_NORMS = (torch.nn.functional.rms_norm, torch.rms_norm)


def _rms_norm_args(args, kwargs):
    names = ("input", "normalized_shape", "weight", "eps")
    values = dict(zip(names, args))
    values.update(kwargs)
    return values["input"], values["normalized_shape"], values.get("weight"), values.get("eps")


class DenoiserKernels(KernelStandIns):
    """KernelStandIns (fused SDPA, sparse updates, block_diag) plus CUDA's fused RMSNorm."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RMS_NORMS:
            x, shape, weight, _eps = _rms_norm_args(args, kwargs)
            channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            if (isinstance(x, torch.Tensor) and x.device.type == "meta" and not x.is_complex() and not channels_last
                    and (weight is None or weight.dtype == x.dtype)):
                shape = (shape,) if isinstance(shape, int) else tuple(shape)
                return _FusedRMSNorm.apply(x, weight, shape)
        return super().__torch_function__(func, types, args, kwargs)
