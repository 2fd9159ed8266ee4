"""Probe results: the loss-slope fit, conversion to and from plain dicts (JSON, the cache), and the measured
figures as a `MemoryEstimate` the recommender can put in place of the estimate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from peftpick.types import MemoryEstimate, ProbeResult, TrainingShape

RESULT_SCHEMA_VERSION = 1


def fit_loss_slope(losses: Sequence[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of loss against optimizer step (0, 1, 2, ...), and its standard error.

    The slope is None with fewer than two finite losses, the standard error with fewer than three (a line through
    two points has no residual to judge it by). Non-finite losses (a run that diverged) give (None, None): a slope
    through them would mean nothing.
    """
    values = [float(value) for value in losses]
    n = len(values)
    if n < 2 or not all(math.isfinite(value) for value in values):
        return None, None
    mean_step = (n - 1) / 2
    mean_loss = sum(values) / n
    sxx = sum((step - mean_step) ** 2 for step in range(n))
    sxy = sum((step - mean_step) * (loss - mean_loss) for step, loss in enumerate(values))
    slope = sxy / sxx
    if n < 3:
        return slope, None
    intercept = mean_loss - slope * mean_step
    residual = sum((loss - (intercept + slope * step)) ** 2 for step, loss in enumerate(values))
    return slope, math.sqrt(residual / (n - 2) / sxx)


# ------------------------------------------------------------------------------------------- dicts


def result_to_dict(result: ProbeResult) -> dict[str, Any]:
    """A JSON-ready dict with stable keys (non-finite losses become None, shapes become dicts)."""
    data = dataclasses.asdict(result)
    data["losses"] = [value if math.isfinite(value) else None for value in result.losses]
    data["notes"] = list(result.notes)
    data["oom_settings"] = [dataclasses.asdict(shape) for shape in result.oom_settings]
    return data


def result_from_dict(data: Mapping[str, Any]) -> ProbeResult:
    """The inverse of `result_to_dict`. Raises KeyError / TypeError / ValueError for data that is not a result."""
    known = {f.name for f in dataclasses.fields(ProbeResult)}
    values = {key: value for key, value in data.items() if key in known}
    values["shape"] = _shape(values["shape"])
    if values.get("requested_shape") is not None:
        values["requested_shape"] = _shape(values["requested_shape"])
    values["oom_settings"] = tuple(_shape(shape) for shape in values.get("oom_settings", ()))
    values["losses"] = tuple(math.nan if value is None else float(value) for value in values.get("losses", ()))
    values["notes"] = tuple(values.get("notes", ()))
    values["ranks"] = tuple(dict(rank) for rank in values.get("ranks", ()))
    if values["status"] not in ("ok", "oom", "error"):
        raise ValueError(f"unknown probe status {values['status']!r}")
    return ProbeResult(**values)


def _sample_words(shape: TrainingShape) -> str:
    """One sample of a setting: "768 tokens", or a denoiser's "512 px image" / "33-frame 480 px clip"."""
    if shape.resolution is None:
        return f"{shape.seq_len} tokens"
    if shape.frames:
        return f"{shape.frames}-frame {shape.resolution} px clips"
    return f"{shape.resolution} px images"


def _shape(data: Mapping[str, Any] | TrainingShape) -> TrainingShape:
    if isinstance(data, TrainingShape):
        return data
    known = {f.name for f in dataclasses.fields(TrainingShape)}
    return TrainingShape(**{key: value for key, value in data.items() if key in known})


# ------------------------------------------------------------------------------------------- estimates


