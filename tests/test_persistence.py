"""Client error state on disk (restarts) and server checkpoint/resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from clients.settings import ClientSettings
from clients.state import (
    StateFileError,
    load_worker,
    read_state_file,
    save_worker,
    serialize_state,
    write_state_file,
)
from conef_fl.registry import method_config
from conef_fl.worker import CompressionWorker
from sim.inmemory import InMemoryGrid, run_inmemory

SHAPES = {"w": (20, 30), "b": (30,)}


def _worker(steps: int = 2) -> CompressionWorker:
    w = CompressionWorker(method_config("conef-cs"), SHAPES)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        w.step({k: torch.randn(s, generator=g) for k, s in SHAPES.items()}, seed=t)
    return w


def test_state_file_round_trip_and_integrity(tmp_path: Path) -> None:
    blob = serialize_state(_worker(), 3)
    path = write_state_file(tmp_path, 5, 3, blob, max_bytes=1 << 20)
    assert read_state_file(path, 1 << 20) == blob
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temporary left
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="checksum"):
        read_state_file(path, 1 << 20)
    path.write_bytes(bytes(data[:20]))
    with pytest.raises(StateFileError, match="truncated"):
        read_state_file(path, 1 << 20)
    path.write_bytes(b"XXXXXXXX" + bytes(data[8:]))
    with pytest.raises(StateFileError, match="magic"):
        read_state_file(path, 1 << 20)
    with pytest.raises(StateFileError, match="state-max-bytes"):
        write_state_file(tmp_path, 5, 4, blob, max_bytes=100)


def test_keeps_two_newest_and_loads_state_from_before_the_round(tmp_path: Path, caplog) -> None:
    settings = ClientSettings(num_partitions=4, partition_id=2, state_dir=str(tmp_path))
    ctx = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(), run_config={"run-name": "exp"})
    workers = {}
    for rnd in (1, 2, 3):
        w = _worker(rnd)
        workers[rnd] = w
        save_worker(ctx, w, settings, rnd)
    files = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert files == ["partition-2.r2.state", "partition-2.r3.state"]
    fresh = Context(run_id=10, node_id=77, node_config={}, state=RecordDict(), run_config={"run-name": "exp"})
    cfg = method_config("conef-cs")
    got = load_worker(fresh, cfg, SHAPES, settings, server_round=3)  # round 3 aborted: use round 2's
    assert got is not None
    for k in SHAPES:
        assert torch.equal(got.feedback[k].store.table, workers[2].feedback[k].store.table)
    got4 = load_worker(fresh, cfg, SHAPES, settings, server_round=4)
    assert torch.equal(got4.feedback["w"].store.table, workers[3].feedback["w"].store.table)
    # corrupt the newest file: refused with a log line, the client starts from zero error (no crash)
    p = tmp_path / "exp" / "partition-2.r3.state"
    p.write_bytes(p.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING):
        assert load_worker(fresh, cfg, SHAPES, settings, server_round=4) is None
    assert "refused" in caplog.text
    # another configuration's state is not loaded into this one
    other = ClientSettings(num_partitions=4, partition_id=2, state_dir=str(tmp_path))
    assert load_worker(fresh, method_config("conef-cs", beta=0.5), SHAPES, other, server_round=3) is None


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
