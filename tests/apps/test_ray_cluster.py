"""The app on an existing Ray cluster: two Ray nodes on this machine, free ports, every process stopped by PID.

Each test starts its own cluster (``sim.ray_cluster.LocalRayCluster``: a head and a
worker node, one CPU each, separate temp dirs), runs the project's ClientApp with
the project's ServerApp (through ``sim.metrics_probe``, which also records every
client reply's metrics) via ``sim.run.run_simulation(..., ray_address=...)``, and
stops the cluster. Tests are skipped, with the reason, only where Ray cannot start.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.flower_runtime import REPO, descendants, pid_alive
from sim.metrics_probe import read_client_metrics, write_probe_app
from sim.ray_cluster import LocalRayCluster, check_ray_address
from sim.run import run_simulation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: The app settings of these runs: 4 clients, every client every round, tiny local work.
BASE = {"fraction-train": 1.0, "local-epochs": 1, "batch-size": 32, "method": "conef-cs"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # released on close: nothing listens there now


@pytest.fixture
def cluster() -> Iterator[LocalRayCluster]:
    c = LocalRayCluster(num_nodes=2, cpus_per_node=1)
    try:
        c.start()
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        left = c.stop()
        pytest.skip(f"Ray cannot start here: {exc}"[:500] + f" (stopped pids {left})")
    try:
        yield c
    finally:
        pids = c.stop()
        # every process of both nodes (GCS, raylets, agents, ClientApp workers) is gone
        assert pids, "the cluster had no processes to stop"
        assert [p for p in pids if pid_alive(p)] == []
        assert c.pids() == []


def _run(cluster: LocalRayCluster, tmp_path: Path, rounds: int, run_name: str) -> dict:
    app = write_probe_app(tmp_path / "app", REPO)
    overrides = {**BASE, "num-server-rounds": rounds, "output-dir": str(tmp_path), "run-name": run_name}
    return run_simulation(overrides, num_supernodes=4, timeout=600, log_file=tmp_path / "flwr.log",
                          ray_address=cluster.address, app_dir=app)


def test_clientapps_run_on_both_ray_nodes(cluster: LocalRayCluster, tmp_path: Path) -> None:
    before = set(descendants(os.getpid()))
    node_ids = cluster.node_ids()
    assert len(node_ids) == 2
    summary = _run(cluster, tmp_path, rounds=2, run_name="ray2")
    # the Flower processes (SuperLink, simulation driver) are stopped; the cluster outlives the run
    assert set(descendants(os.getpid())) - before == set()
    assert len(cluster.node_ids()) == 2
    rows = json.loads((tmp_path / "ray2" / "rounds.json").read_text())
    assert [r["accepted"] for r in rows] == [4, 4] and summary["failed_replies"] == 0
    replies = read_client_metrics(tmp_path / "ray2")
    assert len(replies) == 8
    # the clients' own metric: the Ray node each ClientApp ran on; both nodes appear
    expected = {int(n[:6], 16) for n in node_ids}
    seen = {int(m["ray-node"]) for m in replies}
    assert seen == expected, (seen, expected)


def test_unreachable_cluster_fails_fast_naming_the_address(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    before = set(descendants(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=address.replace(".", r"\.")):
        run_simulation({**BASE, "num-server-rounds": 1, "output-dir": str(tmp_path)}, num_supernodes=2,
                       ray_address=address)
    assert time.monotonic() - t0 < 10
    assert set(descendants(os.getpid())) - before == set()  # nothing was started


def test_bad_address_is_refused() -> None:
    with pytest.raises(ValueError, match="not valid"):
        check_ray_address("no-port-here")


def test_worker_node_dies_mid_run(cluster: LocalRayCluster, tmp_path: Path) -> None:
    """Kill every process of the worker node after round 1; the run completes on the head node.

    Replies that were lost come back as Flower error replies: the round counts them as
    failed and aggregates the rest. The lost clients' ``context.state`` is not replaced
    (Flower updates a node's context only from a successful reply), so in later rounds
    every client restores its state from memory or starts fresh, and no state is refused.
    """
    app = write_probe_app(tmp_path / "app", REPO)
    rounds = 4
    overrides = {**BASE, "num-server-rounds": rounds, "output-dir": str(tmp_path), "run-name": "die"}
    worker = next(n for n in cluster.nodes if not n.head)
    killed: list[int] = []

    def kill_after_round_1() -> None:
        ckpt = tmp_path / "die"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (ckpt / "checkpoint.pt").exists():  # written after round 1's aggregation
                killed.extend(cluster.kill_node(worker.name))
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_after_round_1, daemon=True)
    watcher.start()
    summary = run_simulation(overrides, num_supernodes=4, timeout=600, log_file=tmp_path / "flwr.log",
                             ray_address=cluster.address, app_dir=app)
    watcher.join(timeout=5)
    assert killed, "the worker node was never killed"
    rows = json.loads((tmp_path / "die" / "rounds.json").read_text())
    assert len(rows) == rounds and summary["rounds"] == rounds
    assert rows[0]["accepted"] == 4
    assert summary["failed_replies"] >= 1
    # every round after the failure still aggregated the replies that arrived
    assert all(r["accepted"] >= 1 and r["accepted"] + r["failed"] + r["rejected"] <= r["sampled"] for r in rows)
    assert all(r["clients_state_refused"] == 0 for r in rows)
    # the wrapper logs each failed reply with its Flower node and Ray's reason (the actor/node that died)
    log_text = (tmp_path / "flwr.log").read_text(errors="replace")
    assert re.search(r"round \d+: node \d+ replied with an error", log_text)  # the node is named
