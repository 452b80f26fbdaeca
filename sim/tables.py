"""Markdown tables for the benchmark and experiment reports: one writer for all of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_table"]


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a GitHub markdown table: the header, the rule and one line per row.

    Raises
    ------
    ValueError
        If a row has another number of cells than the header.
    """
    head = [str(h) for h in header]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows):
        cells = [str(c) for c in row]
        if len(cells) != len(head):
            raise ValueError(f"row {i} has {len(cells)} cells, the header has {len(head)}: {cells!r}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
