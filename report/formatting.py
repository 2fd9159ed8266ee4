"""Short, human-readable cell texts shared by every renderer (text, Markdown, HTML).

Every memory figure is printed in GiB (2**30 bytes) with its provenance ("estimated" or "measured on <GPU>");
every quality figure says whether it is a benchmark run or the quality model's prediction, with its interval.
"""

from __future__ import annotations

import math
from typing import Any

from peftpick.types import (GIB, BenchmarkEvidence, Candidate, MemoryEstimate, RankedCandidate, ServingVerdict,
                            TrainingPlan)

# Table cells stay one line; the full value is in to_dict() and the snippet.
_TARGETS_CELL_LIMIT = 40
ALPHA_KEYS = ("lora_alpha", "alpha", "psoft_alpha", "randlora_alpha")
# Keys that set a method's size where it is not `r` (prompt learning, Fourier methods, OFT blocks ...).
_SIZE_KEYS = ("r", "target_r", "num_virtual_tokens", "n_frequency", "oft_block_size", "boft_block_size", "boft_block_num",
              "block_size", "adapter_len")


def gib(n_bytes: int | float | None, digits: int = 2) -> str:
    """Bytes as GiB without the unit, e.g. "3.21"; "n/a" for None."""
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / GIB:.{digits}f}"


def binary_size(n_bytes: int | float | None) -> str:
    """Bytes with a binary unit (KiB, MiB, GiB = 2**10, 2**20, 2**30 bytes)."""
    if n_bytes is None:
        return "n/a"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(n_bytes), 0
    while abs(value) >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{value:.0f} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def count(n: int | None) -> str:
    """A parameter count to 3 significant figures: "4.59 M" / "1.24 B" / "1.0 B" / "512".

    The unit is chosen after rounding, so 999,885,952 reads "1.0 B", not "1e+03 M"; a whole number below 10 keeps
    one decimal ("1.0 B", "7.0 B") so that it reads as the rounded figure it is.
    """
    if n is None:
        return "n/a"
    rounded = float(f"{n:.3g}")
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(rounded) >= scale:
            value = rounded / scale
            text = f"{value:.3g}"
            if "e" in text:  # only past 999 T
                text = f"{value:,.0f}"
            elif "." not in text and abs(value) < 10:
                text += ".0"
            return f"{text} {suffix}"
    return str(n)


def trainable_cell(estimate: MemoryEstimate) -> str:
    """Trainable parameters with their share of the model, e.g. "4.59 M (3.4 %)"."""
    text = count(estimate.trainable_params)
    if estimate.total_params:
        share = 100 * estimate.trainable_params / estimate.total_params
        text += f" ({share:.2g} %)" if share < 10 else f" ({share:.0f} %)"
    return text


def short_targets(targets: Any) -> str:
    """Target modules in a few characters: ["q_proj", "v_proj"] -> "q,v"; strings (regex, "all-linear") as is."""
    if targets is None:
        return "default"
    if isinstance(targets, str):
        text = targets
    else:
        names = sorted(str(name) for name in targets)
        text = ",".join(name.removesuffix("_proj") for name in names)
    return text if len(text) <= _TARGETS_CELL_LIMIT else text[: _TARGETS_CELL_LIMIT - 3] + "..."


def alpha_of(kwargs: dict[str, Any]) -> Any:
    return next((kwargs[key] for key in ALPHA_KEYS if kwargs.get(key) is not None), None)


def settings_cell(candidate: Candidate) -> str:
    """"r=16 / α=32 / q,v" for LoRA-like methods; the size setting for others; "all weights" for full FT."""
    if candidate.peft_config_class is None:
        return "all weights"
    kwargs = candidate.peft_kwargs
    parts = []
    size_key = next((key for key in _SIZE_KEYS if kwargs.get(key) not in (None, 0)), None)  # OFT saves r=0
    if size_key is not None:
        parts.append(f"{size_key}={kwargs[size_key]}")
    alpha = alpha_of(kwargs)
    if alpha is not None:
        parts.append(f"alpha={alpha}")
    if "target_modules" in kwargs:
        parts.append(short_targets(kwargs["target_modules"]))
    return " / ".join(parts) if parts else "PEFT defaults"


def memory_source(estimate: MemoryEstimate) -> str:
    """"estimated" or "measured on <GPU>", as the estimate records it."""
    return estimate.source or "estimated"


