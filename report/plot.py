"""Pareto plot of the ranked candidates: expected quality against peak memory, as PNG bytes.

Quality is the expected benchmark score relative to plain LoRA (1.0 = LoRA's reference run), with its interval:
filled circles are benchmark runs, hollow squares the quality model's predictions. (Recommendations built
without quality figures fall back to the benchmark evidence, with runless candidates on a row of their own.)
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from peftpick.report.formatting import relative
from peftpick.types import GIB, Recommendation

_EVIDENCE_COLOUR = "#1f6feb"
_NO_EVIDENCE_COLOUR = "#8c8c8c"
_VRAM_COLOUR = "#c62828"


@dataclass(frozen=True)
class PlotPoint:
    label: str
    memory_gib: float
    quality: float
    has_evidence: bool  # a benchmark run (filled marker); False: predicted by the quality model or no figure
    low: float | None = None  # interval of the quality figure, when there is one
    high: float | None = None
    pareto: bool = True


def plot_points(rec: Recommendation) -> tuple[list[PlotPoint], str]:
    """One point per ranked candidate, and the y-axis label."""
    if all(r.quality is not None for r in rec.ranked):
        points = [PlotPoint(r.candidate.display_name, r.estimate.peak_reserved_bytes / GIB, r.quality.relative,
                            r.quality.source == "benchmark run", r.quality.low, r.quality.high, r.pareto)
                  for r in rec.ranked]
        return points, "expected quality relative to LoRA (1.0 = LoRA), 80 % interval"
    ratios = [relative(r.evidence) if r.evidence is not None else None for r in rec.ranked]
    if not any(ratio is not None for ratio in ratios):
        points = [
            PlotPoint(r.candidate.display_name, r.estimate.peak_reserved_bytes / GIB, float(r.score), False)
            for r in rec.ranked
        ]
        return points, "peftpick ranking score (no benchmark evidence)"
    # The row for candidates without evidence sits clearly below the lowest measured one and the LoRA line.
    known = [ratio for ratio in ratios if ratio is not None] + [1.0]
    floor = min(known) - max(0.1 * (max(known) - min(known)), 0.05)
    points = [
        PlotPoint(r.candidate.display_name, r.estimate.peak_reserved_bytes / GIB,
                  ratio if ratio is not None else floor, ratio is not None)
        for r, ratio in zip(rec.ranked, ratios)
    ]
    return points, "benchmark score relative to LoRA (1.0 = LoRA)"


def _pareto_front(points: list[PlotPoint]) -> list[PlotPoint]:
    """Points that no other point beats on both memory (lower) and quality (higher), for the front line drawn
    through quality and memory (the ranking's front also counts speed and adapter size)."""
    front, best_quality = [], float("-inf")
    for point in sorted((p for p in points if p.has_evidence or p.low is not None), key=lambda p: (p.memory_gib, -p.quality)):
        if point.quality > best_quality:
            front.append(point)
            best_quality = point.quality
    return front


def pareto_png(rec: Recommendation) -> bytes | None:
    """The plot as PNG bytes; None when nothing is ranked."""
    if not rec.ranked:
        return None
    # Agg is picked here, through the object API, so importing peftpick never touches matplotlib's global
    # backend and no pyplot figure is left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points, y_label = plot_points(rec)
    vram_gib = float(rec.request.vram_gib)
    figure = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    with_evidence = [p for p in points if p.has_evidence]
    without = [p for p in points if not p.has_evidence]
    predicted = all(p.low is not None for p in points)  # every point has an interval: no "no run" row
    if predicted:
        axes.errorbar([p.memory_gib for p in points], [p.quality for p in points],
                      yerr=[[p.quality - p.low for p in points], [p.high - p.quality for p in points]],
                      fmt="none", ecolor="#9aa4ad", elinewidth=0.8, capsize=2, zorder=2)
    if with_evidence:
        axes.scatter([p.memory_gib for p in with_evidence], [p.quality for p in with_evidence], s=46,
                     color=_EVIDENCE_COLOUR, marker="o", zorder=3, label="benchmark run")
    front = _pareto_front(points)
    if len(front) > 1:
        axes.plot([p.memory_gib for p in front], [p.quality for p in front], color=_EVIDENCE_COLOUR,
                  linestyle=":", linewidth=1, zorder=2, label="front: quality vs memory")
    if without:
        label = ("quality model prediction" if predicted else
                 "no benchmark run (ranking score)" if not with_evidence else "no benchmark run (placed at bottom)")
        axes.scatter([p.memory_gib for p in without], [p.quality for p in without], s=52,
                     facecolors="none", edgecolors=_NO_EVIDENCE_COLOUR if not predicted else _EVIDENCE_COLOUR,
                     marker="s", zorder=3, label=label)
    if with_evidence or predicted:
        axes.axhline(1.0, color="#555555", linewidth=0.8, linestyle="-.", zorder=1, label="plain LoRA (1.0)")
    if with_evidence and without and not predicted:
        _label_no_evidence_row(axes, [p.quality for p in with_evidence], without[0].quality)
    for point in points:
        axes.annotate(point.label, (point.memory_gib, point.quality), textcoords="offset points", xytext=(5, 5),
                      fontsize=8)

    axes.axvline(vram_gib, color=_VRAM_COLOUR, linestyle="--", linewidth=1.2, label=f"your VRAM: {vram_gib:g} GiB")
    right = max([vram_gib, *(p.memory_gib for p in points)]) * 1.12
    axes.axvspan(vram_gib, right, color=_VRAM_COLOUR, alpha=0.06, zorder=0)
    axes.set_xlim(0, right)
    axes.set_xlabel(f"peak reserved GPU memory, GiB (2^30 bytes; {_memory_provenance(rec)})")
    axes.set_ylabel(y_label)
    axes.set_title(f"{rec.architecture.name}: expected quality vs peak memory", fontsize=10)
    axes.grid(True, linewidth=0.4, alpha=0.5)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _label_no_evidence_row(axes, measured: list[float], floor: float) -> None:
    """Give the bottom row its own tick ("no run") so it never reads as a score."""
    top = max([*measured, 1.0])
    bottom = min([*measured, 1.0])
    pad = max(0.05 * (top - bottom), 0.01)
    axes.set_ylim(floor - pad, top + 2 * pad)
    separator = (floor + bottom) / 2
    axes.axhline(separator, color=_NO_EVIDENCE_COLOUR, linewidth=0.6, linestyle=":")
    ticks = [tick for tick in axes.get_yticks() if separator < tick <= top + 2 * pad]
    axes.set_yticks([floor, *ticks], labels=["no run", *(f"{tick:.2f}" for tick in ticks)])


def _memory_provenance(rec: Recommendation) -> str:
    sources = sorted({r.estimate.source or "estimated" for r in rec.ranked})
    return ", ".join(sources)
