"""Start and stop Flower processes ourselves: free ports, a private FLWR_HOME, no leftovers.

``flwr run .`` with Flower's default local connection starts a detached SuperLink
on fixed ports that keeps running after the run. Instead, :class:`FlowerProcesses`
starts every process itself (its own session, so its whole tree can be signalled),
remembers each PID, and stops all of them — and every descendant found under
``/proc`` (Ray workers, ServerApp/ClientApp subprocesses) — on exit, also when
the run fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Logged by :meth:`FlowerProcesses.run_app` once ``flwr run`` is started and its PID recorded.
RUN_STARTED = "flwr run"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS SuperLink: the CA that signed the server certificate, and the server's pair."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # field 4 (ppid) follows the parenthesised command name
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def toml_value(v: Any) -> str:
    """A value as TOML (for ``--run-config``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class FlowerProcesses:
    """Owns every Flower process it starts; :meth:`close` stops them all by PID.

    Parameters
    ----------
    home:
        FLWR_HOME to use; a fresh temporary folder when None (removed on close).
    """

    def __init__(self, home: Path | None = None) -> None:
        self._tmp = None if home is not None else tempfile.TemporaryDirectory(prefix="conef-flwr-home-")
        self.home = Path(home) if home is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.home.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.federation_config: dict[str, Any] = {}
        self.logs: list[Path] = []
        self.superlink_port: int | None = None
        self.superlink_address: str | None = None
        self.superlink_proc: subprocess.Popen | None = None
        #: extra environment for every process started here (e.g. ``RAY_ADDRESS`` of an existing Ray cluster)
        self.extra_env: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for Flower commands: private FLWR_HOME, no dependency install, no update check."""
        env = os.environ.copy()
        env["FLWR_HOME"] = str(self.home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")
        # the app runs from a copy under FLWR_HOME: name the shared data root explicitly
        env.setdefault("CONEF_DATA_DIR", str((REPO / ".." / "shared" / "data").resolve()))
        env.setdefault("RAY_DEDUP_LOGS", "0")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        # Flower starts helpers (flower-superexec, flwr-serverapp, ...) by name: use this interpreter's bin
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(self.extra_env)
        return env

    def start(self, name: str, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a process in its own session, output to ``<home>/<name>.log``."""
        logf = self.home / f"{name}.log"
        self.logs.append(logf)
        fh = logf.open("ab")
        proc = subprocess.Popen(
            list(args), env=dict(env or self.env), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(REPO),
        )
        fh.close()
        self.procs.append(proc)
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return proc

    def start_simulation_superlink(self, *, num_supernodes: int, num_cpus_per_client: int = 1) -> str:
        """Start ``flower-superlink --simulation`` on free ports; return a connection name for ``flwr run``."""
        port = free_port()
        args = [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port),
            "--control-api-address", f"127.0.0.1:{free_port()}",
            "--fleet-api-address", f"127.0.0.1:{free_port()}",
            "--disable-runtime-dependency-installation",
        ]
        proc = self.start("superlink", args)
        self.write_connection("sim", f"127.0.0.1:{port}", insecure=True)
        self.federation_config = {
            "num-supernodes": num_supernodes,
            "client-resources-num-cpus": num_cpus_per_client,
        }
        self.wait_healthy(port, proc)
        return "sim"

    def start_superlink(
        self, *, tls: TlsFiles | None = None, auth: bool = False, connection: str = "deploy",
        host: str = "127.0.0.1", port: int | None = None,
    ) -> str:
        """Start a deployment-mode ``flower-superlink`` (not ``--simulation``); return a connection name.

        One HTTP port serves the Fleet, Control and Runtime APIs. Runtime dependency
        installation is disabled. With ``tls`` the SuperLink serves HTTPS with those
        files and the connection written to ``config.toml`` trusts ``tls.ca_cert``;
        with ``auth`` only SuperNodes whose public key was registered
        (:meth:`register_supernode`) may connect.
        """
        self.superlink_port = port or free_port()
        self.superlink_address = f"{host}:{self.superlink_port}"
        args = [_bin("flower-superlink"), "--host", host, "--port", str(self.superlink_port),
                "--disable-runtime-dependency-installation"]
        if tls is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                     "--ssl-keyfile", str(tls.server_key)]
        if auth:
            args.append("--enable-supernode-auth")
        proc = self.superlink_proc = self.start("superlink", args)
        self.write_connection(connection, self.superlink_address, insecure=tls is None,
                              root_certificates=str(tls.ca_cert) if tls is not None else None)
        self.wait_healthy(self.superlink_port, proc, scheme="http" if tls is None else "https")
        return connection

    def start_supernode(
        self, name: str, *, superlink: str | None = None, node_config: Mapping[str, Any] | None = None,
        root_certificates: Path | str | None = None, private_key: Path | str | None = None,
        port: int | None = None, max_retries: int | None = None, own_home: bool = True,
    ) -> subprocess.Popen:
        """Start ``flower-supernode`` connected to ``superlink`` (default: the SuperLink started here).

        ``node_config`` (e.g. ``{"partition-id": 0, "num-partitions": 2}``) becomes
        ``--node-config``; each SuperNode gets its own ``--port`` (its local
        ClientApp API) and, with ``own_home``, its own FLWR_HOME under this one,
        as on separate devices. Without ``root_certificates`` it connects insecurely.
        """
        address = superlink or self.superlink_address
        if address is None:
            raise ValueError("superlink address is unknown: start a SuperLink first or pass superlink='host:port'")
        args = [_bin("flower-supernode"), "--superlink", address, "--port", str(port or free_port())]
        if root_certificates is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(Path(root_certificates).resolve())]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
        if node_config:
            args += ["--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        env = self.env
        if own_home:
            node_home = self.home / name
            node_home.mkdir(parents=True, exist_ok=True)
            env["FLWR_HOME"] = str(node_home)
        return self.start(name, args, env=env)

    def register_supernode(self, public_key: Path | str, connection: str, *, timeout: float = 60.0) -> str:
        """``flwr supernode register <public_key> <connection>``; returns its output, raises if it fails."""
        args = [_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), connection]
        res = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
        if res.returncode != 0:
            raise RuntimeError(
                f"flwr supernode register {public_key} exited with {res.returncode}:\n{res.stdout}\n{res.stderr}"
            )
        log.info("registered SuperNode key %s", public_key)
        return res.stdout

    def write_connection(
        self, name: str, address: str, *, insecure: bool = True, root_certificates: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``<FLWR_HOME>/config.toml`` with one connection ``name`` (the default)."""
        lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
        lines.append(f"insecure = {'true' if insecure else 'false'}")
        if root_certificates:
            lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
        for k, v in (options or {}).items():
            lines.append(f"options.{k} = {toml_value(v)}")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def wait_healthy(self, port: int, proc: subprocess.Popen, timeout: float = 60.0, scheme: str = "http") -> None:
        """Wait until the SuperLink answers on ``/health`` (or fail with its log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}; log:\n{self.tail()}")
            try:
                ctx = None
                if scheme == "https":
                    import ssl

                    ctx = ssl._create_unverified_context()  # health probe only
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"SuperLink on port {port} not healthy after {timeout:.0f}s; log:\n{self.tail()}")

    def run_app(
        self, connection: str, run_config: Mapping[str, Any] | None = None, *, app_dir: Path = REPO,
        timeout: float | None = None, stream_to: Path | None = None, watch: Sequence[subprocess.Popen] = (),
    ) -> int:
        """``flwr run <app> <connection> --stream`` with overrides; returns its exit code.

        Processes in ``watch`` (the SuperLink, SuperNodes) must stay up while the run
        lasts: if one exits, a :class:`RuntimeError` with the logs is raised at once
        instead of waiting for ``timeout``.
        """
        args = [_bin("flwr"), "run", str(app_dir), connection, "--stream"]
        if run_config:
            args += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
        if self.federation_config:
            args += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in self.federation_config.items())]
        log.info("running: %s", " ".join(args))
        out = None if stream_to is None else stream_to.open("ab")
        try:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
                                    start_new_session=True)
            self.procs.append(proc)
            # after the PID is recorded: from here on a signal to this process cannot orphan ``flwr run``
            log.info("%s (pid %d) started", RUN_STARTED, proc.pid)
            if not watch:
                return proc.wait(timeout=timeout)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=0.5)
                dead = [w for w in watch if w.poll() is not None]
                if dead:
                    codes = ", ".join(f"pid {w.pid} exited with {w.returncode}" for w in dead)
                    raise RuntimeError(f"a Flower process stopped during the run ({codes}); logs:\n{self.tail()}")
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(args, timeout or 0.0)
        finally:
            if out is not None:
                out.close()

    def tail(self, n: int = 60) -> str:
        """The last lines of every log this object wrote."""
        chunks = []
        for p in self.logs:
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                chunks.append(f"--- {p.name} ---\n" + "\n".join(lines))
        return "\n".join(chunks)

    def close(self) -> list[int]:
        """Stop every process started here and all their descendants; return the PIDs signalled."""
        pids: list[int] = []
        for proc in self.procs:
            if proc.poll() is None:
                pids += [proc.pid, *descendants(proc.pid)]
            else:
                pids += descendants(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in pids if _alive(p)]
            if not alive:
                break
            for p in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if proc.poll() is None:
                        os.killpg(proc.pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_alive(p) for p in alive):
                time.sleep(0.2)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        left = [p for p in pids if _alive(p)]
        if left:
            log.warning("processes still alive after SIGKILL: %s", left)
        if self._tmp is not None:
            self._tmp.cleanup()
        return pids

    def __enter__(self) -> FlowerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_pids(pids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM ``pids``, then SIGKILL what is still alive after ``grace`` seconds; return those still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _alive(p)]
        for p in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process (Linux ``/proc``)."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def simulation(
    num_supernodes: int, home: Path | None = None, *, ray_address: str | None = None
) -> Iterator[tuple[FlowerProcesses, str]]:
    """A running simulation SuperLink; everything is stopped when the block exits.

    With ``ray_address`` (``host:port`` of a running Ray head) the simulation joins
    that cluster instead of starting a private Ray instance: Flower 1.41's
    ``flwr run`` passes no ``address`` to ``ray.init``, so it goes in as
    ``RAY_ADDRESS``, which ``ray.init()`` reads.
    """
    fp = FlowerProcesses(home)
    if ray_address:
        fp.extra_env["RAY_ADDRESS"] = ray_address
    try:
        conn = fp.start_simulation_superlink(num_supernodes=num_supernodes)
        yield fp, conn
    finally:
        fp.close()
