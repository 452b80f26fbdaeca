"""Deployment mode on loopback: a real SuperLink and SuperNodes, insecure and with TLS + node authentication.

Free ports at run time, a private FLWR_HOME, and after every test: each PID
that was started (SuperLink, SuperNodes, SuperExecs, ServerApp/ClientApp
processes, ``flwr run``) is gone and this process has no descendants left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sim.deploy import DeploymentResult, missing_tools, run_deployment
from sim.flower_runtime import REPO, RUN_STARTED, descendants, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SMALL = {
    "dataset": "digits",
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "local-epochs": 1,
    "method": "conef-cs",
    "node-wait-seconds": 600.0,  # only a bound on waiting for the SuperNodes, never reached on a healthy run
}


@pytest.fixture
def baseline() -> frozenset[int]:
    """Processes this test process already had (e.g. multiprocessing's resource tracker from other tests)."""
    return frozenset(descendants(os.getpid()))


def _assert_nothing_left(stopped: list[int], baseline: frozenset[int]) -> None:
    assert stopped, "close() signalled no process: nothing was started?"
    assert [p for p in stopped if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - baseline == set()


def _assert_completed(res: DeploymentResult, rounds: int = 2, nodes: int = 2) -> None:
    s = res.summary
    assert s["rounds"] == rounds
    assert s["failed_replies"] == 0 and s["rejected_replies"] == 0, s
    assert len(res.rounds) == rounds
    assert all(r["accepted"] == nodes and r["failed"] == 0 for r in res.rounds), res.rounds
    assert s["uplink_bytes_total"] > 0


def test_insecure_two_supernodes(tmp_path: Path, baseline: frozenset[int]) -> None:
    res = run_deployment({**SMALL, "output-dir": str(tmp_path), "run-name": "insecure"}, num_supernodes=2,
                         timeout=240, log_file=tmp_path / "flwr.log")
    _assert_completed(res)
    assert (tmp_path / "insecure" / "summary.json").exists()
    _assert_nothing_left(res.stopped_pids, baseline)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeploymentResult, frozenset[int]]:
    """One TLS + SuperNode-auth deployment (2 registered SuperNodes, 1 whose key is not registered), and the
    descendants of this process it left behind (read-only for the tests)."""
    missing = missing_tools(tls=True, auth=True)
    if missing:
        pytest.skip(f"TLS/auth test needs {', '.join(missing)} on PATH (certificates and keys are made at run time)")
    before = frozenset(descendants(os.getpid()))
    out = tmp_path_factory.mktemp("secure")
    res = run_deployment({**SMALL, "output-dir": str(out), "run-name": "secure"}, num_supernodes=2, tls=True,
                         auth=True, unregistered=1, timeout=240, log_file=out / "flwr.log")
    return res, frozenset(descendants(os.getpid())) - before


@pytest.fixture
def secure_run(secure: tuple[DeploymentResult, frozenset[int]]) -> DeploymentResult:
    return secure[0]


def test_tls_and_auth_run_completes(secure: tuple[DeploymentResult, frozenset[int]]) -> None:
    res, left = secure
    _assert_completed(res)
    assert res.stopped_pids and [p for p in res.stopped_pids if pid_alive(p)] == []
    assert left == frozenset()


def test_unregistered_supernode_is_refused(secure_run: DeploymentResult) -> None:
    # the node whose key was never registered exits with an error on its own, before the run ends ...
    (code,) = secure_run.unregistered_exit_codes
    assert code is not None and code != 0
    (node_log,) = secure_run.unregistered_logs
    assert "Exit Code: 305" in node_log, node_log
    # ... because the SuperLink refused to activate it (HTTP 412), while both registered nodes trained
    assert any(" 412" in ln for ln in secure_run.superlink_refusals), secure_run.superlink_refusals
    assert all(r["accepted"] == 2 for r in secure_run.rounds)


def test_failure_still_stops_everything(tmp_path: Path, baseline: frozenset[int]) -> None:
    # the ServerApp refuses the run config once the SuperLink and both SuperNodes are up: flwr run ends without
    # results, run_deployment raises, and everything it started is stopped anyway
    with pytest.raises(RuntimeError, match="wrote no summary"):
        run_deployment({**SMALL, "inner-strategy": "no-such-strategy", "output-dir": str(tmp_path),
                        "run-name": "refused"}, num_supernodes=2, timeout=240, log_file=tmp_path / "flwr.log")
    assert "inner-strategy='no-such-strategy' is not valid" in (tmp_path / "flwr.log").read_text()
    assert set(descendants(os.getpid())) - baseline == set()


def test_ctrl_c_stops_everything(tmp_path: Path, baseline: frozenset[int]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sim.deploy", "--supernodes", "1", "--set", "num-server-rounds=50",
           "--set", f'output-dir="{tmp_path}"']
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    started: dict[str, int] = {}
    lines: list[str] = []
    try:
        # sim.deploy logs each process it starts with its PID; the line for `flwr run` comes once the SuperLink
        # answers, the SuperNode is started and every PID is recorded: Ctrl-C from then on must stop them all
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"started (\S+) \(pid (\d+)\)", line) or re.search(
                rf"({re.escape(RUN_STARTED)}) \(pid (\d+)\) started", line)
            if m:
                started[m[1]] = int(m[2])
            if RUN_STARTED in started:
                break
        assert set(started) == {"superlink", "supernode-0", RUN_STARTED}, "".join(lines)
        seen = set(started.values()) | set(descendants(proc.pid))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        assert proc.returncode == 130, "".join(lines) + err
        assert "every process started was stopped" in err
    finally:
        if proc.poll() is None:  # the test failed before its Ctrl-C: still let sim.deploy clean up
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert [p for p in seen if pid_alive(p)] == []
    assert set(descendants(os.getpid())) - baseline == set()
