"""Probe results for people: the table `peftpick probe` prints, and the JSON document of `--json`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from peftpick.probes.results import STACK_NOTE_PREFIX, probe_stack, result_to_dict
from peftpick.types import GIB, ProbeResult

JSON_SCHEMA_VERSION = 1


def probes_document(model: str, results: Sequence[ProbeResult], interrupted: bool = False) -> dict[str, Any]:
    """What `peftpick probe --json` prints: stable keys, one entry per probe (see result_to_dict)."""
    return {"schema_version": JSON_SCHEMA_VERSION, "model": model, "interrupted": interrupted,
            "results": [result_to_dict(result) for result in results]}


def _gib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.2f}"


def _setting(result: ProbeResult) -> str:
    shape = result.shape
    words = f"{shape.batch_size}x{_sample_words(shape)}"
    if shape.gradient_accumulation > 1:
        words += f" acc{shape.gradient_accumulation}"
    if shape.gradient_checkpointing:
        words += " ckpt"
    return words


def _sample_words(shape) -> str:
    """One sample of a setting: "768" tokens, or a denoiser's "512px" image / "33f@480px" clip."""
    if shape.resolution is None:
        return str(shape.seq_len)
    return (f"{shape.frames}f@" if shape.frames else "") + f"{shape.resolution}px"


def _speed_unit(results: Sequence[ProbeResult]) -> str:
    """What the speed column counts: tokens (language models), or images / clips per second (denoisers, whose
    `tokens_per_second` counts latent image tokens: the column shows samples instead, effective batch / step)."""
    shapes = [r.shape for r in results]
    if not shapes or any(shape.resolution is None for shape in shapes):
        return "Tokens/s"
    return "Clips/s" if any(shape.frames for shape in shapes) else "Images/s"


def _speed(result: ProbeResult, unit: str) -> str:
    if unit == "Tokens/s":
        return "-" if result.tokens_per_second is None else f"{result.tokens_per_second:,.0f}"
    if not result.step_seconds:
        return "-"
    return f"{result.shape.effective_batch / result.step_seconds:,.2f}"


def _loss(result: ProbeResult) -> str:
    if not result.losses:
        return "-"
    if not all(math.isfinite(value) for value in result.losses):
        return "diverged"
    return f"{result.losses[0]:.2f} -> {result.losses[-1]:.2f}"


def _slope(result: ProbeResult) -> str:
    if result.loss_slope is None:
        return "-"
    if result.loss_slope_stderr is None:
        return f"{result.loss_slope:+.2g}"
    return f"{result.loss_slope:+.2g} ± {result.loss_slope_stderr:.1g}"


def _stack(result: ProbeResult) -> str:
    """The stack a probe ran in a few words: "adamw-8bit, 4bit, chunked, hf"."""
    stack = probe_stack(result)
    return ", ".join(stack[name] for name in ("optimizer", "quant", "loss", "trainer"))


def _plain_stack(result: ProbeResult) -> bool:
    stack = probe_stack(result)
    return stack["quant"] == "none" and stack["loss"] == "stock" and stack["trainer"] == "plain" and \
        stack["optimizer"] in ("adamw", "lora-fa")


def _status(result: ProbeResult) -> str:
    words = {"ok": "ok", "oom": "does not fit", "error": "error"}[result.status]
    return words + (", cached" if result.from_cache else "")


def print_probe_table(model: str, results: Sequence[ProbeResult], console: Any) -> None:
    """A rich table of the measurements, then where they come from and what went wrong. Memory columns appear
    when some probe measured memory (not on the CPU)."""
    from rich import box
    from rich.table import Table

    measured_on = sorted({r.device for r in results if r.versions})
    title = f"Probes of {model}" + (f", measured on {', '.join(measured_on)}" if measured_on else "")
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    memory = any(r.peak_allocated_bytes is not None for r in results)
    columns = [("Method", "left"), ("Status", "left"), ("Setting", "left")]
    if memory:
        columns += [("Peak alloc GiB", "right"), ("Peak reserved GiB", "right"), ("NVML GiB", "right")]
    unit = _speed_unit(results)
    stacks = not all(_plain_stack(r) for r in results)  # the column when a probe ran more than AdamW and the stock loss
    if stacks:
        columns.append(("Stack (optimizer, base, loss, trainer)", "left"))
    columns += [(unit, "right"), ("Loss", "right"), ("Slope/step ± s.e.", "right")]
    for header, justify in columns:  # cells fold rather than being cut off when the terminal is narrow
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for result in results:
        cells = [result.display_name or result.method, _status(result), _setting(result)]
        if memory:
            cells += [_gib(result.peak_allocated_bytes), _gib(result.peak_reserved_bytes),
                      _gib(result.nvml_used_bytes)]
        if stacks:
            cells.append(_stack(result))
        cells += [_speed(result, unit), _loss(result), _slope(result)]
        table.add_row(*cells)
    console.print(table)
    for line in footnotes(results):
        console.print(line, highlight=False, markup=False)


def footnotes(results: Sequence[ProbeResult]) -> list[str]:
    """Where the figures come from, what the probes trained on, and every error, one line each."""
    lines = []
    if any(r.device == "cpu" and r.status == "ok" for r in results):
        lines.append("Memory: not measured on the CPU (speed and loss only); probe on a CUDA GPU for memory figures.")
    versions = next((r.versions for r in results if r.versions), None)
    if versions:
        lines.append("Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()))
    data = next((r for r in results if r.data), None)
    if data is not None and data.shape.resolution is None:
        lines.append(f"Data: {data.data}; every batch packed to the full sequence length (the worst case for memory).")
    elif data is not None:
        lines.append(f"Data: {data.data}.")
    said = data.data if data is not None else ""
    for note in dict.fromkeys(note for r in results for note in r.notes
                              if note not in said and not note.startswith(STACK_NOTE_PREFIX)):
        lines.append(f"Note: {note}")
    stack_notes = {r.display_name or r.method: next((n for n in r.notes if n.startswith(STACK_NOTE_PREFIX)), None)
                   for r in results}
    for name, note in stack_notes.items():  # what each probe ran: optimizer class, base, loss kernel, loop
        if note:
            lines.append(f"Stack of {name}: {note.removeprefix(STACK_NOTE_PREFIX)}")
    timed = [r for r in results if r.wall_seconds is not None and not r.from_cache]
    if timed:
        lines.append("Wall time: " + ", ".join(f"{r.display_name or r.method} {r.wall_seconds:.1f} s" for r in timed)
                     + " (worker start-up included)")
    cached = sum(r.from_cache for r in results)
    if cached:
        lines.append(f"{cached} of {len(results)} result(s) came from the probe cache (--no-cache measures again).")
    for r in results:
        name = r.display_name or r.method
        peaks = [(rank.get("rank"), rank.get("peak_reserved")) for rank in r.ranks if rank.get("peak_reserved")]
        if peaks:
            lines.append(f"{name} on {r.gpus} GPUs, peak reserved per rank: "
                         + ", ".join(f"rank {rank} {value / 2**30:.2f} GiB" for rank, value in peaks))
        if r.oom_settings and r.status == "ok":
            lines.append(f"{name}: out of memory with {len(r.oom_settings)} costlier setting(s); the one shown fits.")
        elif r.status == "oom":
            lines.append(f"{name}: out of memory in every setting tried, down to micro-batch {r.shape.batch_size} "
                         "with gradient checkpointing.")
        elif r.status == "error":
            lines.append(f"{name}: {r.error}")
    return lines
