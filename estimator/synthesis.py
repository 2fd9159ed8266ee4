"""Lengthen a trace of a few decoder layers to the model's real depth.

Decoder layers repeat, and so do their allocations. A model is traced with `units_traced` units of layers (a unit
is one period of the layer pattern: 1 layer, or 2 for Gemma 2's local/global pair); every event carries the unit
whose code ran it and every storage the unit that owns it. `lengthen` copies the events of one middle unit (the
template) as many times as the real model has extra units, in each phase where that unit appears, and rewires
the copies' references to neighbouring units (a layer frees its predecessor's output, backward consumes its
successor's gradient). Where units run in ascending order the copies follow the template; where they run in
descending order (backward, or Python freeing a list from its end) they precede it.

Tracing 4 units instead of 32 layers is what makes an 8B estimate take a fraction of a second; tests check that
a lengthened trace replays to the same peaks as a trace of every layer.

Training steps repeat too: `repeat_last_step` appends copies of the last traced step, and
`second_step_from_first` makes a second step from the first (the denoiser trace traces one).
"""

from __future__ import annotations

from collections.abc import Callable

from peftpick.estimator.tracer import ALLOC, FREE, Trace


def _phase_per_event(trace: Trace) -> list[str]:
    starts = sorted((index, name) for name, index in trace.marks.items())
    phases = []
    position = 0
    current = starts[0][1] if starts else ""
    for index in range(len(trace.events)):
        while position < len(starts) and starts[position][0] <= index:
            current = starts[position][1]
            position += 1
        phases.append(current)
    return phases


def lengthen(trace: Trace, units_traced: int, units_total: int, template: int) -> Trace:
    extra = units_total - units_traced
    if extra <= 0:
        return trace
    if not 0 < template < units_traced - 1:
        raise ValueError("the template unit needs a neighbour on each side")
    phases = _phase_per_event(trace)
    owner = trace.owner

    # A storage's key says which allocation of its unit it is, so units can be matched storage by storage.
    key_of: dict[int, tuple[str, int]] = {}
    handle_at: dict[tuple[int, tuple[str, int]], int] = {}
    counters: dict[tuple[int, str], int] = {}
    for (kind, handle, _nbytes, _ctx), phase in zip(trace.events, phases):
        unit = owner.get(handle)
        if kind == ALLOC and unit is not None:
            ordinal = counters.get((unit, phase), 0)
            counters[(unit, phase)] = ordinal + 1
            key = (trace.phase_of.get(handle, phase), ordinal)
            key_of[handle] = key
            handle_at[(unit, key)] = handle

    next_handle = max((h for _, h, _, _ in trace.events), default=0) + 1
    clones: dict[tuple[int, tuple[str, int]], int] = {}
    clone_source: dict[int, int] = {}

    def handle_in(logical_unit: int, key: tuple[str, int], fallback: int) -> int:
        nonlocal next_handle
        if logical_unit <= template:
            return handle_at.get((logical_unit, key), fallback)
        if logical_unit <= template + extra:
            copy = clones.get((logical_unit, key))
            if copy is None:
                source = handle_at.get((template, key))
                if source is None:
                    return fallback
                copy = clones[(logical_unit, key)] = next_handle
                clone_source[copy] = source
                next_handle += 1
            return copy
        return handle_at.get((logical_unit - extra, key), fallback)

    def remap(handle: int, emitted_as: int, original_unit: int) -> int:
        unit = owner.get(handle)
        key = key_of.get(handle)
        if unit is None or key is None:
            return handle
        return handle_in(emitted_as + unit - original_unit, key, handle)

    def context(index: int) -> int | None:
        kind, handle, _nbytes, ctx = trace.events[index]
        if phases[index] == "build":
            return owner.get(handle)
        return ctx

    # Runs: maximal stretches of events of one unit within one phase.
    runs: list[tuple[int, int, int | None]] = []
    index = 0
    n = len(trace.events)
    while index < n:
        unit = context(index)
        end = index + 1
        while end < n and context(end) == unit and phases[end] == phases[index]:
            end += 1
        runs.append((index, end, unit))
        index = end

    def descending_after(position: int) -> bool:
        """Whether units run in reverse order here (backward; Python freeing a list from its end)."""
        phase = phases[runs[position][0]]
        for start, _end, unit in runs[position + 1:]:
            if phases[start] != phase:
                break
            if unit is not None and unit != template:
                return unit < template
        return phase.startswith("backward")

    out = Trace(tags=dict(trace.tags), phase_of=dict(trace.phase_of), owner={})
    events = out.events
    for position, (start, end, unit) in enumerate(runs):
        phase = phases[start]
        if phase not in out.marks:
            out.marks[phase] = len(events)
        run = trace.events[start:end]
        if unit is None:
            events.extend(run)
            continue
        copies = [template + j for j in range(1, extra + 1)] if unit == template else []
        if copies and descending_after(position):
            order = copies[::-1] + [None]
        else:
            order = [None] + copies
        for logical in order:
            if logical is None:
                emitted_as = unit if unit <= template else unit + extra
                events.extend((k, remap(h, emitted_as, unit), b, emitted_as) for k, h, b, _ in run)
            else:
                events.extend((k, remap(h, logical, template), b, logical) for k, h, b, _ in run)

    for copy, source in clone_source.items():
        if source in trace.tags:
            out.tags[copy] = trace.tags[source]
        if source in trace.phase_of:
            out.phase_of[copy] = trace.phase_of[source]
    return out


