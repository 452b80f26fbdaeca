"""``sim.experiments --engine flower``: the grid through Flower's simulation engine, same result as in-process.

Flower's simulation hands out random node ids; the wrapper samples over the
nodes' partitions (``sample-by=partition``, :mod:`conef_fl.flower.sampling`), so
with half the clients per round both engines train the same partitions. Client
seeds come from the partition, the round seeds from the server, and the wrapper
sums replies in partition order: the two engines must produce the same model,
hence the same accuracy and loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sim import experiments
from sim.flower_runtime import descendants

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ARGS = ["--task", "digits", "--methods", "conef-cs-90", "--rounds", "3", "--set", "fraction-train=0.5", "--quiet"]


def test_flower_engine_matches_the_inprocess_grid(tmp_path: Path) -> None:
    before = set(descendants(os.getpid()))
    assert experiments.main([*ARGS, "--out", str(tmp_path / "flower"), "--engine", "flower"]) == 0
    assert set(descendants(os.getpid())) - before == set()  # SuperLink, simulation, Ray: stopped
    assert experiments.main([*ARGS, "--out", str(tmp_path / "inmemory")]) == 0
    runs = {}
    for engine in ("flower", "inmemory"):
        folder = tmp_path / engine / "conef-cs-90-s0"
        meta = json.loads((folder / "experiment.json").read_text())
        assert meta["engine"] == engine
        runs[engine] = json.loads((folder / "rounds.json").read_text())
        # the report says which engine produced the numbers
        assert experiments.ENGINE_LABELS[engine] in (tmp_path / engine / "results.md").read_text()
    flower, inmem = runs["flower"], runs["inmemory"]
    assert [r["accepted"] for r in flower] == [r["accepted"] for r in inmem] == [2, 2, 2]
    assert [r["uplink_payload_bytes_total"] for r in flower] == [r["uplink_payload_bytes_total"] for r in inmem]
    assert [r["accuracy"] for r in flower] == pytest.approx([r["accuracy"] for r in inmem], abs=1e-9)
    assert [r["loss"] for r in flower] == pytest.approx([r["loss"] for r in inmem], rel=1e-5)


def test_engine_is_validated() -> None:
    with pytest.raises(ValueError, match="engine"):
        experiments.execute({"run-name": "x", "output-dir": "/nonexistent"}, 2, engine="ray")
    with pytest.raises(SystemExit):
        experiments.build_parser().parse_args(["--out", "x", "--engine", "ray"])
