"""Reports of a Recommendation: machine-readable data, terminal text, Markdown, HTML, and a PEFT snippet.

- `to_dict(rec)`: JSON-ready dict with stable keys (schema_version 1; the key table is in `to_dict.__doc__`).
- `render(rec, fmt)`: "text" (plain), "markdown" or "html" (self-contained, with inline SVG pictures:
  quality intervals and memory bars, `report/pictures.py`).
- `print_report(rec, console)`: the same report on a rich console.
- `write_report(rec, path)`: .md / .html file by suffix, written atomically.
- `peft_snippet(ranked)`: copy-paste Python for a ranked candidate.

Content order in every format: verdict, ranked candidates, exclusions, recommendation, assumptions.
"""

from peftpick.report.files import REPORT_SUFFIXES, write_report
from peftpick.report.render import FORMATS, print_report, render
from peftpick.report.schema import SCHEMA_VERSION, estimate_to_dict, json_safe, to_dict
from peftpick.report.snippet import peft_snippet

__all__ = [
    "FORMATS",
    "REPORT_SUFFIXES",
    "SCHEMA_VERSION",
    "estimate_to_dict",
    "json_safe",
    "peft_snippet",
    "print_report",
    "render",
    "to_dict",
    "write_report",
]
