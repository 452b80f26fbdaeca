"""A real SuperNode is stopped between rounds and started again: its error state comes back from disk.

No race: the ServerApp runs from a copy of this app whose server component is
the project's ServerApp with one hook, a pause after round 1's checkpoint until
the test opens a gate. While the server waits there, round 1 is complete (both
replies counted) and no message is in flight, so the test stops SuperNode 0
(and everything below it), waits until the SuperLink has deactivated it, starts
a new SuperNode 0 on the same device folder, waits until the SuperLink has
activated it, and opens the gate. Round 2 then samples both connected nodes
(``min-available-nodes=2``), the new one included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from sim.flower_runtime import REPO, FlowerProcesses, descendants, pid_alive
from sim.inmemory import run_inmemory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GATE_ENV = "CONEF_TEST_GATE"
ROUND_ENV = "CONEF_TEST_PAUSE_AFTER_ROUND"
GATED_SERVER = f'''"""The project's ServerApp, pausing after one round's checkpoint until a test opens a gate."""

import os
import time
from pathlib import Path

import server.server_app as real

_save = real.save_checkpoint


def save_checkpoint(folder, server_round, *args, **kwargs):
    path = _save(folder, server_round, *args, **kwargs)
    if server_round == int(os.environ["{ROUND_ENV}"]):
        gate = Path(os.environ["{GATE_ENV}"])
        (gate / f"round-{{server_round}}.done").write_text("")
        while not (gate / f"round-{{server_round}}.go").exists():
            time.sleep(0.1)
    return path


real.save_checkpoint = save_checkpoint
app = real.app
'''
CONFIG = {
    "dataset": "digits",
    "method": "conef-cs",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "local-epochs": 1,
    "min-available-nodes": 2,
    "node-wait-seconds": 600.0,  # only a bound: the gate opens once the new node is active
    "seed": 3,
    "run-name": "restart",
}


def _gated_app(folder: Path) -> Path:
    """This app's code and config, with the gated ServerApp as the server component."""
    for pkg in ("conef_fl", "clients", "server", "sim"):  # every folder of pyproject's fab-include
        shutil.copytree(REPO / pkg, folder / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (REPO / "pyproject.toml").read_text()
    for old, new in (('serverapp = "server.server_app:app"', 'serverapp = "gated_server:app"'),
                     ("fab-include = [", 'fab-include = ["gated_server.py", ')):
        assert pyproject.count(old) == 1, old
        pyproject = pyproject.replace(old, new)
    (folder / "pyproject.toml").write_text(pyproject)
    (folder / "gated_server.py").write_text(GATED_SERVER)
    return folder


def _stop_tree(proc) -> None:
    """SIGTERM a SuperNode (it deactivates itself at the SuperLink), then make sure its whole tree is gone."""
    group = [proc.pid, *descendants(proc.pid)]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in group) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in group:
        if pid_alive(p):
            os.kill(p, signal.SIGKILL)


def _wait_for(what: str, check, runner: threading.Thread, fp: FlowerProcesses, within: float = 300.0) -> None:
    """Wait until ``check()`` holds; fail with the logs if the run ended first (or it never happens)."""
    deadline = time.monotonic() + within
    while not check():
        assert runner.is_alive(), f"the run ended before {what}:\n{fp.tail()}"
        assert time.monotonic() < deadline, f"{what} did not happen within {within:.0f} s:\n{fp.tail()}"
        time.sleep(0.1)


def test_supernode_restart_restores_error_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(descendants(os.getpid()))
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(GATE_ENV, str(gate))
    monkeypatch.setenv(ROUND_ENV, "1")
    app_dir = _gated_app(tmp_path / "app")
    out = tmp_path / "out"
    fp = FlowerProcesses()
    try:
        fp.start_superlink()

        def node(i: int, name: str):
            cfg = {"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / f"device{i}")}
            return fp.start_supernode(name, node_config=cfg)

        first = node(0, "supernode-0")
        node(1, "supernode-1")
        codes: list[int] = []
        runner = threading.Thread(target=lambda: codes.append(fp.run_app(
            "deploy", {**CONFIG, "output-dir": str(out)}, app_dir=app_dir, timeout=540,
            stream_to=tmp_path / "flwr.log")))
        runner.start()
        _wait_for("round 1 ended", (gate / "round-1.done").exists, runner, fp)
        # the server waits after round 1: the device "reboots", losing its memory (context.state)
        _stop_tree(first)
        superlink_log = fp.home / "superlink.log"

        def fleet_calls(call: str) -> int:
            return superlink_log.read_text(errors="replace").count(f'/v1/fleet/{call} HTTP/1.1" 200')

        _wait_for("the SuperLink deactivated SuperNode 0", lambda: fleet_calls("deactivate-node") >= 1, runner, fp)
        node(0, "supernode-0-restarted")
        _wait_for("the new SuperNode 0 is active", lambda: fleet_calls("activate-node") >= 3, runner, fp)
        (gate / "round-1.go").write_text("")
        runner.join()
        assert codes == [0], fp.tail()
    finally:
        stopped = fp.close()
    assert stopped and [p for p in stopped if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - before == set()

    rows = json.loads((out / "restart" / "rounds.json").read_text())
    sources = [(r["clients_state_fresh"], r["clients_state_from_memory"], r["clients_state_from_disk"]) for r in rows]
    assert [r["accepted"] for r in rows] == [2, 2, 2] and sum(r["failed"] + r["rejected"] for r in rows) == 0, rows
    # round 1: both start from zero error; rounds 2 and 3: with state-dir the state lives on disk only
    # (context.state keeps a pointer), so both load it from disk, the restarted device (empty context.state)
    # as well as the other
    assert sources == [(2, 0, 0), (0, 0, 2), (0, 0, 2)], rows
    assert (tmp_path / "device0" / "restart" / "partition-0.last").is_file()
    # and the restart changed nothing: the same model as the same run without it, in memory
    run_inmemory({**CONFIG, "output-dir": str(tmp_path / "inmemory")}, 2)
    restarted = torch.load(out / "restart" / "model.pt", weights_only=True)
    reference = torch.load(tmp_path / "inmemory" / "restart" / "model.pt", weights_only=True)
    assert list(restarted) == list(reference)
    assert all(torch.equal(restarted[k], reference[k]) for k in reference)
