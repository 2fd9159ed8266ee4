"""The HTML report's two pictures, as inline SVG (no scripts, no external assets, no plotting library).

- `memory_svg`: where the memory goes. One horizontal stacked bar per ranked candidate, in rank order: the
  estimate's breakdown parts grouped by `PART_GROUPS`, then the bytes PyTorch's caching allocator reserves beyond
  what tensors occupy, so each bar ends at the peak reserved figure that must fit; a vertical line at the user's
  VRAM. Candidates excluded for memory follow in grey when their reason states the figure they need.
- `quality_svg`: how sure the order is. One row per ranked candidate, in rank order: the expected quality relative
  to plain LoRA with its interval; the rows of `leader_tie_group` (the candidates the evidence cannot order
  against the leader) are shaded.

Every row is one candidate, so no two labels share a line. Elements carry `data-*` attributes (method, group,
bytes) so tests and tools can read the figures back without reverse-engineering coordinates.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from html import escape

from peftpick.types import GIB, RankedCandidate, Recommendation

# ------------------------------------------------------------------------------------------- the mapping

# Breakdown part (as the estimator, the image estimator and the probes name them) -> the group drawn. Parts not
# listed here are drawn as "other".
PART_GROUPS: dict[str, str] = {
    "weights": "weights",
    "quantized weights": "weights",  # a bitsandbytes base
    "fp32 upcasts": "weights",  # float32 copies prepare_model_for_kbit_training makes of norms, embeddings, head
    "dequantization": "weights",  # bitsandbytes' dequantized weight tiles
    "other models": "weights",  # image models: text encoders / VAE resident on the GPU
    "adapter": "adapter",
    "grads": "optimizer state",  # gradients of the trainable parameters, kept until the optimizer step
    "optimizer": "optimizer state",
    "activations": "activations",
    "inputs": "activations",  # image models: latents, noise and text embeddings of the batch
    "grads, activations and temporaries": "activations",  # a probe's measured remainder
    "logits/loss": "logits",
    "overhead": "overhead",
}
RESERVED = "reserved, not allocated"  # the caching allocator's blocks beyond the tensors: the bar ends at reserved
OTHER = "other"

GROUP_ORDER = ("weights", "adapter", "optimizer state", "activations", "logits", "overhead", OTHER, RESERVED)
GROUP_LABELS = {
    "weights": "weights",
    "adapter": "adapter",
    "optimizer state": "grads + optimizer state",
    "activations": "activations",
    "logits": "logits / loss",
    "overhead": "overhead",
    OTHER: "not split",
    RESERVED: "reserved, not allocated",
}
GROUP_COLOURS = {  # Okabe-Ito, weights muted: it is the big part the user cannot change
    "weights": "#9aa9b8",
    "adapter": "#009e73",
    "optimizer state": "#e69f00",
    "activations": "#0072b2",
    "logits": "#cc79a7",
    "overhead": "#6e6e6e",
    OTHER: "#f0e442",
    RESERVED: "url(#reserve)",
}

_VRAM = "#c62828"
_INK = "#1b1f24"
_MUTED = "#57606a"
_GRID = "#d8dee4"
_TIE = "#ddf4ff"
_POINT = "#1f6feb"
_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'

_WIDTH = 1000
_ROW = 24
_BAR = 15


def group_of(part: str) -> str:
    return PART_GROUPS.get(part, OTHER)


def grouped_bytes(ranked: RankedCandidate) -> dict[str, int]:
    """The candidate's peak in bytes by group, in `GROUP_ORDER`, zero groups left out; the groups add up to the
    peak reserved figure (or to the allocated peak where reserved is below it)."""
    estimate = ranked.estimate
    sums = dict.fromkeys(GROUP_ORDER, 0)
    for part, n_bytes in estimate.breakdown.items():
        sums[group_of(part)] += max(0, int(n_bytes))
    allocated = sum(sums.values())
    if estimate.peak_allocated_bytes > allocated:  # parts that do not add up: show the rest, unsplit
        sums[OTHER] += estimate.peak_allocated_bytes - allocated
        allocated = estimate.peak_allocated_bytes
    sums[RESERVED] = max(0, estimate.peak_reserved_bytes - allocated)
    return {group: n for group, n in sums.items() if n > 0}


# ------------------------------------------------------------------------------------------- the tie group


def leader_tie_group(rec: Recommendation) -> frozenset[str]:
    """Display names of the candidates the quality figures cannot order against the leader, the leader included;
    empty when the leader stands apart. The recommender's own rule (recommender.uncertainty.overlapping over the top
    TOP_COMPARED candidates with a figure and no flag), so the shading matches the report's uncertainty note."""
    from peftpick.recommender import TOP_COMPARED
    from peftpick.recommender.uncertainty import overlapping

    top = [r for r in rec.ranked[:TOP_COMPARED] if r.quality is not None and not r.flags]
    if not top:
        return frozenset()
    leader = top[0].candidate.display_name
    for group in overlapping({r.candidate.display_name: r.quality for r in top}):
        if leader in group:
            return frozenset(group)
    return frozenset()


