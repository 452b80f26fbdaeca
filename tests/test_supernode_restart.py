"""A real SuperNode is stopped between rounds and started again: its error state comes back from disk."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sim.flower_runtime import FlowerProcesses, descendants, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_supernode_restart_restores_error_state(tmp_path: Path) -> None:
    before = set(descendants(os.getpid()))
    fp = FlowerProcesses()
    run_dir = tmp_path / "out" / "restart"
    dev0 = tmp_path / "device0"
    stopped: list[int] = []
    try:
        fp.start_superlink()

        def node(i: int, name: str):
            cfg = {"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / f"device{i}")}
            return fp.start_supernode(name, node_config=cfg)

        first = node(0, "supernode-0")
        node(1, "supernode-1")
        cfg = {"num-server-rounds": 3, "fraction-train": 1.0, "local-epochs": 1, "method": "conef-cs",
               "num-partitions": 2, "min-available-nodes": 2, "run-name": "restart",
               "output-dir": str(tmp_path / "out")}
        codes: list[int] = []
        runner = threading.Thread(target=lambda: codes.append(fp.run_app("deploy", cfg, timeout=300,
                                                                           stream_to=tmp_path / "flwr.log")))
        runner.start()
        deadline = time.monotonic() + 240
        while not (dev0 / "restart" / "partition-0.r1.state").exists():
            assert time.monotonic() < deadline, f"round 1 never finished on device 0:\n{fp.tail()}"
            time.sleep(0.2)
        # the device "reboots" right after saving its round-1 state (before its reply got out, so round 1
        # counts it as failed): its SuperNode and everything below it stop, its memory is gone
        group = [first.pid, *descendants(first.pid)]
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(pid_alive(p) for p in group) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in group:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
        node(0, "supernode-0-restarted")
        runner.join(timeout=330)
        assert not runner.is_alive() and codes == [0], fp.tail()
        rows = json.loads((run_dir / "rounds.json").read_text())
        assert len(rows) == 3
        assert rows[0]["clients_state_fresh"] == rows[0]["accepted"] >= 1, rows
        # after the restart device 0 restored its sketch from disk instead of starting from zero
        assert sum(r["clients_state_from_disk"] for r in rows[1:]) >= 1, rows
        assert sum(r["accepted"] for r in rows[1:]) >= 3
    finally:
        stopped = fp.close()
    assert stopped and [p for p in stopped if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - before == set()
