"""Whole runs: a client restart restores the error state from disk; a server resume equals an uninterrupted run.

The state file format and its refusals are tested in ``test_client_state.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from sim.inmemory import InMemoryGrid, run_inmemory

BASE = {"method": "conef-cs", "num-server-rounds": 4, "fraction-train": 0.5, "local-epochs": 1, "seed": 3}


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)




def test_client_restart_restores_state_from_disk(tmp_path: Path, monkeypatch) -> None:
    """A node whose in-memory Context is lost between rounds (a SuperNode restart) reloads its sketch."""
    ref = tmp_path / "ref"
    run_inmemory({**BASE, "output-dir": str(ref), "run-name": "r", "state-dir": str(tmp_path / "s1")}, 4)
    restarts = {"n": 0}
    orig = InMemoryGrid.send_and_receive

    def restarting(self, messages, *, timeout=None):
        messages = list(messages)
        # before every round, every node "reboots": its Context (and context.state) is new
        for nid, ctx in list(self.contexts.items()):
            self.contexts[nid] = Context(run_id=ctx.run_id, node_id=nid, node_config=dict(ctx.node_config),
                                         state=RecordDict(), run_config=dict(ctx.run_config))
        restarts["n"] += 1
        return orig(self, messages, timeout=timeout)

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", restarting)
    out = tmp_path / "restart"
    run_inmemory({**BASE, "output-dir": str(out), "run-name": "r", "state-dir": str(tmp_path / "s2")}, 4)
    assert restarts["n"] >= 4
    a, b = _model(ref / "r"), _model(out / "r")
    assert all(torch.equal(a[k], b[k]) for k in a)  # state restored, not reset
    out2 = tmp_path / "nostate"
    run_inmemory({**BASE, "output-dir": str(out2), "run-name": "r"}, 4)  # restarts without state-dir
    c = _model(out2 / "r")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # losing the state changes the result


def test_server_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    run_inmemory({**BASE, "output-dir": str(tmp_path / "a"), "run-name": "x", "state-dir": str(tmp_path / "sa")}, 6)
    part = {**BASE, "output-dir": str(tmp_path / "b"), "run-name": "x", "state-dir": str(tmp_path / "sb")}
    run_inmemory({**part, "num-server-rounds": 2}, 6)
    ckpt = torch.load(tmp_path / "b" / "x" / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 2
    run_inmemory({**part, "resume": True}, 6)
    a, b = _model(tmp_path / "a" / "x"), _model(tmp_path / "b" / "x")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = json.loads((tmp_path / "b" / "x" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
