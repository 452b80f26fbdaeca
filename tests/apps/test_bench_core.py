"""``sim.bench_core``: the server-aggregation part is in the one benchmark run, its targets and its table.

Only the structure is checked (a tiny run): timings are never asserted in tests.
"""

from __future__ import annotations

import pytest

from sim import bench_core

REPLIES = (2, 3)


@pytest.fixture(scope="module")
def result() -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_core, "SERVER_REPLIES", REPLIES)  # tiny: the structure, not the speed
        return bench_core.run_benchmark(sizes=[], repeats=1, threads=1, parts=["server"])


def test_server_part_measures_every_method_and_reply_count(result: dict) -> None:
    rows = result["server"]["rows"]
    assert [(r["method"], r["replies"]) for r in rows] == [
        (m, n) for m in bench_core.SERVER_METHODS for n in REPLIES]
    for r in rows:
        assert r["peak_extra_bytes"] > 0 and r["cpu_ms_per_reply"] > 0
        assert r["peak_over_2_models_plus_one_reply"] == pytest.approx(
            r["peak_extra_bytes"] / (2 * r["model_bytes"] + r["reply_bytes"]))


def test_server_targets_are_rows_of_the_largest_reply_count(result: dict) -> None:
    names = [row["name"] for row in result["targets"]["rows"]]
    for m in bench_core.SERVER_METHODS:
        assert f"server, {m}, 3 replies: CPU ms per reply" in names
        assert f"server, {m}, 3 replies: peak extra memory / (2 models + 1 reply)" in names
    assert not any(", 2 replies" in n for n in names)


def test_markdown_has_the_server_table(result: dict) -> None:
    text = bench_core.to_markdown(result)
    assert "## Server aggregation" in text
    assert text.count("| conef-cs | ") == 2
    assert "server, conef-cs, 3 replies: CPU ms per reply" in text
