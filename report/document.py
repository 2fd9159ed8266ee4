"""The report's content as a list of blocks, independent of the output format.

`build_document` decides what the report says and in which order (verdict, ranked table, exclusions,
recommendation, assumptions); `render.py` turns the same blocks into rich text, Markdown or HTML, so the three
formats never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from peftpick.report.formatting import (
    binary_size,
    evidence_cell,
    fit_cell,
    fit_tone,
    gib,
    gpus_label,
    memory_source,
    peak_cell,
    plan_text,
    plan_text_of,
    quality_cell,
    serving_cell,
    serving_tone,
    settings_cell,
    speed_cell,
    trainable_cell,
)
from peftpick.report.launch import launch_for
from peftpick.report.snippet import snippet_for
from peftpick.types import RankedCandidate, Recommendation

Tone = Literal["", "good", "warn", "bad"]


@dataclass(frozen=True)
class Cell:
    text: str
    tone: Tone = ""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str
    role: Literal["", "verdict", "note"] = ""


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    right_aligned: frozenset[int] = frozenset()  # column indexes holding figures
    wide: frozenset[int] = frozenset()  # column indexes holding sentences (given more room on a terminal)


@dataclass(frozen=True)
class Code:
    code: str
    language: str = "python"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class ParetoPlot:
    """Placeholder for the report's pictures (quality intervals, memory bars); only the HTML renderer draws them."""

    caption: str


Block = Union[Heading, Paragraph, Table, Code, Bullets, ParetoPlot]

RANKED_HEADERS = (
    "#", "Method", "Settings", "Trainable params", "Adapter size", "Peak VRAM, GiB reserved", "Fit",
    "Quality x LoRA [80% int.]", "Benchmark evidence", "Speed x LoRA", "Serving", "Why",
)


def _cells(*values: str | Cell) -> tuple[Cell, ...]:
    return tuple(value if isinstance(value, Cell) else Cell(value) for value in values)


def serve_label(rec: Recommendation) -> str:
    serve = getattr(rec.request.serve, "value", rec.request.serve)
    return "no serving stack" if serve == "none" else f"serving with {serve}"


def verdict_text(rec: Recommendation) -> str:
    """rec.verdict, or a sentence built from the ranking when the recommender left it empty."""
    if rec.verdict:
        return rec.verdict
    best = rec.best
    if best is None:
        return (f"No fine-tuning method fits every constraint for {rec.request.model} on "
                f"{rec.request.vram_gib:g} GiB; the exclusions below say why each was ruled out.")
    return (f"{best.candidate.display_name} is the best choice for {rec.request.model} on "
            f"{rec.request.vram_gib:g} GiB ({serve_label(rec)}): {best.reason}")


def ranked_table(rec: Recommendation) -> Table:
    vram = float(rec.request.vram_gib)
    # image models: the benchmark's drift (lower keeps more of the base model) beside the quality
    with_drift = any(ranked.drift is not None for ranked in rec.ranked)
    rows = []
    for position, ranked in enumerate(rec.ranked, 1):
        candidate = ranked.candidate
        cells = _cells(
            str(position) + ("" if ranked.pareto else " (d)"),
            candidate.display_name,
            settings_cell(candidate),
            trainable_cell(ranked.estimate),
            binary_size(ranked.adapter_bytes),
            peak_cell(ranked.estimate),
            Cell(fit_cell(ranked, vram), fit_tone(ranked.plan.fit)),
            Cell(quality_cell(ranked), "bad" if ranked.flags else ""),
            evidence_cell(ranked.evidence),
            speed_cell(ranked),
            Cell(serving_cell(ranked.serving), serving_tone(ranked.serving.route)),
            ranked.reason,
        )
        if with_drift:
            cells = (*cells[:8], Cell("-" if ranked.drift is None else f"{ranked.drift:.3f} (run)"), *cells[8:])
        rows.append(cells)
    headers = (*RANKED_HEADERS[:6], f"Fit vs {vram:g} GiB", *RANKED_HEADERS[7:])
    wide = {8, 10, 11}
    if with_drift:
        headers = (*headers[:8], "Drift (lower keeps more)", *headers[8:])
        wide = {9, 11, 12}
    return Table(headers, tuple(rows), right_aligned=frozenset({0, 3, 4, 5}), wide=frozenset(wide))