def repeat_last_step(trace: Trace, steps: int, copies: int = 1,
                     after_copy: Callable[[Trace, int], None] | None = None) -> Trace | None:
    """Append `copies` more training steps, each a copy of the last traced one (`steps` traced).

    Steps repeat once optimizer state exists, except for what a step leaves alive for the next (the model
    output kept until the next forward rebinds it): the last step frees what the step before it left, so its
    copy must free what the last step leaves. Those storages are matched in allocation order; if they differ
    in size, the steps are not alike and None is returned (trace one more step instead). The first copy's
    leftovers are the same sizes as the last step's, so once it is made every later one is too: the copies are
    made in one pass, each freeing its predecessor's leftovers. `after_copy(trace, steps now)` runs after each
    copy (to append markers between steps).
    """
    first, last = f"forward{steps - 2}", f"forward{steps - 1}"
    if first not in trace.marks or last not in trace.marks:
        return None
    start = trace.marks[last]
    end = trace.marks.get("end", len(trace.events))
    events = trace.events
    allocated_in = {}  # handle -> "previous" / "last" step, in allocation order
    freed_in_last: set[int] = set()
    live_at_end: set[int] = set()
    sizes: dict[int, int] = {}
    for index in range(trace.marks[first], end):  # nothing before the previous step is matched
        kind, handle, nbytes, _unit = events[index]
        if kind == ALLOC:
            sizes[handle] = nbytes
            if index < start:
                allocated_in[handle] = "previous"
            else:
                allocated_in[handle] = "last"
                live_at_end.add(handle)
        else:
            live_at_end.discard(handle)
            if index >= start and allocated_in.get(handle) == "previous":
                freed_in_last.add(handle)
    before = [h for h in allocated_in if h in freed_in_last]  # what the previous step left, freed by the last
    after = [h for h in allocated_in if allocated_in[h] == "last" and h in live_at_end]
    if [sizes[h] for h in before] != [sizes[h] for h in after]:
        return None
    next_handle = max(h for k, h, _b, _u in events if k == ALLOC) + 1
    out = Trace(events=events[:end], tags=dict(trace.tags), phase_of=dict(trace.phase_of),
                owner=dict(trace.owner), marks={k: v for k, v in trace.marks.items() if k != "end"})
    step_events = events[start:end]
    left = after  # the storages the newest step leaves, in allocation order
    copy_start, copy_end = start, end  # where the newest step sits in `out`
    for copy in range(copies):
        number = steps + copy
        successor = dict(zip(before, left))
        fresh: dict[int, int] = {}
        base = len(out.events)
        for name, index in list(out.marks.items()):
            if copy_start <= index < copy_end and name[-1:].isdigit():
                out.marks[name.rstrip("0123456789") + str(number)] = base + index - copy_start
        appended = out.events.append
        for kind, handle, nbytes, unit in step_events:
            if kind == ALLOC:
                fresh[handle] = next_handle
                if handle in trace.tags:
                    out.tags[next_handle] = trace.tags[handle]
                if handle in trace.owner:
                    out.owner[next_handle] = trace.owner[handle]
                phase = trace.phase_of.get(handle, "")
                out.phase_of[next_handle] = phase.rstrip("0123456789") + str(number) if phase[-1:].isdigit() else phase
                appended((kind, next_handle, nbytes, unit))
                next_handle += 1
            elif handle in fresh:
                appended((kind, fresh[handle], nbytes, unit))
            elif handle in successor:
                appended((kind, successor[handle], nbytes, unit))
        left = [fresh[h] for h in after]
        if after_copy is not None:
            after_copy(out, number + 1)
        copy_start, copy_end = out.marks.get(f"forward{number}", base), len(out.events)
    return out


