"""Sampling by partition end to end: other node ids (as Flower's simulation hands out), same partitions, same model."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sim.inmemory import run_inmemory

BASE = {"method": "conef-cs", "num-server-rounds": 3, "fraction-train": 0.5, "local-epochs": 1, "seed": 3,
        "run-name": "r"}
NODES = 6


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "r" / "model.pt", weights_only=True)


def test_random_node_ids_train_the_same_partitions_as_the_inprocess_numbering(tmp_path: Path) -> None:
    ids = [random.Random(i).getrandbits(63) for i in range(NODES)]  # partition i on node ids[i], unsorted
    assert sorted(ids) != ids
    run_inmemory({**BASE, "output-dir": str(tmp_path / "ref")}, NODES)
    run_inmemory({**BASE, "output-dir": str(tmp_path / "random-ids")}, NODES, node_ids=ids)
    run_inmemory({**BASE, "output-dir": str(tmp_path / "by-node"), "sample-by": "node"}, NODES, node_ids=ids)
    ref, same, other = (_model(tmp_path / d) for d in ("ref", "random-ids", "by-node"))
    assert all(torch.equal(ref[k], same[k]) for k in ref)  # same partitions, same order: bit for bit
    assert not all(torch.equal(ref[k], other[k]) for k in ref)  # over node ids: other partitions
