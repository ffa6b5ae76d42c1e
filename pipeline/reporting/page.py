"""The report page's building blocks: sections, tables, embedded pictures and the page
around them. Every piece of text goes through html.escape here, whatever its source (a
class name, a gate reason and a model card are all data); pictures are embedded as
data: URIs and the style is inline, so the page is one file that makes no request
(its Content-Security-Policy forbids any)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 70rem; padding: 1rem 2rem 3rem; color: #1f2328; background: #fff; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem;
       margin-top: 2.2rem; } h3 { margin-top: 1.4rem; }
.origin { color: #59636e; margin-top: 0; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
.verdict { display: inline-block; padding: 0.3rem 0.8rem; border-radius: 0.4rem;
           font-weight: bold; font-size: 1.2rem; }
.blessed { background: #dafbe1; color: #116329; }
.refused { background: #ffebe9; color: #a40e26; }
ul.checks { list-style: none; padding-left: 0; } ul.checks li { margin: 0.2rem 0; }
.pass { color: #116329; } .fail { color: #a40e26; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #59636e; font-size: 0.9rem; }
.missing { color: #59636e; font-style: italic; }
pre.card { white-space: pre-wrap; background: #f6f8fa; padding: 1rem; border-radius: 0.4rem; }
"""

# The page loads nothing: no script, font, stylesheet or image from anywhere else.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def number(value: object) -> str:
    """A metric as a person reads it: 4 decimals for fractions, whole numbers as such."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[object]]) -> str:
    """Numbers right-aligned and formatted by `number`; no header row for None."""
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>" \
        if headers else ""
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{esc(number(cell))}</td>' if isinstance(cell, int | float)
            and not isinstance(cell, bool) else f"<td>{esc(number(cell))}</td>"
            for cell in row) + "</tr>"
        for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def key_values(mapping: dict) -> str:
    """A mapping as a table: one row per key, or, when every value is a mapping (the
    cleaning counts per split), one row per key and a column per inner key. Deeper
    values are shown as JSON."""
    def cell(value: object) -> object:
        scalar = isinstance(value, int | float | str) or value is None
        return value if scalar else json.dumps(value, ensure_ascii=False)

    if mapping and all(isinstance(v, dict) for v in mapping.values()):
        columns = list(dict.fromkeys(k for inner in mapping.values() for k in inner))
        return table(("", *columns), [(key, *(cell(inner.get(c)) for c in columns))
                                      for key, inner in mapping.items()])
    return table(None, [(key, cell(value)) for key, value in mapping.items()])


def share(value: object) -> str:
    """A fraction as a percentage (a share of rows or tokens)."""
    return f"{value:.2%}" if isinstance(value, int | float) else number(value)


def image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def missing(what: str) -> str:
    return f'<p class="missing">Not available: {esc(what)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def document(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The page: `sections` are (anchor, title, body HTML), linked from the top."""
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(name)}</a>' for anchor, name, _ in sections)
    body = "\n".join(section(*parts) for parts in sections)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{esc(title)}</h1><p class="origin">{esc(subtitle)}</p><nav>{nav}</nav></header>
{body}
</body>
</html>
"""