def ranking_note(rec: Recommendation) -> str:
    """How the order was made: the Pareto front first, then the goal's utility, with its weights."""
    goal = getattr(rec.request.goal, "value", rec.request.goal)
    weights = ", ".join(f"{axis} {weight:g}" for axis, weight in rec.goal_weights.items())
    dominated = sum(not r.pareto for r in rec.ranked)
    with_drift = any(r.drift is not None for r in rec.ranked)
    axes = "expected quality, peak memory, speed, adapter size and drift" if with_drift else \
        "expected quality, peak memory, speed and adapter size"
    count = "five" if with_drift else "four"
    return (f"Order: candidates on the Pareto front over {axes} "
            f"first, then by the --goal {goal} utility ({weights}). "
            + (f"{dominated} candidate(s) marked (d) are dominated: another is at least as good on all {count} "
               "figures and better on one (the Why column names it). " if dominated else "")
            + "Candidates whose probe loss does not fall are ranked last. Quality: \"run\" is the candidate's own "
            "benchmark run (interval: test-set sampling noise; for image runs the spread of late validation scores), \"model\" the quality model's prediction from "
            "similar runs, \"model+probe\" with your probe's early losses. Speed: training steps per second "
            "relative to plain LoRA, from the benchmark runs' training times (\"run\") or measured by the "
            "probes (\"probe\"), slowed by about 1.3x where the plan needs gradient checkpointing.")


def breakdown_table(ranked: tuple[RankedCandidate, ...]) -> Table:
    """Allocated bytes by part at the peak, one column per candidate, with the peaks and their source."""
    parts: list[str] = []
    for candidate in ranked:
        parts += [part for part in candidate.estimate.breakdown if part not in parts]
    rows = [
        _cells(part, *(gib(c.estimate.breakdown.get(part, 0), 3) for c in ranked)) for part in parts
    ]
    rows.append(_cells("= peak allocated", *(gib(c.estimate.peak_allocated_bytes, 3) for c in ranked)))
    rows.append(_cells("peak reserved (must fit)", *(gib(c.estimate.peak_reserved_bytes, 3) for c in ranked)))
    rows.append(_cells("source", *(memory_source(c.estimate) for c in ranked)))
    headers = ("Part (GiB)", *(c.candidate.display_name for c in ranked))
    return Table(headers, tuple(rows), right_aligned=frozenset(range(1, len(ranked) + 1)))


def exclusions_table(rec: Recommendation) -> Table:
    rows = tuple(_cells(e.display_name, e.constraint, e.reason) for e in rec.excluded)
    return Table(("Method", "Constraint", "Reason"), rows)


def evidence_note(rec: Recommendation) -> str:
    """Where the benchmark figures come from, once per benchmark."""
    seen: dict[str, str] = {}
    for ranked in rec.ranked:
        ev = ranked.evidence
        if ev is None or ev.benchmark in seen:
            continue
        commit = ev.source_commit[:7] if len(ev.source_commit) == 40 else ev.source_commit
        seen[ev.benchmark] = (
            f"{ev.benchmark}: {ev.metric} of runs on {ev.gpu} with base model {ev.model} (source commit {commit}); "
            f"LoRA reference {ev.lora_experiment} scores {ev.lora_score:.3g}"
        )
    if not seen:
        return "No ranked candidate has a benchmark run; their quality is the ranking's expectation, not a measurement."
    return "Benchmark evidence: " + "; ".join(seen.values()) + ". \"x LoRA\" is score / LoRA reference score."


def _recommendation_blocks(rec: Recommendation) -> list[Block]:
    best = rec.best
    if best is None:
        return [Heading("Recommendation"),
                Paragraph("Nothing to recommend: every method was excluded (see above).")]
    estimate = best.estimate
    vram = float(rec.request.vram_gib)
    blocks: list[Block] = [
        Heading(f"Recommendation: {best.candidate.display_name}"),
        Paragraph(f"Why: {best.reason}"),
        Paragraph(f"Training settings: {plan_text(best)}."),
        Paragraph(
            f"Memory: peak {gib(estimate.peak_reserved_bytes)} GiB reserved, {gib(estimate.peak_allocated_bytes)} "
            f"GiB allocated ({memory_source(estimate)}); {fit_cell(best, vram)} on {vram:g} GiB."
        ),
        Paragraph(f"{serve_label(rec).capitalize()}: {serving_cell(best.serving)}"
                  + (f" [source: {best.serving.source}]" if best.serving.source else "")
                  + (f" [facts for {best.serving.versions}]" if best.serving.versions else "")),
    ]
    blocks += _launch_blocks(best, rec)
    if best.serving.launch:
        after = {"convert": " (after the conversion)", "merge": " (after merging)"}.get(best.serving.route, "")
        blocks.append(Paragraph(f"Serve it{after}:"))
        blocks.append(Code("\n".join(best.serving.launch) + "\n", language="bash"))
    if best.prefer_when:
        blocks.append(Paragraph(f"Prefer it when {best.prefer_when}"))
    blocks.append(Code(snippet_for(best, rec)))
    runner_up = rec.runner_up
    if runner_up is not None:
        when = f"Prefer it when {runner_up.prefer_when}" if runner_up.prefer_when else runner_up.reason
        blocks.append(Paragraph(
            f"Runner-up: {runner_up.candidate.display_name} ({settings_cell(runner_up.candidate)}; "
            f"{plan_text(runner_up)}). {when}"
        ))
    return blocks


