"""Record every device allocation and free of a real PyTorch program run on the meta device.

On the meta device operators compute shapes but no values, so a transformers + PEFT training step runs without
allocating anything; a dispatch mode sees every operator's outputs and a weak reference on each new storage tells
when autograd or Python drops it. The result is the ordered list of allocate/free events the same program issues
to the CUDA allocator, minus what kernels allocate internally (modelled in `kernels.py` and `training.py`).

Each event also records which *unit* of decoder layers it belongs to (`context`), and each storage which unit
owns it, so `synthesis.py` can lengthen a trace of a few layers to the model's real depth.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ALLOC = 1
FREE = 0


@dataclass
class Trace:
    """Events in program order: (kind, handle, nbytes, context unit or None)."""

    events: list[tuple[int, int, int, int | None]] = field(default_factory=list)
    tags: dict[int, str] = field(default_factory=dict)  # handle -> breakdown part, where known
    phase_of: dict[int, str] = field(default_factory=dict)  # handle -> phase it was allocated in
    owner: dict[int, int] = field(default_factory=dict)  # handle -> unit of layers that owns it
    marks: dict[str, int] = field(default_factory=dict)  # phase -> index of its first event

    def canonical(self) -> tuple:
        """The trace up to its "end" mark with handles numbered by first appearance (events, marks in order,
        tags, phases, owners): equal for two traces of the same program that numbered storages differently."""
        ids: dict[int, int] = {}
        events = []
        for kind, handle, nbytes, unit in self.events[: self.marks.get("end", len(self.events))]:
            if kind in (ALLOC, FREE):  # marker events carry no handle
                handle = ids.setdefault(handle, len(ids))
            events.append((kind, handle, nbytes, unit))

        def renamed(table):
            return {ids[h]: value for h, value in table.items() if h in ids}

        marks = sorted(self.marks.items(), key=lambda mark: (mark[1], mark[0]))
        return events, marks, renamed(self.tags), renamed(self.phase_of), renamed(self.owner)


_aten = torch.ops.aten
# "Is anything inf / nan?" sanity checks, and the reductions that fold their masks into one answer.
_NONFINITE_CHECKS = (_aten.isinf.default, _aten.isnan.default, _aten.isposinf.default, _aten.isneginf.default)
_FOLDS = (_aten.any.default, _aten.any.dim, _aten.any.dims, _aten.logical_or.default, _aten.bitwise_or.Tensor)


# ------------------------------------------------------------------------------------------ result cache
# On the meta device most elementwise operators compute their output shape in Python (torch._refs /
# torch._prims), about 0.3 ms each, and a training step runs thousands of them. An operator that returns fresh
# tensors (no alias, no mutated argument) gives outputs whose shapes, strides and dtypes follow from its inputs'
# shapes, strides and dtypes and its plain arguments alone, so the first call's answer is remembered and later
# calls build empty tensors of that layout. In-place operators return their first argument unchanged, and
# in-place operators on tensor lists (`_foreach_*_`, which return nothing) are skipped (on meta they only check
# shapes). The tracer records the same storages in the same order either way. The cache lives
# as long as the process: it holds layouts, never tensors.

_UNCACHEABLE = object()
_RESULTS: dict = {}
_KIND: dict = {}
# in-place operators that change their argument's shape or strides: always run
_RESHAPING = frozenset({
    "resize_", "resize_as_", "set_", "squeeze_", "unsqueeze_", "transpose_", "t_", "as_strided_", "swapdims_",
    "swapaxes_", "detach_", "sparse_resize_", "sparse_resize_and_clear_", "resize_as_sparse_", "_coalesced_",
})


def _kind(func) -> str:
    kind = _KIND.get(func)
    if kind is None:
        schema = func._schema
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        aliases = any(r.alias_info is not None for r in schema.returns)
        name = func.overloadpacket.__name__
        if not mutates and not aliases and schema.returns and all(str(r.type).startswith("Tensor") for r in schema.returns):
            kind = "fresh"
        elif mutates and name.startswith("_foreach") and name.endswith("_") and not schema.returns:
            kind = "inplace list"
        elif (mutates and name.endswith("_") and name not in _RESHAPING and not name.startswith("_foreach")
              and len(schema.returns) == 1 and schema.returns[0].alias_info is not None
              and schema.arguments and schema.arguments[0].alias_info is not None
              and schema.arguments[0].alias_info.is_write):
            kind = "inplace"
        else:
            kind = "other"
        _KIND[func] = kind
    return kind


def _key(x):
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta" or x.layout != torch.strided or x.is_conj() or x.is_neg():
            raise TypeError
        return (x.shape, x.stride(), x.dtype, x.storage_offset())
    if isinstance(x, (list, tuple)):
        return tuple(_key(y) for y in x)
    if x is None or isinstance(x, (int, float, bool, str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (x.__class__, x)
    raise TypeError


def run_operator(func, args, kwargs):
    """`func(*args, **kwargs)` on meta tensors, through the result cache (see the module docstring)."""
    kind = _kind(func)
    if kind == "inplace" and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
        return args[0]
    if kind == "inplace list" and args[0] and isinstance(args[0][0], torch.Tensor) and args[0][0].device.type == "meta":
        return None  # an optimizer's fused in-place update: on meta a per-tensor shape check in Python, nothing made
    if kind != "fresh":
        return func(*args, **kwargs)
    try:
        key = (func, _key(args), _key(tuple(kwargs.items())) if kwargs else None)
    except TypeError:
        return func(*args, **kwargs)
    hit = _RESULTS.get(key)
    if hit is not None and hit is not _UNCACHEABLE:
        container, layouts = hit
        outs = [None if lay is None else torch.empty_strided(lay[0], lay[1], dtype=lay[2], device="meta")
                for lay in layouts]
        return outs[0] if container is None else container(outs)
    out = func(*args, **kwargs)
    if hit is _UNCACHEABLE:
        return out
    if isinstance(out, torch.Tensor):
        container, leaves = None, [out]
    elif isinstance(out, (tuple, list)):
        container, leaves = type(out), list(out)
    else:
        _RESULTS[key] = _UNCACHEABLE
        return out
    layouts = []
    # outputs must own new storages: some schemas do not declare an alias they make (aten::_unsafe_view)
    storages = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                and a.layout == torch.strided}
    for t in leaves:
        if t is None:
            layouts.append(None)
            continue
        if not isinstance(t, torch.Tensor) or t.device.type != "meta" or t.layout != torch.strided or t.storage_offset():
            _RESULTS[key] = _UNCACHEABLE
            return out
        storage = t.untyped_storage()
        extent = 0 if t.numel() == 0 else (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
        if storage.nbytes() != extent or storage._cdata in storages:  # a view into a larger buffer, or shared
            _RESULTS[key] = _UNCACHEABLE
            return out
        storages.add(storage._cdata)
        layouts.append((tuple(t.shape), tuple(t.stride()), t.dtype))
    _RESULTS[key] = (container, layouts)
    return out



class MetaValues(TorchDispatchMode):
    """Answers the few value-dependent questions code asks of meta tensors: `.item()`-style checks (the modelled
    batch is full and unpadded, so "every token attended?" is yes), "is any value inf or nan?" (no: the outputs
    of those checks are remembered, so `isinf(w).any()` reads False), and `torch.nonzero` / `x[mask]` of masks
    whose count a method fixes (`nonzero_rows`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # nothing these modes run is compiled: leave __torch_dispatch__ without the wrapper that disables Dynamo
        # in its frame (torch adds one to every subclass by default; it costs microseconds on every operator)
        return False

    def __init__(self, nonzero_rows: Callable[[tuple[int, ...]], int] | None = None) -> None:
        super().__init__()
        self.nonzero_rows = nonzero_rows
        self._finite_checks: dict[int, weakref.ref] = {}  # storage id -> storage, for outputs of inf/nan checks

    def _is_finite_check(self, tensor: torch.Tensor) -> bool:
        ref = self._finite_checks.get(tensor.untyped_storage()._cdata)
        return ref is not None and ref() is not None

    def _remember_check(self, out: torch.Tensor) -> torch.Tensor:
        storage = out.untyped_storage()
        self._finite_checks[storage._cdata] = weakref.ref(storage)
        return out

    def _selected(self, mask: torch.Tensor) -> int:
        if self.nonzero_rows is None:
            raise NotImplementedError("data-dependent shape (torch.nonzero) cannot be traced on the meta device")
        return self.nonzero_rows(tuple(mask.shape))

    def answer(self, func, args, kwargs=None):
        """The stand-in result for a value-dependent op on meta, or NotImplemented for any other op."""
        first = args[0] if args else None
        if not (isinstance(first, torch.Tensor) and first.device.type == "meta"):
            return NotImplemented
        if func is _aten._local_scalar_dense.default:
            if first.dtype == torch.bool:
                return not self._is_finite_check(first)
            return 0
        if func is _aten.nonzero.default:
            return torch.empty((self._selected(first), first.dim()), dtype=torch.long, device="meta")
        if func is _aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            # x[mask] runs nonzero inside the meta kernel, out of this mode's sight: index with its count instead
            indices = []
            for index in args[1]:
                if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                    count = self._selected(index)
                    indices.extend(torch.empty(count, dtype=torch.long, device="meta") for _ in range(index.dim()))
                else:
                    indices.append(index)
            return func(first, indices)
        if func in _NONFINITE_CHECKS:
            return self._remember_check(func(*args, **(kwargs or {})))
        if func in _FOLDS and all(self._is_finite_check(a) for a in args if isinstance(a, torch.Tensor)):
            return self._remember_check(func(*args, **(kwargs or {})))
        return NotImplemented

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        answer = self.answer(func, args, kwargs)
        return func(*args, **(kwargs or {})) if answer is NotImplemented else answer


def _unit_of_event(running: int | None, last: int | None, phase: str, owner: int | None, freeing: bool) -> int | None:
    """The unit an event repeats with: the unit whose code runs. Outside the layers in forward, what happens
    right after a unit returns belongs to it (its input is dropped when its output replaces it); a free of
    another unit's storage there (the previous step's KV cache, say) belongs to that storage's unit."""
    if running is not None:
        return running
    if phase.startswith("forward") and last is not None:
        if not freeing or owner is None or owner == last - 1 or owner == last:
            return last
    return owner


class StorageTracker(MetaValues):
    """Dispatch mode that logs allocations and frees of storages on the meta device."""

    def __init__(self, vocab_size: int | None = None,
                 nonzero_rows: Callable[[tuple[int, ...]], int] | None = None) -> None:
        super().__init__(nonzero_rows)
        self.trace = Trace()
        self.phase = "build"
        self.vocab_size = vocab_size
        self._context: list[int | None] = [None]  # stack: unit whose code runs now
        self._last_unit: int | None = None  # in forward, the unit that ran last
        self._handle_of: dict[int, int] = {}  # storage _cdata -> handle
        self._refs: dict[int, weakref.ref] = {}
        self._next_handle = 0
        self.propagate_owner = False  # outside layers (build, optimizer), an output belongs to its input's unit
        # (func, args, kwargs) -> [(bytes, breakdown part)] a CUDA kernel allocates and frees within the call
        self.temporaries: Callable[[Any, tuple, dict], list[tuple[int, str | None]] | None] | None = None
        self.output_tag: Callable[[Any], str | None] | None = None  # func -> breakdown part of its outputs

    # -- context ----------------------------------------------------------------------------------------
    def set_phase(self, name: str) -> None:
        self.phase = name
        self._last_unit = None
        self.trace.marks.setdefault(name, len(self.trace.events))

    @property
    def context(self) -> int | None:
        """The unit whose code runs now (None outside the decoder layers)."""
        return self._context[-1]

    def _event_unit(self, owner: int | None, freeing: bool) -> int | None:
        return _unit_of_event(self._context[-1], self._last_unit, self.phase, owner, freeing)

    def position(self) -> tuple[int, str, int | None, int | None]:
        """Where the program stands: (events so far, phase, unit running, unit last run in forward). A free
        that a later step makes at the same point of its code is attributed from it (`unit_of_free_at`)."""
        return len(self.trace.events), self.phase, self._context[-1], self._last_unit

    @staticmethod
    def unit_of_free_at(position: tuple[int, str, int | None, int | None], owner: int | None) -> int | None:
        _index, phase, running, last = position
        return _unit_of_event(running, last, phase, owner, freeing=True)

    def push_context(self, unit: int | None) -> None:
        self._context.append(unit)

    def pop_context(self) -> None:
        unit = self._context.pop()
        if unit is not None:
            self._last_unit = unit

    def set_context(self, unit: int | None) -> None:
        self._context[-1] = unit

    # -- tensors --------------------------------------------------------------------------------------
    def live_handles(self) -> set[int]:
        """Handles of the tracked storages still alive."""
        return set(self._handle_of.values())

    def handle_of(self, tensor: torch.Tensor) -> int | None:
        return self._handle_of.get(tensor.untyped_storage()._cdata)

    def tag(self, tensor: torch.Tensor, tag: str) -> None:
        handle = self.handle_of(tensor)
        if handle is not None:
            self.trace.tags[handle] = tag

    def set_owner(self, tensor: torch.Tensor, unit: int) -> None:
        handle = self.handle_of(tensor)
        if handle is not None:
            self.trace.owner[handle] = unit

    def adopt(self, tensor: torch.Tensor) -> None:
        """Log the allocation of a storage made before tracing started (weights built outside the mode)."""
        if tensor.device.type == "meta" and tensor.layout == torch.strided:
            self._track(tensor, None)

    def allocate(self, nbytes: int, tag: str) -> int:
        """Log an allocation no tensor stands for (a library workspace); it is never freed."""
        handle = self.new_handle()
        self.trace.events.append((ALLOC, handle, nbytes, None))
        self.trace.tags[handle] = tag
        self.trace.phase_of[handle] = self.phase
        return handle

    def transients(self, buffers: list[tuple[int, str | None]]) -> None:
        """Log buffers a CUDA kernel allocates besides its output and frees before it returns ((bytes, breakdown
        part or None) in allocation order): they raise the peak of that moment only."""
        trace = self.trace
        unit = self._event_unit(None, freeing=False)
        handles = []
        for nbytes, tag in buffers:
            handle = self.new_handle()
            trace.events.append((ALLOC, handle, nbytes, unit))
            trace.phase_of[handle] = self.phase
            if unit is not None:
                trace.owner[handle] = unit
            if tag is not None:
                trace.tags[handle] = tag
            handles.append(handle)
        for handle in handles:
            trace.events.append((FREE, handle, 0, self._event_unit(trace.owner.get(handle), freeing=True)))

    # -- dispatch -------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self.answer(func, args, kwargs)
        if out is NotImplemented:
            out = run_operator(func, args, kwargs or {})
        if self.temporaries is not None:
            buffers = self.temporaries(func, args, kwargs or {})
            if buffers:
                self.transients(buffers)
        # Outputs are a tensor, a flat tuple/list of tensors, or (rarely) something nested.
        if isinstance(out, torch.Tensor):
            leaves = (out,)
        elif isinstance(out, (tuple, list)) and all(isinstance(x, torch.Tensor) or x is None for x in out):
            leaves = out
        else:
            leaves = tree_leaves(out)
        owners = (self._input_owners(args) if self.propagate_owner and self.context is None
                  and not self.phase.startswith(("forward", "backward")) else None)
        for index, leaf in enumerate(leaves):
            # a sparse tensor's memory is its indices and values, tracked as tensors of their own
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta" and leaf.layout == torch.strided:
                owner = None if owners is None else (owners[index] if index < len(owners) else owners[-1])
                self._track(leaf, owner)
        if self.output_tag is not None:
            tag = self.output_tag(func)
            if tag is not None:
                for leaf in leaves:
                    if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
                        self.tag(leaf, tag)
        return out

    def _input_owners(self, args) -> list[int | None]:
        """Owner of each output by position: the matching element of a tensor-list argument (foreach ops),
        else the first owned tensor argument."""
        for arg in args:
            if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
                return [self.trace.owner.get(self.handle_of(t)) for t in arg]
        for arg in tree_leaves(args):
            if isinstance(arg, torch.Tensor) and arg.device.type == "meta":
                owner = self.trace.owner.get(self.handle_of(arg))
                if owner is not None:
                    return [owner]
        return [None]

    def new_handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def _track(self, tensor: torch.Tensor, owner: int | None) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._handle_of:
            return
        handle = self.new_handle()
        self._handle_of[key] = handle
        unit = self._event_unit(owner, freeing=False)
        trace = self.trace
        trace.events.append((ALLOC, handle, storage.nbytes(), unit))
        trace.phase_of[handle] = self.phase
        if unit is not None:
            trace.owner[handle] = unit
        if self.vocab_size and tensor.dim() and tensor.shape[-1] == self.vocab_size and self.phase != "build":
            trace.tags[handle] = "logits/loss"

        def on_free(_ref, key=key, handle=handle):
            if self._handle_of.get(key) == handle:
                del self._handle_of[key]
                self._refs.pop(key, None)
                trace.events.append((FREE, handle, 0, self._event_unit(trace.owner.get(handle), freeing=True)))

        self._refs[key] = weakref.ref(storage, on_free)
