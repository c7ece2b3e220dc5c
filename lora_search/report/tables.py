"""Markdown tables for the report and the comparisons."""

from __future__ import annotations


def cell(value) -> str:
    """One table cell: floats to 4 significant digits, text on one line with no pipes."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "/")  # one table row: a multi-line reason is flattened


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
