"""A small report writer: one list of blocks rendered to both ``report.md`` and ``index.html``.

The demo (and any study script) adds headings, paragraphs, tables and images in order; ``write``
renders the same content as Markdown and as a self-contained HTML page (images are referenced by
relative path, so the folder can be moved or served as it is).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers with a fixed number of significant digits; NaN and None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


@dataclass
class Report:
    """An ordered list of blocks: ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", path, caption)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[format_value(v) for v in row] for row in rows]))

    def image(self, path: str, caption: str = "") -> None:
        """``path`` relative to the report folder."""
        self.blocks.append(("img", path, caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += [f"{'#' * block[1]} {block[2]}", ""]
            elif kind == "p":
                lines += [block[1], ""]
            elif kind == "code":
                lines += ["```", block[1], "```", ""]
            elif kind == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(headers) + " |")
                lines.append("|" + "---|" * len(headers))
                lines += ["| " + " | ".join(row) + " |" for row in rows]
                lines.append("")
            elif kind == "img":
                lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*" if block[2] else "", ""]
        return "\n".join(lines).rstrip() + "\n"

    def html(self) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
            "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
            "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}figcaption{color:#555}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "code":
                parts.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            elif kind == "img":
                parts.append(f"<figure><img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'>"
                             f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``index.html`` into ``folder``; return both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, page = folder / "report.md", folder / "index.html"
        md.write_text(self.markdown())
        page.write_text(self.html())
        return md, page