# A free the next step makes of what the traced step leaves: (index in the trace, phase then, [(handle, unit)])
Drop = tuple[int, str, list[tuple[int, int | None]]]


def _next_number(name: str, number: int) -> str:
    return name.rstrip("0123456789") + str(number) if name[-1:].isdigit() else name


def second_step_from_first(trace: Trace, number: int, once: set[int], drops: list[Drop]) -> Trace:
    """`trace`, whose last traced step is step `number - 1` (from its forward mark to the "end" mark), with step
    `number` made from it instead of traced.

    A training step repeats its predecessor's allocations and frees, except that the first one also makes what
    lasts the whole run (optimizer state, library workspaces: `once`, left out of the copy), and that the
    next step drops what this one leaves (its gradients at zero_grad, its loop variables where Python rebinds
    them). The caller knows where: `drops` are those frees at the points of the traced step's code where the
    next step makes them, in the order it makes them (drops recorded in the phase that ends at an index come
    before that index's phase mark). Frees of storages made before the traced step happen once and are not
    repeated. The result is the trace of two steps, up to its "end" mark.
    """
    start = trace.marks[f"forward{number - 1}"]
    end = trace.marks["end"]
    events = trace.events
    marks_at: dict[int, list[str]] = {}
    for name, index in trace.marks.items():
        if start <= index < end:
            marks_at.setdefault(index, []).append(name)
    drops_at: dict[int, list[Drop]] = {}
    for drop in drops:
        drops_at.setdefault(drop[0], []).append(drop)
    out = Trace(events=events[:end], tags=dict(trace.tags), phase_of=dict(trace.phase_of), owner=dict(trace.owner),
                marks={k: v for k, v in trace.marks.items() if k != "end"})
    emitted = out.events
    fresh: dict[int, int] = {}
    next_handle = max((h for k, h, _b, _u in events if k == ALLOC), default=0) + 1

    def emit(pending):
        for _index, _phase, frees in pending:
            emitted.extend((FREE, handle, 0, unit) for handle, unit in frees)

    for index in range(start, end + 1):
        pending = drops_at.get(index, ())
        names = marks_at.get(index)
        if names:
            emit(d for d in pending if d[1] not in names)
            for name in names:
                out.marks[_next_number(name, number)] = len(emitted)
            emit(d for d in pending if d[1] in names)
        else:
            emit(pending)
        if index == end:
            break
        kind, handle, nbytes, unit = events[index]
        if kind == ALLOC:
            if handle in once:
                continue
            fresh[handle] = next_handle
            if handle in trace.tags:
                out.tags[next_handle] = trace.tags[handle]
            if handle in trace.owner:
                out.owner[next_handle] = trace.owner[handle]
            if handle in trace.phase_of:
                out.phase_of[next_handle] = _next_number(trace.phase_of[handle], number)
            emitted.append((ALLOC, next_handle, nbytes, unit))
            next_handle += 1
        elif kind == FREE:
            if handle in fresh:  # a free of what was made before this step happened once
                emitted.append((FREE, fresh[handle], nbytes, unit))
        else:
            emitted.append(events[index])
    out.marks["end"] = len(emitted)
    return out
