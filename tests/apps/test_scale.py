"""The memory guard of ``sim.scale``: it stops a run by PID before memory runs out and says where it stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.flower_runtime import descendants, pid_alive
from sim.scale import GIB, MemoryGuard, markdown, measure, plan

MIB = 1024**2

#: Grows by 8 MiB every 20 ms up to 1 GiB, then sleeps; the marker lets the guard find it.
GROWER = """
import sys, time
marker = sys.argv[1]
chunks = []
for _ in range(128):
    chunks.append(bytearray(8 * 1024 * 1024))
    time.sleep(0.02)
time.sleep(60)
"""


def test_guard_kills_a_growing_process_past_the_limit() -> None:
    guard = MemoryGuard(max_rss=200 * MIB, needle="conef-guard-probe", interval=0.05)
    guard.start()
    proc = subprocess.Popen([sys.executable, "-c", GROWER, "conef-guard-probe"])
    try:
        code = proc.wait(timeout=60)
    finally:
        guard.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == -9  # killed by the guard, before it reached 1 GiB and went to sleep
    stop = guard.stopped
    assert stop is not None and "RSS" in stop.reason
    assert 200 * MIB < stop.sim_rss_bytes < GIB
    assert proc.pid in stop.pids_signalled


def test_guard_refuses_bad_limits() -> None:
    with pytest.raises(ValueError, match="allowed"):
        MemoryGuard(max_rss=-1)
    with pytest.raises(ValueError, match="interval"):
        MemoryGuard(interval=0)


def test_plan_trains_every_client_once() -> None:
    assert plan(10_000, 100) == (0.01, 100)
    assert plan(1000, 300) == (0.3, 4)  # 300 per round: 4 rounds cover all 1000
    with pytest.raises(ValueError, match="clients_per_round"):
        plan(10, 11)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_small_run_with_a_tiny_limit_stops_cleanly_and_reports_where(tmp_path: Path) -> None:
    before = set(descendants(os.getpid()))
    r = measure("conef-cs", 4, clients_per_round=2, dataset="digits", work=tmp_path, model="auto",
                max_rss=1 * MIB, timeout=240)
    assert r["stopped_by_guard"] and "error" not in r
    g = r["guard"]
    assert "RSS" in g["reason"] and g["sim_rss_bytes"] > MIB
    # where it stopped: the simulation process had just started, no round had completed
    assert g["rounds_completed"] == 0 and g["clients_with_state"] == 0 == r["clients_with_state"]
    assert g["pids_signalled"] and not any(pid_alive(p) for p in g["pids_signalled"])
    assert set(descendants(os.getpid())) - before == set()  # SuperLink, simulation, Ray: all gone
    assert "stopped by the memory guard after 0 clients" in markdown([r])
