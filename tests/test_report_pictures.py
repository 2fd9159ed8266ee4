"""The HTML report's pictures (report/pictures.py): memory bars and quality intervals, read back from the SVG.

The recommendations are test_report.py's hand-made sample, given quality figures here, so nothing runs the
recommender or the estimator; the numbers are checked against the SVG's coordinates with xml.etree.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET

import pytest
from test_report import memory, sample_recommendation

from peftpick.report import render
from peftpick.report.pictures import (
    leader_tie_group,
    memory_caption,
    memory_svg,
    quality_caption,
    quality_svg,
)
from peftpick.types import GIB, Exclusion, QualityPrediction, Recommendation

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str | None) -> ET.Element:
    assert svg is not None
    return ET.fromstring(svg)  # well-formed XML, or this raises


def with_quality(rec: Recommendation, *figures: tuple[float, float, float] | None, source: str = "benchmark run",
                 flags: dict[int, tuple[str, ...]] | None = None) -> Recommendation:
    ranked = []
    for index, (candidate, figure) in enumerate(zip(rec.ranked, figures)):
        quality = None if figure is None else QualityPrediction(figure[0], figure[1], figure[2], "test", source)
        ranked.append(dataclasses.replace(candidate, quality=quality, flags=(flags or {}).get(index, ())))
    return dataclasses.replace(rec, ranked=tuple(ranked))


@pytest.fixture
def rec() -> Recommendation:
    # rank 1 and rank 3 hold each other's figure inside their intervals; rank 2 is above rank 1's interval
    return with_quality(sample_recommendation(), (1.02, 0.95, 1.09), (1.10, 1.06, 1.14), (1.00, 0.97, 1.03))


def expected_groups(estimate) -> dict[str, int]:
    """The grouping the picture should draw, written out independently of PART_GROUPS."""
    parts = estimate.breakdown
    groups = {
        "weights": parts["weights"],
        "adapter": parts["adapter"],
        "optimizer state": parts["grads"] + parts["optimizer"],
        "activations": parts["activations"],
        "logits": parts["logits/loss"],
        "overhead": parts["overhead"],
        "reserved, not allocated": estimate.peak_reserved_bytes - estimate.peak_allocated_bytes,
    }
    return {group: n for group, n in groups.items() if n > 0}


def bars(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == "bar"]


def segments(bar: ET.Element) -> list[ET.Element]:
    return [r for r in bar.iter(f"{SVG}rect") if r.get("class") == "segment"]


def scale_and_origin(root: ET.Element) -> tuple[float, float]:
    """px per byte and the x of zero, from the axis: its first and last tick labels (GiB)."""
    ticks = [t for t in root.iter(f"{SVG}text") if t.get("class") == "tick"]
    first, last = ticks[0], ticks[-1]
    assert first.get("data-gib") == "0"
    zero = float(first.get("x"))
    return (float(last.get("x")) - zero) / (float(last.get("data-gib")) * GIB), zero


# ----------------------------------------------------------------------------------------------- memory bars


def test_one_bar_per_ranked_candidate_in_rank_order(rec: Recommendation):
    root = parse(memory_svg(rec))
    found = bars(root)
    assert [b.get("data-method") for b in found] == [r.candidate.display_name for r in rec.ranked]
    assert [b.get("data-rank") for b in found] == ["1", "2", "3"]
    row_tops = [float(segments(b)[0].get("y")) for b in found]
    assert row_tops == sorted(row_tops) and len(set(row_tops)) == 3  # one row each, top to bottom


def test_segments_are_the_grouped_breakdown_with_widths_proportional_to_bytes(rec: Recommendation):
    root = parse(memory_svg(rec))
    per_byte, zero = scale_and_origin(root)
    for bar, ranked in zip(bars(root), rec.ranked):
        drawn = segments(bar)
        expected = expected_groups(ranked.estimate)
        assert [s.get("data-group") for s in drawn] == list(expected)
        assert [int(s.get("data-bytes")) for s in drawn] == list(expected.values())
        x = zero
        for segment in drawn:
            assert float(segment.get("x")) == pytest.approx(x, abs=0.01)  # contiguous, from zero
            assert float(segment.get("width")) == pytest.approx(int(segment.get("data-bytes")) * per_byte, abs=0.02)
            x += float(segment.get("width"))
        # the bar ends at peak reserved, the figure that must fit
        assert x - zero == pytest.approx(ranked.estimate.peak_reserved_bytes * per_byte, abs=0.02)
        (total,) = [t for t in bar.iter(f"{SVG}text") if t.get("class") == "total"]
        assert float(total.get("data-gib")) == pytest.approx(ranked.estimate.peak_reserved_bytes / GIB, abs=1e-3)
        assert total.text == f"{ranked.estimate.peak_reserved_bytes / GIB:.2f}"


@pytest.mark.parametrize("vram", [4.0, 8.0, 24.0])
def test_vram_line_sits_at_the_users_vram_on_the_gib_axis(vram: float):
    rec = sample_recommendation(vram_gib=vram)
    root = parse(memory_svg(rec))
    per_byte, zero = scale_and_origin(root)
    (line,) = [l for l in root.iter(f"{SVG}line") if l.get("class") == "vram"]
    assert float(line.get("x1")) == float(line.get("x2")) == pytest.approx(zero + vram * GIB * per_byte, abs=0.01)
    assert any(t.text == f"your VRAM {vram:g} GiB" for t in root.iter(f"{SVG}text"))
    ticks = [t for t in root.iter(f"{SVG}text") if t.get("class") == "tick"]
    assert ticks[0].text == "0" and float(ticks[0].get("x")) == pytest.approx(
        float(segments(bars(root)[0])[0].get("x")), abs=0.01)  # the bars start at zero
    for tick in ticks:  # tick labels are GiB at one scale
        assert float(tick.get("x")) == pytest.approx(zero + float(tick.get("data-gib")) * GIB * per_byte, abs=0.01)
    assert float(ticks[-1].get("data-gib")) >= max(vram, *(r.estimate.peak_reserved_gib for r in rec.ranked))


def test_other_part_names_and_unsplit_peaks_are_drawn(rec: Recommendation):
    image = memory(6.0, 6.5, 1_000_000)
    parts = dict(image.breakdown)
    parts["inputs"] = parts.pop("activations") // 2  # an image model's batch inputs count as activations
    parts["other models"] = 1000 * 2**20  # resident text encoders count as weights
    parts["mystery"] = 10 * 2**20  # a part this version does not know: "other"
    odd = dataclasses.replace(image, breakdown=parts)  # no longer adds up to peak allocated: the rest is "other"
    measured = dataclasses.replace(image, breakdown={"measured peak": image.peak_allocated_bytes})
    ranked = (dataclasses.replace(rec.ranked[0], plan=dataclasses.replace(rec.ranked[0].plan, estimate=odd)),
              dataclasses.replace(rec.ranked[1], plan=dataclasses.replace(rec.ranked[1].plan, estimate=measured)))
    root = parse(memory_svg(dataclasses.replace(rec, ranked=ranked)))
    first, second = ({s.get("data-group"): int(s.get("data-bytes")) for s in segments(b)} for b in bars(root))
    assert first["weights"] == parts["weights"] + parts["other models"]
    assert first["activations"] == parts["inputs"]
    assert first["other"] == image.peak_allocated_bytes - sum(parts.values()) + parts["mystery"]
    assert sum(first.values()) == image.peak_reserved_bytes
    assert second == {"other": image.peak_allocated_bytes,
                      "reserved, not allocated": image.peak_reserved_bytes - image.peak_allocated_bytes}


def test_memory_exclusions_with_a_figure_are_greyed_beyond_the_axis(rec: Recommendation):
    excluded = (*rec.excluded,
                Exclusion("full", "Huge FT", "memory", "Huge FT: needs about 31.5 GiB even with micro-batch 1 and "
                          "gradient checkpointing (estimated), more than 8 GiB; use a larger GPU"),
                Exclusion("boft", "BOFT", "memory", "BOFT: does not fit, no figure"))
    root = parse(memory_svg(dataclasses.replace(rec, excluded=excluded)))
    groups = [g for g in root.iter(f"{SVG}g") if g.get("class") == "excluded"]
    assert [g.get("data-method") for g in groups] == ["Huge FT"]  # the one with a figure; not the serving one
    assert any("needs about 31.5 GiB" in (t.text or "") for t in groups[0].iter(f"{SVG}text"))
    assert any(True for _ in groups[0].iter(f"{SVG}path"))  # an arrow: it goes on beyond the axis
    assert bars(root)[-1].get("data-method") == rec.ranked[-1].candidate.display_name


def test_names_are_escaped(rec: Recommendation):
    odd = dataclasses.replace(rec.ranked[0], candidate=dataclasses.replace(rec.ranked[0].candidate,
                                                                           display_name='<Lo"RA> & co'))
    tricky = dataclasses.replace(rec, ranked=(odd, *rec.ranked[1:]))
    for svg in (memory_svg(tricky), quality_svg(tricky)):
        assert parse(svg).find(f".//{SVG}g[@data-rank='1']").get("data-method") == '<Lo"RA> & co'


# -------------------------------------------------------------------------------------------- quality rows


def test_interval_rows_follow_the_rank_order_at_their_values(rec: Recommendation):
    root = parse(quality_svg(rec))
    rows = [g for g in root.iter(f"{SVG}g") if g.get("class") == "interval"]
    assert [r.get("data-method") for r in rows] == [r.candidate.display_name for r in rec.ranked]
    ticks = [t for t in root.iter(f"{SVG}text") if t.get("class") == "tick"]
    (a, b) = ticks[0], ticks[-1]
    per_unit = (float(b.get("x")) - float(a.get("x"))) / (float(b.get("data-value")) - float(a.get("data-value")))

    def at(value: float) -> float:
        return float(a.get("x")) + (value - float(a.get("data-value"))) * per_unit

    mids = []
    for row, ranked in zip(rows, rec.ranked):
        quality = ranked.quality
        (whisker,) = [l for l in row.iter(f"{SVG}line") if l.get("class") == "whisker"]
        assert float(whisker.get("x1")) == pytest.approx(at(quality.low), abs=0.01)
        assert float(whisker.get("x2")) == pytest.approx(at(quality.high), abs=0.01)
        (point,) = [p for p in row if p.get("class") == "point"]
        assert point.tag == f"{SVG}circle"  # a benchmark run
        assert float(point.get("cx")) == pytest.approx(at(quality.relative), abs=0.01)
        mids.append(float(whisker.get("y1")))
    assert mids == sorted(mids) and len(set(mids)) == len(mids)
    (lora,) = [l for l in root.iter(f"{SVG}line") if l.get("class") == "lora"]
    assert float(lora.get("x1")) == pytest.approx(at(1.0), abs=0.01)
    assert float(ticks[0].get("data-value")) <= 0.95 and float(ticks[-1].get("data-value")) >= 1.14


def test_shaded_rows_are_the_leaders_tie_group(rec: Recommendation):
    from peftpick.recommender import _uncertainty

    names = [r.candidate.display_name for r in rec.ranked]
    assert leader_tie_group(rec) == {names[0], names[2]}  # not contiguous in rank order
    root = parse(quality_svg(rec))
    shaded = [r.get("data-method") for r in root.iter(f"{SVG}rect") if r.get("class") == "tie"]
    assert shaded == [names[0], names[2]]
    # the same group the report's uncertainty note names
    note = _uncertainty(list(rec.ranked))[0]
    assert {name for name in names if name in note} == set(shaded)
    assert quality_caption(rec).startswith(f"Shaded: {names[0]} and {names[2]} ")


def test_no_shading_when_the_leader_stands_apart(rec: Recommendation):
    apart = with_quality(rec, (1.30, 1.25, 1.35), (1.10, 1.06, 1.14), (1.00, 0.97, 1.03))
    assert leader_tie_group(apart) == frozenset()
    assert not [r for r in parse(quality_svg(apart)).iter(f"{SVG}rect") if r.get("class") == "tie"]
    assert "orders it first" in quality_caption(apart)


def test_flagged_leader_is_left_out_of_the_tie_group(rec: Recommendation):
    flagged = with_quality(rec, (1.02, 0.95, 1.09), (1.01, 0.96, 1.06), (1.00, 0.97, 1.03),
                           flags={0: ("the probe loss does not fall",)})
    names = [r.candidate.display_name for r in rec.ranked]
    assert leader_tie_group(flagged) == {names[1], names[2]}


def test_predictions_are_hollow_and_missing_figures_get_a_row(rec: Recommendation):
    mixed = with_quality(rec, (1.02, 0.95, 1.09), None, (1.00, 0.97, 1.03), source="model")
    root = parse(quality_svg(mixed))
    rows = [g for g in root.iter(f"{SVG}g") if g.get("class") == "interval"]
    assert len(rows) == 3
    assert [p.tag for p in rows[0] if p.get("class") == "point"] == [f"{SVG}rect"]
    assert any(t.text == "no quality figure" for t in rows[1].iter(f"{SVG}text"))


# ------------------------------------------------------------------------------------ without quality / in HTML


def test_without_quality_only_the_memory_picture_with_a_sentence_why():
    bare = sample_recommendation()  # no quality figures
    assert quality_svg(bare) is None
    assert leader_tie_group(bare) == frozenset()
    assert len(bars(parse(memory_svg(bare)))) == 3
    page = render(bare, "html")
    assert len(re.findall(r"<svg ", page)) == 1
    assert quality_caption(bare) in page and "No quality picture" in page
    assert memory_caption(bare).split(";")[0] in page


def test_nothing_ranked_draws_nothing(rec: Recommendation):
    empty = dataclasses.replace(rec, ranked=())
    assert memory_svg(empty) is None and quality_svg(empty) is None
    assert "<svg" not in render(empty, "html")


def test_html_carries_both_pictures_before_the_ranked_table(rec: Recommendation):
    page = render(rec, "html")
    svgs = re.findall(r"<svg .*?</svg>", page, flags=re.S)
    assert [parse(svg).get("class") for svg in svgs] == ["picture quality", "picture memory"]
    assert page.index("</svg>") < page.index("<table>")
    assert "<img" not in page and "<script" not in page
    markdown = render(rec, "markdown")
    assert "<svg" not in markdown and "Memory breakdown at the peak" in markdown
