"""A tiny document model rendered to both Markdown and self-contained HTML (images inlined), no dependencies."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f5f5f5; padding: 0 3px; border-radius: 3px; }
.note { color: #666; font-size: 0.9em; }
"""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str
    note: bool = False


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Bullets:
    items: Sequence[str]


Block = Union[Heading, Paragraph, Table, Image, Bullets]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Document:
        self.blocks.extend(blocks)
        return self

    # ---- Markdown
    def to_markdown(self, directory: Path) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                lines += ["#" * block.level + " " + block.text, ""]
            elif isinstance(block, Paragraph):
                lines += [f"_{block.text}_" if block.note else block.text, ""]
            elif isinstance(block, Bullets):
                lines += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(block.header))) + "|")
                for row in block.rows:
                    lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
                lines.append("")
            elif isinstance(block, Image):
                lines += [f"![{block.alt}]({_relative(block.path, directory)})", ""]
        return "\n".join(lines).rstrip() + "\n"

    # ---- HTML
    def to_html(self, directory: Path) -> str:
        parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(self.title)}</title>",
                 f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if isinstance(block, Heading):
                parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
            elif isinstance(block, Paragraph):
                css = " class='note'" if block.note else ""
                parts.append(f"<p{css}>{_inline(block.text)}</p>")
            elif isinstance(block, Bullets):
                parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{_inline(str(h))}</th>" for h in block.header)
                body = "".join("<tr>" + "".join(f"<td>{_inline(_text(c))}</td>" for c in row) + "</tr>"
                               for row in block.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(Path(block.path).read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(block.alt)}' src='data:image/png;base64,{data}'>"
                             f"</figure>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


def _text(value: Any) -> str:
    return "—" if value is None else str(value)


def _md_cell(value: Any) -> str:
    return _text(value).replace("|", "\\|").replace("\n", " ")


def _relative(path: Path, directory: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(directory).resolve())).as_posix()


def _inline(text: str) -> str:
    """Escape, then the three Markdown forms the report uses: [text](href), **bold**, `code`."""
    escaped = html.escape(text, quote=False)
    escaped = _LINK.sub(lambda m: f"<a href=\"{html.escape(_html_href(m.group(2)))}\">{m.group(1)}</a>", escaped)
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    return _CODE.sub(r"<code>\1</code>", escaped)


def _html_href(href: str) -> str:
    return href[:-3] + ".html" if href.endswith("report.md") else href
