"""Deployment mode on loopback: a real SuperLink and SuperNodes, insecure and with TLS + node authentication.

Free ports at run time, a private FLWR_HOME, and after every test: each PID
that was started (SuperLink, SuperNodes, SuperExecs, ServerApp/ClientApp
processes, ``flwr run``) is gone and this process has no descendants left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim.deploy import DeploymentResult, missing_tools, run_deployment
from sim.flower_runtime import REPO, descendants, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SMALL = {
    "dataset": "digits",
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "local-epochs": 1,
    "method": "conef-cs",
}


_BASELINE: set[int] = set()


@pytest.fixture(autouse=True)
def _baseline_processes():
    """Processes this test process already had (e.g. multiprocessing's resource tracker from other tests)."""
    _BASELINE.clear()
    _BASELINE.update(descendants(os.getpid()))
    yield


def _assert_nothing_left(stopped: list[int]) -> None:
    assert stopped, "close() signalled no process: nothing was started?"
    assert [p for p in stopped if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - _BASELINE == set()


def _assert_completed(res: DeploymentResult, rounds: int = 2, nodes: int = 2) -> None:
    s = res.summary
    assert s["rounds"] == rounds and s["num_partitions"] == nodes
    assert s["failed_replies"] == 0 and s["rejected_replies"] == 0, s
    assert len(res.rounds) == rounds
    assert all(r["accepted"] == nodes and r["failed"] == 0 for r in res.rounds), res.rounds
    assert s["uplink_bytes_total"] > 0


def test_insecure_two_supernodes(tmp_path: Path) -> None:
    res = run_deployment({**SMALL, "output-dir": str(tmp_path), "run-name": "insecure"}, num_supernodes=2,
                         timeout=240, log_file=tmp_path / "flwr.log")
    _assert_completed(res)
    assert (tmp_path / "insecure" / "summary.json").exists()
    _assert_nothing_left(res.stopped_pids)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> DeploymentResult:
    """One TLS + SuperNode-auth deployment: 2 registered SuperNodes and 1 whose key is not registered."""
    missing = missing_tools(tls=True, auth=True)
    if missing:
        pytest.skip(f"TLS/auth test needs {', '.join(missing)} on PATH (certificates and keys are made at run time)")
    out = tmp_path_factory.mktemp("secure")
    return run_deployment({**SMALL, "output-dir": str(out), "run-name": "secure"}, num_supernodes=2, tls=True,
                          auth=True, unregistered=1, timeout=240, log_file=out / "flwr.log")


def test_tls_and_auth_run_completes(secure_run: DeploymentResult) -> None:
    _assert_completed(secure_run)
    _assert_nothing_left(secure_run.stopped_pids)


def test_unregistered_supernode_is_refused(secure_run: DeploymentResult) -> None:
    # the node whose key was never registered exits with an error on its own, before the run ends ...
    (code,) = secure_run.unregistered_exit_codes
    assert code is not None and code != 0
    (node_log,) = secure_run.unregistered_logs
    assert "Exit Code: 305" in node_log, node_log
    # ... because the SuperLink refused to activate it (HTTP 412), while both registered nodes trained
    assert any(" 412" in ln for ln in secure_run.superlink_refusals), secure_run.superlink_refusals
    assert all(r["accepted"] == 2 for r in secure_run.rounds)


def test_failure_still_stops_everything(tmp_path: Path) -> None:
    # flwr run cannot finish in 1 s: run_deployment raises, and everything it started is stopped anyway
    before = set(descendants(os.getpid()))
    with pytest.raises(subprocess.TimeoutExpired):
        run_deployment({**SMALL, "output-dir": str(tmp_path)}, num_supernodes=2, timeout=1.0,
                       log_file=tmp_path / "flwr.log")
    assert set(descendants(os.getpid())) - before == set()


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sim.deploy", "--supernodes", "1", "--set", "num-server-rounds=50",
           "--set", f'output-dir="{tmp_path}"']
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait until the SuperLink and the SuperNode are up (two Flower processes, each with a SuperExec)
        deadline = time.monotonic() + 60
        seen: set[int] = set()
        while time.monotonic() < deadline and len(seen) < 4:
            seen |= set(descendants(proc.pid))
            time.sleep(0.5)
        assert len(seen) >= 4, f"only {len(seen)} processes started"
        seen |= set(descendants(proc.pid))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p for p in seen if pid_alive(p)] == []
