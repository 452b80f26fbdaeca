"""sim.tables: the one markdown table writer of the reports."""

from __future__ import annotations

import pytest

from sim.tables import markdown_table


def test_header_rule_and_rows() -> None:
    assert markdown_table(["a", "b"], [[1, 2.5], ["x", None]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2.5 |",
        "| x | None |",
    ]


def test_a_row_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header has 2"):
        markdown_table(["a", "b"], [[1, 2], [3]])