def _launch_blocks(best: RankedCandidate, rec: Recommendation) -> list[Block]:
    """How to launch a multi-GPU plan, what each GPU holds, and the single-GPU alternative."""
    launch = launch_for(best, rec)
    blocks: list[Block] = []
    if launch is not None:
        plan, estimate = best.plan, best.estimate
        held = estimate.rank_state
        who = ("Each rank's share, kept in host memory (CPU offload):" if estimate.host_bytes else "Each GPU holds")
        words = []
        if held:
            words.append(f"{who} {gib(held.get('parameters', 0))} GiB of parameters, "
                         f"{gib(held.get('gradients', 0))} GiB of gradients and "
                         f"{gib(held.get('optimizer state', 0))} GiB of optimizer state.")
        if estimate.host_bytes:
            words.append(f"Host memory for what is offloaded: {gib(estimate.host_bytes)} GiB.")
        words.append(f"Micro-batch {plan.micro_batch} per GPU x {plan.gradient_accumulation} accumulation x "
                     f"{plan.gpus} GPUs = {plan.micro_batch * plan.gradient_accumulation * plan.gpus} sequences per "
                     "optimizer step.")
        blocks += [
            Heading(f"Launch on {plan.gpus} GPUs: {plan.strategy}", 3),
            Paragraph(" ".join(words)),
            Code(launch.command + "\n", language="bash"),
            *(block for file in launch.files
              for block in (Paragraph(f"{file.name}:"), Code(file.text, language=file.language))),
            Paragraph(f"Saving for serving: {launch.saving}."),
        ]
    alternative = rec.alternative
    if alternative is not None:
        plan = alternative.plan
        blocks += [
            Heading(f"Alternative: {alternative.label}", 3),
            Paragraph(f"{alternative.candidate.display_name} over a 4-bit base on one GPU: {plan_text_of(plan)}; peak "
                      f"{gib(plan.estimate.peak_reserved_bytes)} GiB reserved ({memory_source(plan.estimate)}), "
                      f"{plan.fit}. {alternative.comparison}"),
        ]
    return blocks


def _assumption_items(rec: Recommendation) -> tuple[str, ...]:
    request = rec.request
    quant = getattr(request.quant, "value", request.quant)
    goal = getattr(request.goal, "value", request.goal)
    items = [
        f"Request: model {request.model}, {gpus_label(request)} VRAM ({request.vram_source}), "
        f"{serve_label(rec)}{', several adapters over one base' if request.multi_adapter else ''}, "
        f"base weights {'not quantized' if quant == 'none' else quant}, goal {goal}, sequences of "
        f"{request.seq_len} tokens, effective batch "
        f"{request.batch_size}",
        f"Architecture figures of {rec.architecture.name}: {rec.architecture.source or 'source not recorded'}",
        ("Memory figures measured on " + rec.gpu) if rec.gpu else
        "Memory figures are estimated (no GPU measurement); peak reserved is what must fit, peak allocated is "
        "what tensors occupy",
        *rec.assumptions,
        "Units: GiB = 2^30 bytes, MiB = 2^20 bytes",
    ]
    return tuple(items)


def build_document(rec: Recommendation) -> list[Block]:
    """Blocks in reading order: verdict, ranked candidates, exclusions, recommendation, assumptions."""
    blocks: list[Block] = [
        Heading(f"peftpick: {rec.request.model} on {gpus_label(rec.request)}, {serve_label(rec)}", 1),
        Paragraph(verdict_text(rec), "verdict"),
        Heading("Ranked candidates"),
    ]
    if rec.ranked:
        blocks += [
            ParetoPlot("How sure the quality order is, and where the memory goes, one row per ranked candidate."),
            ranked_table(rec),
            Paragraph(
                "Peak VRAM is peak reserved memory (held by PyTorch's caching allocator: the figure that must fit); "
                "allocated memory by part is in the breakdown below. " + evidence_note(rec),
                "note",
            ),
            Paragraph(ranking_note(rec), "note"),
            *(Paragraph("Uncertainty: " + note, "note") for note in rec.uncertainty),
            Heading("Memory breakdown at the peak", 3),
            breakdown_table(rec.ranked),
        ]
    else:
        blocks.append(Paragraph("No method passes every constraint; the exclusions below say why."))
    blocks.append(Heading("Excluded"))
    blocks.append(exclusions_table(rec) if rec.excluded else Paragraph("No method was excluded."))
    blocks += _recommendation_blocks(rec)
    blocks += [Heading("Assumptions"), Bullets(_assumption_items(rec))]
    return blocks