def peak_cell(estimate: MemoryEstimate) -> str:
    """Peak reserved GiB (what must fit) with its provenance."""
    return f"{gib(estimate.peak_reserved_bytes)} ({memory_source(estimate)})"


def margin_gib(estimate: MemoryEstimate, vram_gib: float) -> float:
    """VRAM left over at the peak, in GiB (negative: short by that much)."""
    return vram_gib - estimate.peak_reserved_bytes / GIB


def fit_cell(ranked: RankedCandidate, vram_gib: float) -> str:
    margin = margin_gib(ranked.estimate, vram_gib)
    room = f"{margin:.2f} GiB spare" if margin >= 0 else f"{-margin:.2f} GiB short"
    return f"{ranked.plan.fit} ({room})"


def fit_tone(fit: str) -> str:
    return {"fits": "good", "marginal": "warn"}.get(fit, "bad")


def relative(evidence: BenchmarkEvidence) -> float | None:
    value = evidence.relative_to_lora
    return value if math.isfinite(value) else None


def evidence_cell(evidence: BenchmarkEvidence | None) -> str:
    """"0.512 test accuracy, 1.03x LoRA (benchmark MetaMathQA lora/...)"; "no benchmark run" without evidence."""
    if evidence is None:
        return "no benchmark run"
    ratio = relative(evidence)
    vs_lora = f", {ratio:.2f}x LoRA" if ratio is not None else ""
    return f"{evidence.score:.3f} {evidence.metric}{vs_lora} (benchmark {evidence.benchmark} {evidence.experiment})"


def quality_cell(ranked: RankedCandidate) -> str:
    """"1.07 [1.04-1.11] run" (a benchmark run), "1.00 [0.91-1.10] model" (the quality model's prediction),
    "... model+probe" (with the user's probe losses); "n/a" without a figure."""
    quality = ranked.quality
    if quality is None:
        return "n/a"
    source = "run" if quality.source == "benchmark run" else ("model+probe" if quality.used_probe else "model")
    return f"{quality.relative:.2f} [{quality.low:.2f}-{quality.high:.2f}] {source}"


def speed_cell(ranked: RankedCandidate) -> str:
    """"0.77 (run)" from the benchmark run's training time, "1.02 (probe)" measured on the user's GPU, "1.00
    (assumed)" when neither is known."""
    if ranked.relative_speed is None:
        return "n/a"
    source = ranked.speed_source or ""
    tag = "probe" if source.startswith("measured") else "run" if source.startswith("benchmark") else "assumed"
    return f"{ranked.relative_speed:.2f} ({tag})"


def serving_cell(serving: ServingVerdict) -> str:
    return f"{serving.route}: {serving.reason}" if serving.reason else serving.route


def serving_tone(route: str) -> str:
    return {"native": "good", "not needed": "good", "merge": "", "convert": "warn"}.get(route, "bad")


def plan_text(ranked: RankedCandidate) -> str:
    """Training settings in one line: micro-batch x accumulation, checkpointing, optimizer, learning rate, dtype."""
    return plan_text_of(ranked.plan, ranked.candidate)


def plan_text_of(plan: TrainingPlan, candidate: Candidate | None = None) -> str:
    gpus = plan.gpus
    effective = plan.micro_batch * plan.gradient_accumulation * gpus
    where = f" on each of {gpus} GPUs ({plan.strategy})" if gpus > 1 or plan.strategy != "single" else ""
    return (
        f"micro-batch {plan.micro_batch} x gradient accumulation {plan.gradient_accumulation}{where} "
        f"(effective batch {effective}), gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
        + (f"optimizer {optimizer_label(plan.optimizer)}, learning rate {candidate.learning_rate:g}, "
           if candidate is not None else "")
        + f"{plan.estimate.shape.dtype} weights" + (f", {LOSS_LABELS[plan.loss]}" if plan.loss != "stock" else "")
    )


def gpus_label(request) -> str:
    """"80 GiB" for one GPU, "4 x 80 GiB" for several."""
    return f"{request.vram_gib:g} GiB" if request.gpus == 1 else f"{request.gpus} x {request.vram_gib:g} GiB"


LOSS_LABELS = {"liger": "Liger's fused linear cross-entropy (pip install liger-kernel)",
               "chunked": "TRL's chunked LM head"}


def optimizer_label(optimizer: str) -> str:
    from peftpick.types import OPTIMIZER_LABELS

    return OPTIMIZER_LABELS.get(optimizer, optimizer)
