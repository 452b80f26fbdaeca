"""A Ray cluster of several nodes on this machine, started with ``ray start`` and stopped by PID.

Flower's simulation engine runs its ClientApps as Ray actors. On a real cluster
one machine runs ``ray start --head`` and every other machine ``ray start
--address=HEAD:PORT``; here each node is a separate ``ray start`` with its own
``--num-cpus`` and temp dir, which is how two machines look to Ray.

``ray start`` daemonizes: its processes (GCS, raylet, log monitor, dashboard,
agents and later the worker processes that host ClientApp actors) are re-parented
to init and outlive the command. ``ray stop`` kills *every* Ray process of the
user on the machine — other people's clusters included — so it is never used
here. Instead each ``ray start`` runs in a session of its own
(``start_new_session``); the daemons keep that session id, and so do the workers
the raylet forks. :meth:`LocalRayCluster.stop` signals every process whose session
is one of ours or whose command line names one of our temp dirs, by PID, first
SIGTERM then SIGKILL, and reports any survivor.

    with LocalRayCluster(num_nodes=2, cpus_per_node=1) as cluster:
        summary = run_simulation({...}, num_supernodes=4, ray_address=cluster.address)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sim.flower_runtime import stop_pids

log = logging.getLogger(__name__)

#: How long :func:`check_ray_address` waits for a TCP connection to the head's GCS port.
CONNECT_TIMEOUT_S = 3.0


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else "ray"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; ``ValueError`` naming the address otherwise."""
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {address!r} is not valid; allowed: 'host:port' with port 1..65535")
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when nothing listens at the Ray head ``address``.

    ``ray.init(address=...)`` retries an unreachable GCS for about a minute before
    it gives up; this TCP probe runs first so that a wrong address is reported
    at once.

    Raises
    ------
    ValueError
        ``address`` is not ``host:port``.
    ConnectionError
        Nothing accepts a connection at ``address`` within ``timeout`` seconds;
        the message names the address.
    """
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise ConnectionError(
            f"the Ray cluster at {address} cannot be reached ({exc.strerror or exc}); start it with "
            f"'ray start --head --port={port}' on {host}, or pass the address that 'ray start' printed"
        ) from None


@dataclass
class RayNode:
    """One ``ray start`` of a :class:`LocalRayCluster`."""

    name: str
    temp_dir: Path
    session_id: int
    num_cpus: int
    head: bool


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of ``pid`` from ``/proc/<pid>/stat``; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[3])  # state, ppid, pgrp, session


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _live(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


@dataclass
class LocalRayCluster:
    """A head node and ``num_nodes - 1`` worker nodes on this machine; every process stopped by PID.

    Parameters
    ----------
    num_nodes:
        Ray nodes to start (the first is the head), >= 1.
    cpus_per_node:
        ``--num-cpus`` of each node (the CPUs Ray may schedule there), >= 1.
    base_dir:
        Folder for the nodes' temp dirs; a fresh short folder under /tmp when None
        (removed by :meth:`stop`). Ray's Unix sockets live there, so the path must
        stay short (under ~60 characters).
    """

    num_nodes: int = 2
    cpus_per_node: int = 1
    base_dir: Path | None = None
    nodes: list[RayNode] = field(default_factory=list)
    address: str = ""
    _own_dir: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ValueError(f"num_nodes={self.num_nodes!r} is out of range; allowed: integer >= 1")
        if isinstance(self.cpus_per_node, bool) or not isinstance(self.cpus_per_node, int) or self.cpus_per_node < 1:
            raise ValueError(f"cpus_per_node={self.cpus_per_node!r} is out of range; allowed: integer >= 1")

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 120.0) -> str:
        """Start the head, then the workers; return the head's ``host:port`` (also in :attr:`address`)."""
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="conef-ray-", dir="/tmp"))
            self._own_dir = True
        try:
            port = _free_port()
            self.address = f"127.0.0.1:{port}"
            self._start_node("head", [
                "--head", f"--port={port}", "--include-dashboard=false",
                f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
            ], timeout)
            for i in range(1, self.num_nodes):
                self._start_node(f"worker{i}", [f"--address={self.address}"], timeout)
            self.wait_for_nodes(self.num_nodes, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Ray cluster at %s: %d nodes x %d CPUs", self.address, self.num_nodes, self.cpus_per_node)
        return self.address

    def _start_node(self, name: str, args: list[str], timeout: float) -> RayNode:
        assert self.base_dir is not None
        temp_dir = self.base_dir / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            _ray_bin(), "start", *args, f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        ]
        env = os.environ.copy()
        env.pop("RAY_ADDRESS", None)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        logf = self.base_dir / f"{name}.start.log"
        with logf.open("wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = RayNode(name, temp_dir, proc.pid, self.cpus_per_node, head=not self.nodes)
        self.nodes.append(node)  # before waiting: stop() must find its processes even if the start fails
        log.info("ray start (%s, session %d): %s", name, proc.pid, " ".join(cmd))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise TimeoutError(f"'ray start' for {name} did not finish in {timeout:.0f}s; log:\n"
                               f"{logf.read_text(errors='replace')[-3000:]}") from None
        if code != 0:
            raise RuntimeError(f"'ray start' for {name} exited with {code}; log:\n"
                               f"{logf.read_text(errors='replace')[-3000:]}")
        return node

    def node_ids(self) -> list[str]:
        """Hex ids of the alive nodes, as the GCS lists them (``ray list nodes`` without the dashboard)."""
        out = subprocess.run(
            [sys.executable, "-c", _LIST_NODES, self.address], capture_output=True, text=True, timeout=60,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        if out.returncode != 0:
            raise RuntimeError(f"listing the nodes of {self.address} failed:\n{out.stderr[-2000:]}")
        return [line for line in out.stdout.split() if line]

    def wait_for_nodes(self, n: int, timeout: float = 60.0) -> list[str]:
        """Wait until ``n`` nodes are alive; return their ids."""
        deadline = time.monotonic() + timeout
        ids: list[str] = []
        while time.monotonic() < deadline:
            ids = self.node_ids()
            if len(ids) >= n:
                return ids
            time.sleep(1.0)
        raise TimeoutError(f"{len(ids)} of {n} Ray nodes alive at {self.address} after {timeout:.0f}s")

    # ------------------------------------------------------------------ processes
    def node_pids(self, node: RayNode) -> list[int]:
        """Live processes of ``node``: its ``ray start`` session, or a command line naming its temp dir."""
        needle = str(node.temp_dir)
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            st = _stat(pid)
            if st is None or st[0] == "Z":
                continue
            if st[1] == node.session_id or needle in _cmdline(pid):
                out.append(pid)
        return sorted(out)

    def pids(self) -> list[int]:
        """Every live process of every node."""
        return sorted({p for node in self.nodes for p in self.node_pids(node)})

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Kill every process of one node (a machine that fails); return the PIDs signalled."""
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            raise ValueError(f"no Ray node {name!r}; nodes: {[n.name for n in self.nodes]}")
        pids = self.node_pids(node)
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        log.warning("killed Ray node %s (pids %s)", name, pids)
        return pids

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM, then SIGKILL, every process of every node; return all PIDs signalled.

        Workers first, the head last (a raylet whose GCS vanished first logs
        errors but exits all the same). Processes still alive after SIGKILL are
        logged as a warning. The temp dirs are removed when this object made them.
        """
        signalled: list[int] = []
        for node in reversed(self.nodes):
            for _ in range(2):  # the second pass: processes that appeared while the first stopped the node
                alive = self.node_pids(node)
                if not alive:
                    break
                signalled += [p for p in alive if p not in signalled]
                stop_pids(alive, grace)
        left = [p for p in signalled if _live(p)]
        if left:
            log.warning("Ray processes still alive after SIGKILL: %s", left)
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        return signalled

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Run in a subprocess (so this process never becomes a Ray driver): print the alive nodes' ids.
_LIST_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print("\\n".join(n["NodeID"] for n in ray.nodes() if n["Alive"]))
ray.shutdown()
"""
