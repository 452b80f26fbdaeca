"""Deployment runs are reproducible: the same seed gives the same final model, bit for bit, also after a resume.

Every run is a real deployment on loopback (:func:`sim.deploy.run_deployment`): a
fresh SuperLink and two fresh SuperNodes, so node IDs, message arrival order and
process timing differ from run to run; each SuperNode keeps its error state in
its own ``state-dir``, as on separate devices. The resumed run stops after round
2 (``num-server-rounds=2``), everything is shut down, and a new deployment
continues it with ``resume=true``, the same run-name and the same state folders.
Every process started is stopped by PID, also on failure, and nothing is left
under this test process. A fast in-process test checks the cause of the
differences between deployment runs directly: node IDs (random in deployment)
must not change the order in which replies are summed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sim import inmemory
from sim.deploy import DeploymentResult, run_deployment
from sim.flower_runtime import descendants, pid_alive

ROUNDS = 3
CONFIG = {
    "dataset": "digits",
    "method": "conef-cs",
    "fraction-train": 1.0,
    "local-epochs": 1,
    "seed": 7,
    "node-wait-seconds": 600.0,  # only a bound on waiting for both SuperNodes, never reached on a healthy run
}
NODES = 2


@dataclass(frozen=True)
class Finished:
    """A finished deployment run: its final model and per-round rows."""

    model: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]]


def _deploy(root: Path, run_name: str, devices: str, **overrides: Any) -> DeploymentResult:
    """One deployment on fresh processes; checks that every process it started is gone afterwards."""
    before = set(descendants(os.getpid()))
    res = run_deployment(
        {**CONFIG, "num-server-rounds": ROUNDS, **overrides, "output-dir": str(root / "out"), "run-name": run_name},
        num_supernodes=NODES, timeout=600, log_file=root / f"{run_name}.flwr.log",
        node_configs=[{"state-dir": str(root / f"{devices}-device{i}")} for i in range(NODES)],
    )
    assert res.stopped_pids and [p for p in res.stopped_pids if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - before == set()
    return res


def _finished(res: DeploymentResult) -> Finished:
    assert res.run_dir is not None
    model = torch.load(res.run_dir / "model.pt", weights_only=True)
    return Finished(model=model, rounds=res.rounds)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Finished]:
    """An uninterrupted run and a run stopped after round 2 and resumed, same seed (read-only for the tests).

    Three deployments, each on fresh processes: the two runs differ in node IDs,
    message arrival order and timing, and the second also in the restart.
    """
    root = tmp_path_factory.mktemp("deterministic")
    first = _finished(_deploy(root, "first", "first"))
    _deploy(root, "resumed", "resumed", **{"num-server-rounds": 2})
    resumed = _finished(_deploy(root, "resumed", "resumed", resume=True))
    return {"first": first, "resumed": resumed}


def _assert_bit_identical(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a
              if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}
    assert differ == {}, f"tensors differ (max abs difference): {differ}"


def _assert_all_trained(rows: list[dict[str, Any]]) -> None:
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["accepted"] == NODES and r["rejected"] == 0 and r["failed"] == 0 for r in rows), rows


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_runs_with_the_same_seed_end_bit_identical(runs: Mapping[str, Finished]) -> None:
    first, second = runs["first"], runs["resumed"]
    _assert_all_trained(first.rounds)
    _assert_all_trained(second.rounds)
    _assert_bit_identical(first.model, second.model)
    # the clients' replies were the same too, round by round (rounds 1-2 from one deployment, 3 from another)
    keys = ("train_loss", "update_norm", "uplink_payload_bytes_total", "accuracy", "loss")
    assert [{k: r[k] for k in keys} for r in first.rounds] == [{k: r[k] for k in keys} for r in second.rounds]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(runs: Mapping[str, Finished]) -> None:
    resumed = runs["resumed"]
    _assert_all_trained(resumed.rounds)
    # round 3 ran in a new deployment: both clients restored their round-2 error state from their disks
    assert resumed.rounds[2]["clients_state_from_disk"] == NODES, resumed.rounds
    _assert_bit_identical(runs["first"].model, resumed.model)


def test_in_process_model_does_not_depend_on_node_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {**CONFIG, "num-server-rounds": ROUNDS, "output-dir": str(tmp_path)}
    inmemory.run_inmemory({**cfg, "run-name": "ascending"}, NODES)  # partition i on node 1001 + i

    class Descending(inmemory.InMemoryGrid):
        """Partition 0 on the largest node ID: node order is the reverse of partition order."""

        def __init__(self, client_app: Any, num_nodes: int, run_config: Mapping[str, Any], **_: Any) -> None:
            super().__init__(client_app, num_nodes, run_config, node_ids=[9000 - i for i in range(num_nodes)])

    monkeypatch.setattr(inmemory, "InMemoryGrid", Descending)
    inmemory.run_inmemory({**cfg, "run-name": "descending"}, NODES)
    _assert_bit_identical(torch.load(tmp_path / "ascending" / "model.pt", weights_only=True),
                          torch.load(tmp_path / "descending" / "model.pt", weights_only=True))
