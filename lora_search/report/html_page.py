"""report.html: the report's markdown as one self-contained page, rendered by markdown-it-py.

CommonMark plus pipe tables and strikethrough; raw HTML in the markdown is escaped (report text carries
user data: trial reasons, parameters). Every image is read relative to `base` and inlined as a data: URI;
one that is missing or has a scheme (http:, file:, ...) becomes a caption saying so, and a link with a
scheme keeps its text only. Nothing is fetched from anywhere when the page opens.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path
from urllib.parse import unquote

from markdown_it import MarkdownIt
from markdown_it.token import Token

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:72rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
h1,h2,h3{line-height:1.2}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;
text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
code{background:#f3f3f3;padding:0 .2rem;border-radius:3px}figure{margin:1rem 0}img{max-width:100%;height:auto}
figcaption,.caption{color:#555;font-size:.9rem}"""
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}
SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, file:, data:, javascript:, //host


def data_uri(path: Path) -> str | None:
    """A file as a data: URI, or None when it is missing."""
    if not path.is_file():
        return None
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _figures(tokens: list[Token]) -> list[Token]:
    """A paragraph's leading image on a line of its own becomes a figure; the lines after it stay a paragraph."""
    out: list[Token] = []
    i = 0
    while i < len(tokens):
        kids = tokens[i + 1].children if tokens[i].type == "paragraph_open" else None
        if kids and kids[0].type == "image" and (len(kids) == 1 or kids[1].type in ("softbreak", "hardbreak")):
            kids[0].meta["figure"] = True
            out.append(Token("inline", "", 0, children=[kids[0]], content=kids[0].content, block=True))
            if len(kids) > 2:  # the caption under it
                tokens[i + 1].children, tokens[i + 1].content = kids[2:], tokens[i + 1].content.partition("\n")[2]
                out += tokens[i:i + 3]
            i += 3
        else:
            out.append(tokens[i])
            i += 1
    return out


def _mark(state) -> None:
    """Figures for lone images; a link with a scheme marked to keep its text only."""
    state.tokens = _figures(state.tokens)
    for token in (t for t in state.tokens if t.type == "inline"):
        opened = []
        for child in token.children or []:
            if child.type == "link_open":
                child.meta["text_only"] = bool(SCHEME.match(str(child.attrGet("href") or "")))
                opened.append(child.meta["text_only"])
            elif child.type == "link_close":
                child.meta["text_only"] = opened.pop() if opened else False


def _image(self, tokens, idx, options, env):
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env)
    src = str(token.attrGet("src") or "")
    uri = None if SCHEME.match(src) else data_uri(Path(env["base"]) / unquote(src))
    figure = token.meta.get("figure", False)
    if uri is None:  # never a reference to anything outside the page
        tag = "p" if figure else "span"
        return f'<{tag} class="caption">[{escape(alt)}: image not available]</{tag}>' + ("\n" if figure else "")
    img = f'<img src="{uri}" alt="{escape(alt, quote=True)}">'
    return f"<figure>{img}</figure>\n" if figure else img


def _link(self, tokens, idx, options, env):
    return "" if tokens[idx].meta.get("text_only") else self.renderToken(tokens, idx, options, env)


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    md.core.ruler.push("report_figures_and_links", _mark)
    for name, rule in (("image", _image), ("link_open", _link), ("link_close", _link)):
        md.add_render_rule(name, rule)
    return md


def markdown_to_html(markdown: str, base: Path, title: str = "report") -> str:
    """A whole HTML page from report markdown; images are read relative to `base` and inlined."""
    body = _parser().render(markdown, {"base": base}).rstrip("\n")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
