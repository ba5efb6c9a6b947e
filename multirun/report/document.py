"""A tiny document model rendered twice: self-contained HTML and Markdown.

Sections hold paragraphs, tables and figures. Both renderers walk the same
blocks, so every figure appears in both documents: the HTML embeds it as a
base64 PNG data URI, the Markdown links the PNG file written next to it.

Example:
    >>> doc = Document("t", [Section("s", "A", [Paragraph("hello"), Table(["a"], [["1"]])])])
    >>> "<td>1</td>" in render_html(doc, {})
    True
    >>> "| 1 |" in render_markdown(doc, {})
    True
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Literal

#: A table cell: its text, or (text, CSS class) to style it in HTML.
Cell = str | tuple[str, str]


@dataclass
class Paragraph:
    """Plain text (escaped by each renderer). ``kind='note'`` for "no data yet" and the like."""

    text: str
    kind: Literal["text", "note", "warning"] = "text"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    numeric: tuple[int, ...] = ()  # column indices right-aligned
    caption: str | None = None


@dataclass
class Figure:
    """A plot: ``key`` names its PNG file; the PNG bytes are filled in by the caller."""

    key: str
    png: bytes
    caption: str
    alt: str = ""


Block = Paragraph | Table | Figure


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    sections: list[Section]
    subtitle: str = ""


CSS = """
:root { --fg: #1f2430; --muted: #5b6472; --line: #d9dee7; --zebra: #f4f6fa; --accent: #2f5d9e; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 18px; word-break: break-all; }
nav ul { margin: 0; padding-left: 0; list-style: none; columns: 2; }
nav a { color: var(--accent); text-decoration: none; }
p.note { color: var(--muted); font-style: italic; }
p.warning { background: #fff4e0; border-left: 4px solid #e39b2c; padding: 8px 12px; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 13.5px; width: auto; max-width: 100%; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #e9edf4; font-weight: 600; }
tbody tr:nth-child(even) { background: var(--zebra); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.sig { color: #17643a; font-weight: 600; }
td.nonsig { color: var(--muted); }
td.total { font-weight: 600; }
td.code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
caption { caption-side: bottom; color: var(--muted); font-size: 12.5px; text-align: left; padding-top: 4px; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
/* Wide tables scroll inside their own box, never the page; the key columns come first
   (the verdict and p-values right after the names), and the first column stays in view. */
.table-wrap { overflow-x: auto; max-width: 100%; }
.table-wrap td { overflow-wrap: anywhere; }
.table-wrap th:first-child, .table-wrap td:first-child { position: sticky; left: 0; background: #fff; z-index: 1; }
.table-wrap thead th:first-child { background: #e9edf4; }
.table-wrap tbody tr:nth-child(even) td:first-child { background: var(--zebra); }
"""


def render_html(doc: Document, plot_names: dict[str, str]) -> str:
    """Self-contained HTML: inline CSS, figures as base64 data URIs, no scripts.

    ``plot_names`` maps a figure key to its file name (shown in the caption so a
    reader can find the PNG on disk).
    """
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(doc.title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{esc(doc.title)}</h1>",
    ]
    if doc.subtitle:
        out.append(f'<p class="subtitle">{esc(doc.subtitle)}</p>')
    out.append("<nav><ul>")
    out += [f'<li><a href="#{esc(s.anchor)}">{esc(s.title)}</a></li>' for s in doc.sections]
    out.append("</ul></nav>")
    figure_number = 0
    for section in doc.sections:
        out.append(f'<section id="{esc(section.anchor)}">')
        out.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                cls = f' class="{block.kind}"' if block.kind != "text" else ""
                out.append(f"<p{cls}>{esc(block.text)}</p>")
            elif isinstance(block, Table):
                out.append(_html_table(block))
            else:
                figure_number += 1
                data = base64.b64encode(block.png).decode("ascii")
                name = plot_names.get(block.key, "")
                out.append("<figure>")
                out.append(f'<img src="data:image/png;base64,{data}" alt="{esc(block.alt or block.caption)}">')
                out.append(
                    f"<figcaption>Figure {figure_number}. {esc(block.caption)}"
                    + (f" <code>{esc(name)}</code>" if name else "")
                    + "</figcaption>"
                )
                out.append("</figure>")
        out.append("</section>")
    out += ["</main>", "</body>", "</html>", ""]
    return "\n".join(out)


def _html_table(table: Table) -> str:
    esc = html.escape
    numeric = set(table.numeric)
    head = "".join(
        f'<th class="num">{esc(c)}</th>' if i in numeric else f"<th>{esc(c)}</th>" for i, c in enumerate(table.columns)
    )
    body = []
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            text, cls = (cell, "") if isinstance(cell, str) else cell
            classes = " ".join(c for c in ("num" if i in numeric else "", cls) if c)
            attr = f' class="{classes}"' if classes else ""
            cells.append(f"<td{attr}>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{esc(table.caption)}</caption>" if table.caption else ""
    return (
        f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md_escape(text: str, *, line_start: bool = True) -> str:
    """Escape what Markdown would otherwise read as markup (names often hold ``_``).

    ``line_start``: the text opens a line, where ``1.``, ``#``, ``-`` and ``+`` start
    blocks (not so inside a table cell, where ``-0.5`` stays as it is).
    """
    text = _MD_SPECIAL.sub(r"\\\1", text).replace("\n", " ")
    if not line_start:
        return text
    text = re.sub(r"^(\d+)([.)])", r"\1\\\2", text)  # "1. Title" would start an ordered list
    return "\\" + text if text.startswith(("#", "-", "+")) else text


def render_markdown(doc: Document, plot_names: dict[str, str]) -> str:
    """Markdown with figures linked as ``plots/NN-name.png`` (relative to the document)."""
    out = [f"# {md_escape(doc.title)}", ""]
    if doc.subtitle:
        out += [md_escape(doc.subtitle), ""]
    out += [f"- {md_escape(s.title)}" for s in doc.sections]
    out.append("")
    figure_number = 0
    for section in doc.sections:
        out += [f"## {md_escape(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                text = md_escape(block.text)
                out += [
                    f"*{text}*" if block.kind == "note" else f"> **{text}**" if block.kind == "warning" else text,
                    "",
                ]
            elif isinstance(block, Table):
                out += _md_table(block)
            else:
                figure_number += 1
                name = plot_names[block.key]
                out += [
                    f"![{md_escape(block.alt or block.caption)}](plots/{name})",
                    "",
                    f"*Figure {figure_number}. {md_escape(block.caption)}*",
                    "",
                ]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_table(table: Table) -> list[str]:
    numeric = set(table.numeric)
    lines = [
        "| " + " | ".join(md_escape(c, line_start=False) for c in table.columns) + " |",
        "|" + "|".join("---:" if i in numeric else "---" for i in range(len(table.columns))) + "|",
    ]
    for row in table.rows:
        cells = (md_escape(c if isinstance(c, str) else c[0], line_start=False) or " " for c in row)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if table.caption:
        lines += [f"*{md_escape(table.caption)}*", ""]
    return lines
