"""report.html: the report's markdown as one self-contained page (images inlined as data: URIs).

Converts the small markdown subset report.md uses: headings, paragraphs, pipe tables, images on a
line of their own, `code`, **bold** and *emphasis*. Nothing is fetched from anywhere when it opens.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:72rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
h1,h2,h3{line-height:1.2}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;
text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
code{background:#f3f3f3;padding:0 .2rem;border-radius:3px}figure{margin:1rem 0}img{max-width:100%;height:auto}
figcaption,.caption{color:#555;font-size:.9rem}"""
IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}


def inline(text: str) -> str:
    """Escape text and turn `code`, **bold** and *emphasis* into HTML."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{escape(part[1:-1])}</code>")
            continue
        part = escape(part)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", part)
        out.append(part)
    return "".join(out)


def data_uri(path: Path) -> str | None:
    """A file as a data: URI, or None when it is missing."""
    if not path.is_file():
        return None
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    header, rows = _cells(lines[0]), [_cells(x) for x in lines[1:] if not re.fullmatch(r"\|?[\s:|-]+\|?", x)]
    head = "".join(f"<th>{inline(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _image(match: re.Match, base: Path) -> str:
    alt, src = match["alt"], match["src"]
    uri = None if re.match(r"^[a-z]+:", src) else data_uri(base / src)
    if uri is None:  # never a link to anything outside the page
        return f'<p class="caption">[{escape(alt)}: image not available]</p>'
    return f'<figure><img src="{uri}" alt="{escape(alt, quote=True)}"></figure>'


def markdown_to_html(markdown: str, base: Path, title: str = "report") -> str:
    """A whole HTML page from report markdown; images are read relative to `base` and inlined."""
    blocks, para, lines = [], [], markdown.splitlines()

    def flush():
        if para:
            blocks.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        image = IMAGE.match(line.strip())
        if not line.strip():
            flush()
        elif heading:
            flush()
            level = len(heading[1])
            blocks.append(f"<h{level}>{inline(heading[2])}</h{level}>")
        elif line.lstrip().startswith("|"):
            flush()
            start = i
            while i + 1 < len(lines) and lines[i + 1].lstrip().startswith("|"):
                i += 1
            blocks.append(_table(lines[start:i + 1]))
        elif image:
            flush()
            blocks.append(_image(image, base))
        else:
            para.append(line.strip())
        i += 1
    flush()
    body = "\n".join(blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
