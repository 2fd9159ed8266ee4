"""Render a Recommendation as terminal text (rich), Markdown or a self-contained HTML page."""

from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING, Literal

from peftpick.errors import PeftpickError
from peftpick.report.document import (
    Bullets,
    Cell,
    Code,
    Heading,
    Paragraph,
    ParetoPlot,
    Table,
    build_document,
)
from peftpick.types import Recommendation

if TYPE_CHECKING:
    from rich.console import Console

Format = Literal["text", "markdown", "html"]
FORMATS: tuple[str, ...] = ("text", "markdown", "html")
TEXT_WIDTH = 160  # wide enough that the ranked table keeps one row per candidate readable
SPLIT_BELOW_WIDTH = 150  # narrower terminals get the ranked table in two parts

_RICH_TONES = {"good": "green", "warn": "yellow", "bad": "red", "": ""}


def render(rec: Recommendation, fmt: Format = "markdown") -> str:
    """The report as a string: "text" (plain, no colours), "markdown" or "html"."""
    if fmt == "markdown":
        return to_markdown(rec)
    if fmt == "html":
        return to_html(rec)
    if fmt == "text":
        return to_text(rec)
    raise PeftpickError(f"unknown report format {fmt!r}", f"use one of: {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------------------------ rich


def print_report(rec: Recommendation, console: Console) -> None:
    """Print the report to a rich console (the terminal, or a captured one)."""
    from rich.rule import Rule
    from rich.text import Text

    for block in build_document(rec):
        if isinstance(block, Heading):
            if block.level == 1:
                console.print(Rule(Text(block.text, style="bold"), align="left"))
            else:
                console.print()
                console.print(Text(block.text, style="bold underline" if block.level == 2 else "bold"))
        elif isinstance(block, Paragraph):
            style = {"verdict": "bold", "note": "dim"}.get(block.role, "")
            console.print(Text(block.text, style=style))
        elif isinstance(block, Table):
            for part in _fit_to_width(block, console.width):
                console.print(_rich_table(part))
        elif isinstance(block, Code):
            # soft_wrap keeps every line whole, so the snippet copies and pastes as valid Python.
            console.print(block.code.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        elif isinstance(block, Bullets):
            for item in block.items:
                console.print(Text(f"- {item}"))
        elif isinstance(block, ParetoPlot):
            continue  # pictures: only the HTML report has them


def _fit_to_width(table: Table, width: int) -> list[Table]:
    """The table as is when it fits, else split into parts that do: the figure columns first, in as few parts as
    fit the width, then the sentence columns. Every part keeps the first two columns (rank and method) so rows
    still line up by name."""
    if width >= SPLIT_BELOW_WIDTH or len(table.headers) <= 2:
        return [table]
    keys = [0, 1]

    def natural(index: int) -> int:  # the width a column wants: its longest cell (sentences wrap at 60)
        longest = max([len(row[index].text) for row in table.rows] + [max(map(len, table.headers[index].split()))])
        return min(longest, 60 if index in table.wide else 28) + 3

    budget = width - sum(natural(i) for i in keys)
    groups: list[list[int]] = []
    for kind in (False, True):  # figures, then sentences
        group: list[int] = []
        used = 0
        for index in range(2, len(table.headers)):
            if (index in table.wide) != kind:
                continue
            if group and used + natural(index) > budget:
                groups.append(group)
                group, used = [], 0
            group.append(index)
            used += natural(index)
        if group:
            groups.append(group)
    if len(groups) == 1:
        return [table]

    def part(columns: list[int]) -> Table:
        chosen = [*keys, *columns]
        return Table(
            headers=tuple(table.headers[i] for i in chosen),
            rows=tuple(tuple(row[i] for i in chosen) for row in table.rows),
            right_aligned=frozenset(n for n, i in enumerate(chosen) if i in table.right_aligned),
        )

    return [part(group) for group in groups]


def _rich_table(block: Table):
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    table = RichTable(box=box.SIMPLE_HEAD, show_lines=False, pad_edge=False, header_style="bold")
    for index, header in enumerate(block.headers):
        # fold, not ellipsis: a long run name wraps instead of losing its end
        table.add_column(header, justify="right" if index in block.right_aligned else "left", overflow="fold")
    for row in block.rows:
        table.add_row(*(Text(cell.text, style=_RICH_TONES[cell.tone]) for cell in row))
    return table


def to_text(rec: Recommendation, width: int = TEXT_WIDTH) -> str:
    """The terminal report captured as plain text: no colours, no control codes."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, no_color=True,
                      highlight=False, emoji=False, legacy_windows=False)
    print_report(rec, console)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- markdown


def _md_text(text: str) -> str:
    """Text that Markdown shows as written (no stray HTML)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(cell: Cell) -> str:
    return _md_text(cell.text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    header = "| " + " | ".join(_md_cell(Cell(h)) for h in table.headers) + " |"
    rule = "|" + "|".join("---:" if i in table.right_aligned else "---" for i in range(len(table.headers))) + "|"
    rows = ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in table.rows]
    return [header, rule, *rows]


def to_markdown(rec: Recommendation) -> str:
    lines: list[str] = []
    for block in build_document(rec):
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _md_text(block.text), ""]
        elif isinstance(block, Paragraph):
            text = _md_text(block.text)
            lines += [f"**{text}**" if block.role == "verdict" else f"_{text}_" if block.role == "note" else text, ""]
        elif isinstance(block, Table):
            lines += [*_md_table(block), ""]
        elif isinstance(block, Code):
            lines += [f"```{block.language}", block.code.rstrip("\n"), "```", ""]
        elif isinstance(block, Bullets):
            lines += [*(f"- {_md_text(item)}" for item in block.items), ""]
        elif isinstance(block, ParetoPlot):
            continue  # Markdown stays text (the breakdown table); the HTML report carries the pictures
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------ html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1b1f24;
       background: #fff; line-height: 1.45; }
main { max-width: 1280px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.45rem; border-bottom: 2px solid #d0d7de; padding-bottom: .4rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
h3 { font-size: 1.02rem; margin-top: 1.4rem; }
p.verdict { font-size: 1.05rem; font-weight: 600; background: #f6f8fa; border-left: 4px solid #1f6feb;
            padding: .7rem 1rem; }
p.note { color: #57606a; font-size: .88rem; }
table { border-collapse: collapse; font-size: .86rem; margin: .6rem 0; }
th, td { border: 1px solid #d0d7de; padding: .3rem .55rem; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
div.table { overflow-x: auto; } td.wide { min-width: 16rem; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.good { color: #116329; } td.warn { color: #9a6700; } td.bad { color: #b42318; font-weight: 600; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .8rem 1rem; overflow-x: auto; font-size: .84rem; }
figure { margin: 1.2rem 0; } figure svg { display: block; max-width: 100%; height: auto; }
figure.picture { border: 1px solid #d0d7de; padding: .8rem 1rem .5rem; max-width: 1000px; }
figcaption { color: #57606a; font-size: .85rem; }
"""


def _html_table(table: Table) -> str:
    def classes(index: int, tone: str = "") -> str:
        kind = "num" if index in table.right_aligned else "wide" if index in table.wide else ""
        names = " ".join(n for n in (kind, tone) if n)
        return f' class="{names}"' if names else ""

    head = "".join(f"<th{classes(i)}>{html.escape(h)}</th>" for i, h in enumerate(table.headers))
    body = "".join(
        "<tr>" + "".join(f"<td{classes(i, cell.tone)}>{html.escape(cell.text)}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row in table.rows
    )
    # wider than the page: it scrolls sideways in its own box, so sentence columns keep a readable width
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_pictures(rec: Recommendation) -> str:
    """The quality intervals and the memory bars as inline SVG figures (report/pictures.py); where no candidate
    has a quality figure, a sentence saying so instead of the intervals."""
    from peftpick.report.pictures import memory_caption, memory_svg, quality_caption, quality_svg

    parts = []
    quality = quality_svg(rec)
    if quality is None:
        parts.append(f'<p class="note">{html.escape(quality_caption(rec))}</p>')
    else:
        parts.append(f'<figure class="picture">{quality}<figcaption>{html.escape(quality_caption(rec))}'
                     "</figcaption></figure>")
    memory = memory_svg(rec)
    if memory is not None:
        parts.append(f'<figure class="picture">{memory}<figcaption>{html.escape(memory_caption(rec))}'
                     "</figcaption></figure>")
    return "\n".join(parts)


def to_html(rec: Recommendation) -> str:
    """A self-contained page: inline CSS, the pictures as inline SVG, no external assets or scripts."""
    parts: list[str] = []
    title = ""
    for block in build_document(rec):
        if isinstance(block, Heading):
            title = title or block.text
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            role = f' class="{block.role}"' if block.role else ""
            parts.append(f"<p{role}>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Code):
            parts.append(f'<pre><code class="language-{block.language}">{html.escape(block.code)}</code></pre>')
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, ParetoPlot):
            parts.append(_html_pictures(rec))
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


__all__ = ["FORMATS", "print_report", "render", "to_html", "to_markdown", "to_text"]