def probe_to_estimate(result: ProbeResult, shape: TrainingShape | None = None,
                      estimate: MemoryEstimate | None = None) -> MemoryEstimate:
    """The probe's measured peaks as a MemoryEstimate with source "measured on <GPU>".

    shape: the setting to label the figures with (default: the setting the probe measured, `result.shape`).
    estimate: the estimate it replaces, if any; its adapter file size and parameter count fill what a probe does
        not measure, and its assumptions are kept after the probe's own.
    Raises ValueError when the probe did not measure memory (status not "ok", or run on the CPU), and
    StackMismatch (a ValueError) when the probe ran another stack (optimizer, quant, loss, trainer) than the
    estimate assumed: its figures are not that estimate's, and are never put in its place silently.
    """
    if result.status != "ok" or result.peak_allocated_bytes is None or result.peak_reserved_bytes is None:
        reason = result.error or ("the probe ran on the CPU" if result.device == "cpu" else f"status {result.status}")
        raise ValueError(f"the probe of {result.method} measured no GPU memory ({reason})")
    if estimate is not None:
        mismatch = stack_mismatch(result, estimate)
        if mismatch:
            raise StackMismatch(f"the probe of {result.method} ran another stack than the estimate assumed "
                                f"({'; '.join(mismatch)}): its figures do not stand for that estimate")
    shape = shape or result.shape
    breakdown = dict(result.breakdown) or {"measured peak": result.peak_allocated_bytes}
    measured = result.shape
    assumptions = [
        f"measured on {result.device}: {measured.batch_size} x {_sample_words(measured)} per micro-batch"
        + (f", {measured.gradient_accumulation} micro-batches per step" if measured.gradient_accumulation > 1 else "")
        + f", gradient checkpointing {'on' if measured.gradient_checkpointing else 'off'}, "
        f"peak over {len(result.losses)} optimizer steps",
        "probe stack: " + ", ".join(f"{name} {value}" for name, value in probe_stack(result).items()),
    ]
    if result.nvml_used_bytes is not None:
        assumptions.append(f"the device showed {result.nvml_used_bytes / 2**30:.2f} GiB more in use than before "
                           "the probe (NVML: includes the CUDA context, which PyTorch does not count)")
    if estimate is not None:
        assumptions.extend(estimate.assumptions)
    return MemoryEstimate(
        peak_allocated_bytes=result.peak_allocated_bytes,
        peak_reserved_bytes=result.peak_reserved_bytes,
        breakdown=breakdown,
        trainable_params=result.trainable_params if result.trainable_params is not None
        else (estimate.trainable_params if estimate else 0),
        total_params=result.total_params if result.total_params is not None
        else (estimate.total_params if estimate else 0),
        shape=shape,
        adapter_file_bytes=estimate.adapter_file_bytes if estimate is not None else None,
        assumptions=tuple(assumptions),
        source=f"measured on {result.device}",
    )


class StackMismatch(ValueError):
    """A probe's stack (optimizer, quant, loss, trainer) is not the one the estimate it would replace assumed."""


def stack_mismatch(result: ProbeResult, estimate: MemoryEstimate | TrainingShape) -> list[str]:
    """Where the stack `result` ran differs from the estimate's (or a setting's), e.g. ["loss: stock, not liger"];
    [] when they are the same."""
    from peftpick.probes.stack import differences

    shape = estimate.shape if isinstance(estimate, MemoryEstimate) else estimate
    return differences(result.shape, shape)


def probe_stack(result: ProbeResult) -> dict[str, str]:
    """The stack a probe ran, by name: optimizer, quant, loss, trainer (TrainingShape's values, from
    `result.shape`), and where known optimizer_class and trainer_run (from `ProbeResult.stack` where the installed
    peftpick.types has it), for the report."""
    from peftpick.probes.stack import STACK_FIELDS

    found = {name: str(getattr(result.shape, name)) for name in STACK_FIELDS}
    recorded = dict(getattr(result, "stack", None) or {})
    if not recorded:  # the runner's "stack: optimizer NAME (CLASS), ..., trainer NAME (HOW)" note
        import re

        note = next((n for n in result.notes if n.startswith(STACK_NOTE_PREFIX)), "")
        for key, name in (("optimizer_class", "optimizer"), ("trainer_run", "trainer")):
            match = re.search(rf"\b{name} \S+ \(([^)]+)\)", note)
            if match:
                recorded[key] = match.group(1)
    for key, value in recorded.items():
        if key in ("optimizer_class", "trainer_run"):
            found[key] = str(value)
    return found


STACK_NOTE_PREFIX = "stack: "  # the note that states a probe's stack (probes.runner writes it)
