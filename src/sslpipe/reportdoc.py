"""The report's document model: HTML and Markdown built side by side from the same calls, so both
always carry the same tables, figures and links.

Figures are written once as PNG files under `figures/` beside report.md, which links them
relatively (so the folder renders on GitHub, in an editor or on MLflow's artifact page); the
HTML carries the same bytes as base64 data URIs, so report.html stays one self-contained file
that can be mailed or attached to an MLflow run. Every file goes through an atomic write.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import atomic_path

CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}tr.baseline td{color:#666;font-style:italic}img{max-width:100%}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.9em;color:#444}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:.5em}.grid figure{margin:0}
nav.toc{background:#f6f8fa;padding:.4em 1em;display:inline-block}nav.toc ul{margin:.3em 0;padding-left:1.2em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto}.warn{color:#a40000;font-weight:bold}
td.num{text-align:right;font-variant-numeric:tabular-nums}"""


@dataclass(frozen=True)
class Link:
    """A table cell or text that links somewhere (an MLflow run page, a file)."""
    text: str
    url: str | None

    def __str__(self) -> str:
        return self.text


def esc(v: Any) -> str:
    return html.escape("—" if v is None else str(v))


def num(v: Any, fmt: str) -> str:
    return "—" if v is None else format(float(v), fmt)


def anchor(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.lower()).strip().replace(" ", "-")


def _html_cell(v: Any) -> str:
    if isinstance(v, Link):
        return f'<a href="{esc(v.url)}">{esc(v.text)}</a>' if v.url else esc(v.text)
    return esc(v)


def _md_cell(v: Any) -> str:  # pipes and newlines would break the Markdown table grid
    text = ("—" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")
    return f"[{text}]({v.url})" if isinstance(v, Link) and v.url else text


def html_table(header: list[str], body: list[list[Any]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    trs = []
    for i, cells in enumerate(body):
        cls = f' class="{esc(row_classes[i])}"' if row_classes else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{_html_cell(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def md_table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in body]
    return "\n".join(lines)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    # Pinned to UTF-8: the report contains "±" whatever the job's locale.
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class Doc:
    """Builds the HTML and Markdown side by side; figures land in `out_dir/figures/`."""

    def __init__(self, out_dir: Path, figures: str = "figures") -> None:
        self.html: list[str] = []
        self.md: list[str] = []
        self.toc: list[tuple[str, str]] = []  # (text, anchor) of each level-2 heading
        self.out_dir, self.figures = Path(out_dir), figures
        self.files: dict[str, bytes] = {}  # figures/{name}.png -> bytes, written by write()
        self._grid: list[tuple[str, str]] | None = None

    def heading(self, text: str, level: int = 2) -> None:
        a = anchor(text)
        if level == 2:
            self.toc.append((text, a))
        self.html.append(f'<h{level} id="{a}">{esc(text)}</h{level}>')
        self.md.append("#" * level + " " + text)

    def para(self, text: str, cls: str = "", link: Link | None = None) -> None:
        tail_h = f' {_html_cell(link)}' if link else ""
        tail_m = f" {_md_cell(link)}" if link else ""
        self.html.append(f'<p class="{cls}">{esc(text)}{tail_h}</p>' if cls else f"<p>{esc(text)}{tail_h}</p>")
        self.md.append(f"**{text}**{tail_m}" if cls else text + tail_m)

    def bullets(self, lines: list[str]) -> None:
        self.html.append("<ul>" + "".join(f"<li>{esc(t)}</li>" for t in lines) + "</ul>")
        self.md.append("\n".join(f"- {t}" for t in lines))

    def table(self, header: list[str], body: list[list[Any]], row_classes: list[str] | None = None) -> None:
        self.html.append(html_table(header, body, row_classes))
        self.md.append(md_table(header, body))

    def code(self, summary: str, text: str, lang: str) -> None:
        self.html.append(f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>")
        self.md.append(f"{summary}:\n\n```{lang}\n{text.rstrip()}\n```")

    def figure(self, name: str, png: bytes, caption: str, width: int | None = None) -> None:
        """A PNG written to figures/{name}.png: linked from report.md, inlined in report.html."""
        rel = f"{self.figures}/{name}.png"
        self.files[rel] = png
        style = f' style="width:{width}px"' if width else ""
        frag = f'<figure><img src="{png_uri(png)}" alt="{esc(caption)}"{style}><figcaption>{esc(caption)}</figcaption></figure>'
        if self._grid is not None:
            self._grid.append((frag, f"![{caption}]({rel})"))
        else:
            self.html.append(frag)
            self.md.append(f"![{caption}]({rel})\n\n*{caption}*")

    def begin_grid(self) -> None:
        """Figures until end_grid() are laid out side by side (a CSS grid; in Markdown one line)."""
        self._grid = []

    def end_grid(self) -> None:
        items, self._grid = self._grid or [], None
        if items:
            self.html.append('<div class="grid">' + "".join(h for h, _ in items) + "</div>")
            self.md.append(" ".join(m for _, m in items))

    def write(self, title: str, html_name: str = "report.html", md_name: str = "report.md") -> None:
        """Write the figures, then the HTML and the Markdown (each atomically), with a table of
        contents after the first block (the title). Nothing is written before this call, so a
        report whose inputs are incomplete leaves no partial output."""
        nav_h = ('<nav class="toc"><strong>Contents</strong><ul>'
                 + "".join(f'<li><a href="#{a}">{esc(t)}</a></li>' for t, a in self.toc) + "</ul></nav>")
        nav_m = "**Contents**\n\n" + "\n".join(f"- [{t}](#{a})" for t, a in self.toc)
        body_h = [*self.html[:1], nav_h, *self.html[1:]] if self.toc else self.html
        body_m = [*self.md[:1], nav_m, *self.md[1:]] if self.toc else self.md
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f"<title>{esc(title)}</title><style>{CSS}</style></head>"
                f"<body>\n" + "\n".join(body_h) + "\n</body></html>\n")
        for old in (self.out_dir / self.figures).glob("*.png"):  # a previous run's, no longer shown
            if f"{self.figures}/{old.name}" not in self.files:
                old.unlink()
        for rel, png in self.files.items():
            write_bytes(self.out_dir / rel, png)
        write_text(self.out_dir / html_name, page)
        write_text(self.out_dir / md_name, "\n\n".join(body_m) + "\n")