def has_quality(rec: Recommendation) -> bool:
    return any(r.quality is not None for r in rec.ranked)


# ------------------------------------------------------------------------------------------- helpers


def _f(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def _text(x: float, y: float, text: str, *, size: float = 12, anchor: str = "start", fill: str = _INK,
          weight: str = "normal", extra: str = "") -> str:
    bold = f' font-weight="{weight}"' if weight != "normal" else ""
    return (f'<text x="{_f(x)}" y="{_f(y)}" font-size="{size:g}" text-anchor="{anchor}" fill="{fill}"{bold}'
            f'{extra}>{escape(text)}</text>')


def _text_width(text: str, size: float = 12) -> float:
    """A generous width estimate for a sans-serif text (no font metrics here)."""
    return len(text) * size * 0.58


def nice_step(span: float, target_ticks: int = 8) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving about target_ticks ticks over span."""
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * power >= raw:
            return multiple * power
    return 10 * power


def _legend(items: list[tuple[str, str]], x: float, y: float, width: float) -> tuple[list[str], float]:
    """Swatch + label items laid out left to right, wrapping at width; returns the elements and the y below."""
    out, cx = [], x
    for swatch, label in items:
        item_width = 18 + len(label) * 11.5 * 0.52 + 18
        if cx + item_width > x + width and cx > x:
            cx, y = x, y + 18
        out.append(swatch.format(x=_f(cx), y=_f(y - 10), cx=_f(cx + 6), cy=_f(y - 5), b=_f(y + 1)))
        out.append(_text(cx + 18, y, label, size=11.5, fill=_MUTED))
        cx += item_width
    return out, y + 18


def _svg(width: float, height: float, title: str, body: list[str], kind: str) -> str:
    # the hatch patterns, once per page: only the memory picture uses them (ids are page-wide in HTML)
    defs = "" if kind != "memory" else ('<defs><pattern id="reserve" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f3f4f6"/>'
            '<line x1="0" y1="0" x2="0" y2="6" stroke="#b8c0c8" stroke-width="2"/></pattern>'
            '<pattern id="excluded" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(-45)"><rect width="6" height="6" fill="#eceff2"/>'
            '<line x1="0" y1="0" x2="0" y2="6" stroke="#c8ced4" stroke-width="2"/></pattern></defs>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="picture {kind}" viewBox="0 0 {_f(width)} {_f(height)}" '
            f'width="{_f(width)}" height="{_f(height)}" role="img" {_FONT}>'
            f"<title>{escape(title)}</title>{defs}" + "".join(body) + "</svg>")


def _label_column(names: list[str]) -> float:
    return min(max(max((_text_width(n) for n in names), default=60) + 44, 150), 300)


def _row_name(position: int, ranked: RankedCandidate) -> str:
    return f"{position}. {ranked.candidate.display_name}"


# ------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class ExcludedBar:
    name: str
    need_gib: float
    more_than: bool  # "needs more than" (a lower bound) rather than "needs about"


_NEED = re.compile(r"needs (about|more than) ([0-9]+(?:\.[0-9]+)?) GiB")


def excluded_for_memory(rec: Recommendation) -> list[ExcludedBar]:
    """Candidates excluded for memory whose reason states the GiB they need (the recommender writes "needs about
    X GiB" / "needs more than X GiB"); the others have no figure to draw."""
    bars = []
    for exclusion in rec.excluded:
        if exclusion.constraint != "memory":
            continue
        match = _NEED.search(exclusion.reason)
        if match:
            bars.append(ExcludedBar(exclusion.display_name, float(match.group(2)), match.group(1) == "more than"))
    return bars


def memory_svg(rec: Recommendation) -> str | None:
    """The stacked memory bars, or None when nothing is ranked."""
    if not rec.ranked:
        return None
    vram = float(rec.request.vram_gib)
    excluded = excluded_for_memory(rec)
    names = [_row_name(i, r) for i, r in enumerate(rec.ranked, 1)] + [e.name for e in excluded]
    left = _label_column(names)
    right_column = 250
    x0, x1 = left, _WIDTH - right_column
    peaks = [max(r.estimate.peak_reserved_bytes, r.estimate.peak_allocated_bytes) / GIB for r in rec.ranked]
    step = nice_step(max(vram, *peaks) * 1.08)
    axis_max = step * math.ceil(max(vram, *peaks) * 1.08 / step)
    scale = (x1 - x0) / axis_max  # px per GiB

    body: list[str] = []
    source = ", ".join(sorted({r.estimate.source or "estimated" for r in rec.ranked}))
    body.append(_text(0, 18, f"Where the memory goes: peak GPU memory of each candidate at its plan ({source})",
                      size=14, weight="600"))
    groups_present = [g for g in GROUP_ORDER if any(g in grouped_bytes(r) for r in rec.ranked)]
    items = [(f'<rect x="{{x}}" y="{{y}}" width="12" height="10" fill="{GROUP_COLOURS[g]}" stroke="#8c959f" '
              f'stroke-width="0.5"/>', GROUP_LABELS[g]) for g in groups_present]
    items.append((f'<line x1="{{cx}}" y1="{{y}}" x2="{{cx}}" y2="{{b}}" stroke="{_VRAM}" stroke-width="2" '
                  'stroke-dasharray="4 2"/>', f"your VRAM: {vram:g} GiB"))
    if excluded:
        items.append(('<rect x="{x}" y="{y}" width="12" height="10" fill="url(#excluded)" stroke="#8c959f" '
                      'stroke-width="0.5"/>', "excluded for memory"))
    legend, y = _legend(items, 0, 40, _WIDTH)
    header_y = y + 4
    body += legend
    body.append(_text(x0 - 8, header_y, "rank, method", size=11, anchor="end", fill=_MUTED))
    body.append(_text(x1 + 10, header_y, "peak, GiB", size=11, fill=_MUTED))
    body.append(_text(x1 + 72, header_y, "adapter + grads + optimizer", size=11, fill=_MUTED))
    top = header_y + 8
    rows = len(rec.ranked) + len(excluded)
    bottom = top + rows * _ROW + 4

    # beyond the VRAM: shaded; grid and ticks
    vram_x = x0 + vram * scale
    if vram < axis_max:
        body.append(f'<rect class="over-vram" x="{_f(vram_x)}" y="{_f(top)}" width="{_f(x1 - vram_x)}" '
                    f'height="{_f(bottom - top)}" fill="{_VRAM}" fill-opacity="0.05"/>')
    ticks = []
    value = 0.0
    while value <= axis_max + 1e-9:
        ticks.append(value)
        value = round(value + step, 10)
    for tick in ticks:
        x = x0 + tick * scale
        body.append(f'<line x1="{_f(x)}" y1="{_f(top)}" x2="{_f(x)}" y2="{_f(bottom)}" stroke="{_GRID}" '
                    'stroke-width="1"/>')
        body.append(_text(x, bottom + 15, f"{tick:g}", size=11, anchor="middle", fill=_MUTED,
                          extra=f' class="tick" data-gib="{tick:g}"'))
    body.append(_text((x0 + x1) / 2, bottom + 32, "GiB (2^30 bytes); the bar ends at peak reserved, the figure "
                      "that must fit", size=11.5, anchor="middle", fill=_MUTED))

    for index, ranked in enumerate(rec.ranked):
        row_y = top + index * _ROW
        bar_y = row_y + (_ROW - _BAR) / 2
        name = ranked.candidate.display_name
        body.append(f'<g class="bar" data-rank="{index + 1}" data-method="{escape(name)}">')
        if index % 2:
            body.append(f'<rect x="0" y="{_f(row_y)}" width="{_WIDTH}" height="{_ROW}" fill="#f6f8fa" '
                        'fill-opacity="0.6"/>')
        body.append(_text(x0 - 8, row_y + _ROW / 2 + 4, _row_name(index + 1, ranked), anchor="end",
                          weight="600" if index == 0 else "normal"))
        x = x0
        parts = grouped_bytes(ranked)
        for group, n_bytes in parts.items():
            width = n_bytes / GIB * scale
            body.append(f'<rect class="segment" data-group="{escape(group)}" data-bytes="{n_bytes}" x="{x:.3f}" '
                        f'y="{_f(bar_y)}" width="{width:.3f}" height="{_BAR}" fill="{GROUP_COLOURS[group]}">'
                        f"<title>{escape(name)}: {escape(GROUP_LABELS[group])} {n_bytes / GIB:.3f} GiB</title></rect>")
            x += width
        trainable = sum(parts.get(g, 0) for g in ("adapter", "optimizer state"))
        total = ranked.estimate.peak_reserved_bytes / GIB
        body.append(_text(x1 + 10, row_y + _ROW / 2 + 4, f"{total:.2f}", weight="600",
                          extra=f' class="total" data-gib="{total:.4f}"'))
        body.append(_text(x1 + 72, row_y + _ROW / 2 + 4, _mib(trainable), size=11,
                          fill=_MUTED))
        body.append("</g>")

    for offset, bar in enumerate(excluded):
        row_y = top + (len(rec.ranked) + offset) * _ROW
        bar_y = row_y + (_ROW - _BAR) / 2
        clipped = bar.need_gib > axis_max
        width = min(bar.need_gib, axis_max) * scale
        body.append(f'<g class="excluded" data-method="{escape(bar.name)}">')
        body.append(_text(x0 - 8, row_y + _ROW / 2 + 4, bar.name, anchor="end", fill="#8c959f"))
        body.append(f'<rect x="{_f(x0)}" y="{_f(bar_y)}" width="{_f(width)}" height="{_BAR}" fill="url(#excluded)" '
                    f'stroke="#b8c0c8" stroke-width="0.6"/>')
        if clipped:  # an arrow head: the bar goes on beyond the axis
            tip = x0 + width
            body.append(f'<path d="M{_f(tip - 7)},{_f(bar_y - 2)} L{_f(tip)},{_f(bar_y + _BAR / 2)} '
                        f'L{_f(tip - 7)},{_f(bar_y + _BAR + 2)} Z" fill="#8c959f"/>')
        need = f"{'more than' if bar.more_than else 'about'} {bar.need_gib:.1f}"
        body.append(_text(x1 + 10, row_y + _ROW / 2 + 4, f"excluded: needs {need} GiB", fill="#8c959f"))
        body.append("</g>")

    body.append(f'<line class="vram" data-gib="{vram:g}" x1="{vram_x:.3f}" y1="{_f(top - 4)}" x2="{vram_x:.3f}" '
                f'y2="{_f(bottom)}" stroke="{_VRAM}" stroke-width="2" stroke-dasharray="6 3"/>')
    label = f"your VRAM {vram:g} GiB"
    # left of the line, over the empty header row, unless that would run into the method names
    anchor = "start" if vram_x - _text_width(label, 11.5) - 4 < x0 else "end"
    body.append(_text(vram_x + (-4 if anchor == "end" else 4), top - 6, label, size=11.5, anchor=anchor, fill=_VRAM,
                      weight="600"))
    height = bottom + 42
    title = (f"Stacked bars of peak GPU memory by part for {len(rec.ranked)} ranked candidates in rank order, "
             f"with a line at {vram:g} GiB of VRAM")
    return _svg(_WIDTH, height, title, body, "memory")


def _mib(n_bytes: int) -> str:
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.2f} GiB"
    return f"{n_bytes / 2**20:.0f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------- quality


def quality_svg(rec: Recommendation) -> str | None:
    """The interval rows, or None when no ranked candidate has a quality figure."""
    if not rec.ranked or not has_quality(rec):
        return None
    tied = leader_tie_group(rec)
    names = [_row_name(i, r) for i, r in enumerate(rec.ranked, 1)]
    left = _label_column(names)
    right_column = 250
    x0, x1 = left, _WIDTH - right_column
    figures = [r.quality for r in rec.ranked if r.quality is not None]
    low = min([q.low for q in figures] + [1.0])
    high = max([q.high for q in figures] + [1.0])
    step = nice_step(high - low, 8)
    axis_low = step * math.floor((low - 0.25 * step) / step)
    axis_high = step * math.ceil((high + 0.25 * step) / step)
    scale = (x1 - x0) / (axis_high - axis_low)

    def at(value: float) -> float:
        return x0 + (value - axis_low) * scale

    level = max(q.level for q in figures)
    body: list[str] = []
    body.append(_text(0, 18, f"How sure the order is: expected quality relative to plain LoRA, {level:.0%} interval, "
                      "in rank order", size=14, weight="600"))
    items = [(f'<circle cx="{{cx}}" cy="{{cy}}" r="4.5" fill="{_POINT}"/>', "benchmark run"),
             (f'<rect x="{{x}}" y="{{y}}" width="9" height="9" fill="#fff" stroke="{_POINT}" stroke-width="1.6"/>',
              "quality model's prediction"),
             ('<line x1="{cx}" y1="{y}" x2="{cx}" y2="{b}" stroke="#555" stroke-width="1.5" '
              'stroke-dasharray="5 2 1 2"/>', "plain LoRA = 1.0")]
    if tied:
        items.append((f'<rect x="{{x}}" y="{{y}}" width="12" height="10" fill="{_TIE}" stroke="#54aeff" '
                      'stroke-width="0.8"/>', "cannot be ordered against the leader (intervals overlap)"))
    legend, y = _legend(items, 0, 40, _WIDTH)
    body += legend
    header_y = y + 4
    body.append(_text(x0 - 8, header_y, "rank, method", size=11, anchor="end", fill=_MUTED))
    body.append(_text(x1 + 10, header_y, "x LoRA [interval], source", size=11, fill=_MUTED))
    top = header_y + 8
    bottom = top + len(rec.ranked) * _ROW + 4

    for index, ranked in enumerate(rec.ranked):  # shading first, under everything else
        if ranked.candidate.display_name in tied:
            body.append(f'<rect class="tie" data-method="{escape(ranked.candidate.display_name)}" x="0" '
                        f'y="{_f(top + index * _ROW)}" width="{_WIDTH}" height="{_ROW}" fill="{_TIE}"/>')
    value = axis_low
    while value <= axis_high + 1e-9:
        x = at(value)
        body.append(f'<line x1="{_f(x)}" y1="{_f(top)}" x2="{_f(x)}" y2="{_f(bottom)}" stroke="{_GRID}" '
                    'stroke-width="1"/>')
        body.append(_text(x, bottom + 15, f"{value:.2f}", size=11, anchor="middle", fill=_MUTED,
                          extra=f' class="tick" data-value="{value:.4f}"'))
        value = round(value + step, 10)
    body.append(f'<line class="lora" x1="{at(1.0):.3f}" y1="{_f(top)}" x2="{at(1.0):.3f}" y2="{_f(bottom)}" '
                'stroke="#555" stroke-width="1.5" stroke-dasharray="5 2 1 2"/>')
    body.append(_text((x0 + x1) / 2, bottom + 32, "expected benchmark score / plain LoRA's (higher is better)",
                      size=11.5, anchor="middle", fill=_MUTED))

    for index, ranked in enumerate(rec.ranked):
        row_y = top + index * _ROW
        mid = row_y + _ROW / 2
        name = ranked.candidate.display_name
        quality = ranked.quality
        body.append(f'<g class="interval" data-rank="{index + 1}" data-method="{escape(name)}"'
                    + (f' data-relative="{quality.relative:.6f}" data-low="{quality.low:.6f}" '
                       f'data-high="{quality.high:.6f}"' if quality is not None else "") + ">")
        colour = "#b42318" if ranked.flags else _INK
        body.append(_text(x0 - 8, mid + 4, _row_name(index + 1, ranked), anchor="end", fill=colour,
                          weight="600" if index == 0 else "normal"))
        if quality is None:
            body.append(_text(x0 + 6, mid + 4, "no quality figure", size=11, fill=_MUTED))
            body.append(_text(x1 + 10, mid + 4, "-", fill=_MUTED))
            body.append("</g>")
            continue
        lo, hi, point = at(quality.low), at(quality.high), at(quality.relative)
        body.append(f'<line class="whisker" x1="{lo:.3f}" y1="{_f(mid)}" x2="{hi:.3f}" y2="{_f(mid)}" '
                    f'stroke="{_POINT}" stroke-width="2"/>')
        for end in (lo, hi):
            body.append(f'<line x1="{end:.3f}" y1="{_f(mid - 5)}" x2="{end:.3f}" y2="{_f(mid + 5)}" '
                        f'stroke="{_POINT}" stroke-width="1.5"/>')
        if quality.source == "benchmark run":
            body.append(f'<circle class="point" cx="{point:.3f}" cy="{_f(mid)}" r="5" fill="{_POINT}"/>')
        else:
            body.append(f'<rect class="point" x="{point - 4.5:.3f}" y="{_f(mid - 4.5)}" width="9" height="9" '
                        f'fill="#fff" stroke="{_POINT}" stroke-width="1.8"/>')
        source = "run" if quality.source == "benchmark run" else ("model+probe" if quality.used_probe else "model")
        flag = "; flagged: " + ranked.flags[0] if ranked.flags else ""
        body.append(_text(x1 + 10, mid + 4, f"{quality.relative:.2f} [{quality.low:.2f}-{quality.high:.2f}] {source}",
                          fill=colour))
        if flag:
            body.append(f"<title>{escape(flag[2:])}</title>")
        body.append("</g>")
    height = bottom + 42
    title = (f"Expected quality relative to plain LoRA with intervals for {len(rec.ranked)} ranked candidates in "
             "rank order" + (f"; shaded: {', '.join(sorted(tied))} cannot be ordered" if tied else ""))
    return _svg(_WIDTH, height, title, body, "quality")


def quality_caption(rec: Recommendation) -> str:
    """One sentence under the quality picture: what the shading means here, or why there is no picture."""
    if not has_quality(rec):
        return ("No quality picture: no ranked candidate has a quality figure (no benchmark run and no quality-model "
                "prediction for this kind of model), so the order rests on memory, speed and serving.")
    tied = leader_tie_group(rec)
    ordered = [r.candidate.display_name for r in rec.ranked if r.candidate.display_name in tied]
    if len(ordered) > 1:
        return (f"Shaded: {', '.join(ordered[:-1])} and {ordered[-1]} lie within each other's intervals, so the "
                "evidence cannot order them; the rank among them comes from memory, speed and adapter size.")
    return "The leader's interval overlaps no other top candidate's: the evidence orders it first."


def memory_caption(rec: Recommendation) -> str:
    vram = float(rec.request.vram_gib)
    over = [r.candidate.display_name for r in rec.ranked if r.estimate.peak_reserved_bytes / GIB > vram]
    text = (f"Bars: peak memory by part, in rank order; a bar past the red line at {vram:g} GiB cannot fit (a fit "
            "also leaves room for the CUDA context: the Fit column says how much is spare). "
            "Parts: weights (frozen base, with quantization and resident encoders), adapter, gradients and optimizer "
            "state, activations, logits and loss, overhead; the hatched end is memory the allocator reserves "
            "beyond the tensors. Figures by part are in the table below.")
    if over:
        text += f" Over the line: {', '.join(over)}."
    if excluded_for_memory(rec):
        text += " Grey: excluded for memory, drawn to the figure their exclusion states (an arrow: beyond the axis)."
    return text


__all__ = [
    "GROUP_ORDER", "PART_GROUPS", "excluded_for_memory", "grouped_bytes", "has_quality", "leader_tie_group",
    "memory_caption", "memory_svg", "quality_caption", "quality_svg",
]
