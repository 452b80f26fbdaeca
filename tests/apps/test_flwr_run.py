"""``flwr run . --stream`` as a new user types it: the default app runs to completion on the local simulation.

Own FLWR_HOME, free ports for the local SuperLink (Flower's own environment
variables), runtime dependency installation disabled; the SuperLink ``flwr run``
leaves behind is stopped by PID afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.flower_runtime import descendants, free_port, pid_alive
from sim.local_superlink import local_superlink_pids, stop_local_superlink

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def test_flwr_run_dot_runs_the_default_app(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "outputs"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ["flwr", "run", ".", "--stream", "--run-config",
           f"num-server-rounds=2 local-epochs=1 run-name='dot' output-dir='{out}'"]
    before = set(descendants(os.getpid()))
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
        assert local_superlink_pids(home), "flwr run started no local SuperLink under our FLWR_HOME"
    finally:
        stopped = stop_local_superlink(home)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    summary = json.loads((out / "dot" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rejected_replies"] == 0 and summary["failed_replies"] == 0
    assert summary["uplink_fraction_of_dense"] < 0.11 and summary["error_memory_saving_vs_efsgd"] > 0.89
    assert "2 simulated SuperNodes" in log and "Installing application dependencies" not in log
    assert stopped and [p for p in stopped if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - before == set()
