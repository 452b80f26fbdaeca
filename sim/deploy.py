"""Deployment mode on loopback: one SuperLink, N SuperNodes, the app run over them with ``flwr run``.

    python -m sim.deploy --supernodes 2 --set num-server-rounds=2 --set fraction-train=1.0
    python -m sim.deploy --supernodes 3 --tls --auth --set num-server-rounds=3 --set local-epochs=1

This is the same process layout as a real deployment (SuperLink on the server,
one SuperNode per device, ``flwr run`` from the operator's machine; see
``docs/deploy.md``), all on 127.0.0.1 with free ports. SuperNode ``i`` gets
``--node-config "partition-id=i num-partitions=N"``. With ``--tls`` a throw-away
CA and server certificate (SAN 127.0.0.1, localhost) are made with ``openssl``;
with ``--auth`` each SuperNode gets an ECDSA P-384 key pair from ``ssh-keygen``,
the SuperLink runs with ``--enable-supernode-auth`` and each public key is
registered with ``flwr supernode register``. Everything lives in a private
FLWR_HOME (removed at the end); runtime dependency installation is disabled.
Every process started is stopped by PID at the end — also on failure, Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.flower_runtime import FlowerProcesses, TlsFiles
from sim.run import app_defaults, format_summary, parse_set

log = logging.getLogger("sim.deploy")

def missing_tools(tls: bool, auth: bool) -> list[str]:
    """The external programs ``--tls`` / ``--auth`` need that are not on PATH."""
    need = (["openssl"] if tls else []) + (["ssh-keygen"] if auth else [])
    return [t for t in need if shutil.which(t) is None]


def _check_call(args: list[str]) -> None:
    res = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {res.returncode}:\n{res.stdout}\n{res.stderr}")


def make_tls_files(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 2) -> TlsFiles:
    """A self-signed CA and a server certificate it signed, with ``hosts`` as subject alternative names.

    Keys are EC P-256, unencrypted, made with ``openssl``; for a real server pass
    its IP addresses / DNS names as ``hosts``.
    """
    if not hosts:
        raise ValueError("hosts must name at least one IP address or DNS name for the certificate")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _check_call(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert),
                 "-days", str(days), "-subj", "/CN=conef-fl deployment CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    _check_call(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}"])
    sans = ",".join(("IP:" if _is_ip(h) else "DNS:") + h for h in hosts)
    ext = folder / "server.ext"
    ext.write_text(
        f"subjectAltName={sans}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _check_call(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext)])
    return TlsFiles(ca_cert=ca_cert, server_cert=cert, server_key=key)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair for SuperNode authentication (``ssh-keygen``); returns (private, public)."""
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / name
    _check_call(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", str(private)])
    return private, private.with_name(name + ".pub")


@dataclass
class DeploymentResult:
    """What a deployment run produced, for the CLI and the tests."""

    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    seconds: float
    #: exit code of each SuperNode started with an unregistered key (None: still running when checked).
    unregistered_exit_codes: list[int | None] = field(default_factory=list)
    #: SuperLink log lines about refused node activations (HTTP 412, ``ApiError:2004``).
    superlink_refusals: list[str] = field(default_factory=list)
    #: log tail of each unregistered SuperNode.
    unregistered_logs: list[str] = field(default_factory=list)
    #: every PID :meth:`FlowerProcesses.close` signalled (SuperLink, SuperNodes, SuperExecs, apps, flwr run).
    stopped_pids: list[int] = field(default_factory=list)
    #: the run's output folder (``summary.json``, ``rounds.json``, ``model.pt``, ``checkpoint.pt``).
    run_dir: Path | None = None


def run_config_for(overrides: dict[str, Any], num_supernodes: int) -> tuple[dict[str, Any], Path]:
    """The run config for ``flwr run`` (wait for all N nodes, absolute output-dir, a run-name) and the run folder."""
    defaults = app_defaults()
    cfg = dict(overrides)
    cfg.setdefault("min-available-nodes", num_supernodes)
    run_name = str(cfg.get("run-name") or f"deploy-{cfg.get('method', defaults['method'])}-{int(time.time())}")
    cfg["run-name"] = run_name
    out_root = Path(str(cfg.get("output-dir", defaults["output-dir"])))
    if not out_root.is_absolute():
        out_root = (Path.cwd() / out_root).resolve()
    cfg["output-dir"] = str(out_root)
    return cfg, out_root / run_name


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def run_deployment(
    overrides: dict[str, Any], *, num_supernodes: int, tls: bool = False, auth: bool = False,
    unregistered: int = 0, timeout: float | None = None, log_file: Path | None = None, home: Path | None = None,
    node_configs: Sequence[Mapping[str, Any]] = (),
    throttle_mbit: float | None = None, throttle_down_mbit: float | None = None,
    throttle_events: Path | None = None, throttle_alternate: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> DeploymentResult:
    """Start a SuperLink and ``num_supernodes`` SuperNodes on loopback, run the app, stop everything.

    Parameters
    ----------
    overrides:
        Run-config values (``[tool.flwr.app.config]`` keys); each SuperNode gets ``partition-id`` and
        ``num-partitions = num_supernodes`` in its node config.
    tls, auth:
        HTTPS with a throw-away CA; SuperNode authentication with registered ECDSA keys.
    unregistered:
        With ``auth``: this many extra SuperNodes with keys that are *not* registered
        (they must be refused; their exit codes are returned).
    timeout:
        Seconds to allow ``flwr run``.
    log_file:
        Where ``flwr run --stream`` output goes (None: this process's stdout).
    home:
        FLWR_HOME to use (kept); a temporary one (removed) when None.
    node_configs:
        Extra node-config keys per SuperNode (e.g. its own ``state-dir``, as on separate devices): empty, or
        one mapping per SuperNode.
    throttle_mbit, throttle_down_mbit:
        Not None: each SuperNode reaches the SuperLink through its own rate-limited link, a
        :mod:`sim.throttle` proxy process (``throttle_mbit`` Mbit/s up, ``throttle_down_mbit`` down, default
        the same; 0 = unlimited, the proxy still counts bytes). TLS passes through unchanged.
    throttle_events:
        Where the proxy writes its byte counts and chunk log at the end (with ``throttle_mbit``).
    throttle_alternate:
        With ``throttle_mbit``: each link switches between unlimited and the rate at every exchange
        (:class:`sim.throttle.Alternation`; rounds 1, 3, ... unlimited, 2, 4, ... throttled).
    extra_env:
        Environment variables for every process started (SuperLink, SuperNodes and what they start, ``flwr
        run``), e.g. ``{"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}``: how often each SuperNode's SuperExec
        asks for a ClientApp task (Flower 1.41 reads it; default 1 s, allowed 0.01–60).

    Raises
    ------
    RuntimeError
        A process failed, or the run ended without writing ``summary.json``.
    """
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes={num_supernodes} is out of range; allowed: >= 1")
    if unregistered and not auth:
        raise ValueError("unregistered SuperNodes are only refused with auth=True")
    if node_configs and len(node_configs) != num_supernodes:
        raise ValueError(f"node_configs has {len(node_configs)} entries; allowed: 0 or num_supernodes="
                         f"{num_supernodes}")
    missing = missing_tools(tls, auth)
    if missing:
        raise RuntimeError(f"missing programs for --tls/--auth: {', '.join(missing)}")
    cfg, run_dir = run_config_for(overrides, num_supernodes)
    t0 = time.monotonic()
    fp = FlowerProcesses(home)
    fp.extra_env.update(extra_env or {})
    result: DeploymentResult | None = None
    try:
        secrets = fp.home / "secrets"
        tls_files = make_tls_files(secrets) if tls else None
        conn = fp.start_superlink(tls=tls_files, auth=auth)
        root = tls_files.ca_cert if tls_files is not None else None
        addresses = [None] * num_supernodes
        if throttle_mbit is not None:
            addresses = start_throttle(fp, num_supernodes, throttle_mbit, throttle_down_mbit, throttle_events,
                                       alternate=throttle_alternate)
        nodes = []
        for i in range(num_supernodes):
            key = None
            if auth:
                key, pub = make_supernode_key(secrets, f"supernode-{i}")
                fp.register_supernode(pub, conn)
            extra = dict(node_configs[i]) if node_configs else {}
            nodes.append(fp.start_supernode(
                f"supernode-{i}", node_config={**extra, "partition-id": i, "num-partitions": num_supernodes},
                root_certificates=root, private_key=key, superlink=addresses[i],
            ))
        intruders = []
        for j in range(unregistered):
            key, _ = make_supernode_key(secrets, f"unregistered-{j}")
            intruders.append(fp.start_supernode(
                f"unregistered-{j}", node_config={"partition-id": 0, "num-partitions": num_supernodes},
                root_certificates=root, private_key=key,
            ))
        assert fp.superlink_proc is not None
        code = fp.run_app(conn, cfg, timeout=timeout, stream_to=log_file, watch=[fp.superlink_proc, *nodes])
        if code != 0:
            raise RuntimeError(f"flwr run exited with {code}; logs:\n{fp.tail()}")
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            raise RuntimeError(f"the run finished but wrote no summary at {summary_path}; logs:\n{fp.tail()}")
        rounds_path = run_dir / "rounds.json"
        result = DeploymentResult(
            summary=json.loads(summary_path.read_text()),
            rounds=json.loads(rounds_path.read_text()) if rounds_path.exists() else [],
            seconds=time.monotonic() - t0,
            unregistered_exit_codes=[_wait_exit(p, 30.0) for p in intruders],
            run_dir=run_dir,
        )
        sl_log = (fp.home / "superlink.log").read_text(errors="replace").splitlines()
        result.superlink_refusals = [
            ln for ln in sl_log if "/v1/fleet/activate-node" in ln and (" 412" in ln or "ApiError" in ln)
        ]
        result.unregistered_logs = [
            (fp.home / f"unregistered-{j}.log").read_text(errors="replace")[-4000:] for j in range(unregistered)
        ]
    finally:
        stopped = fp.close()
    result.stopped_pids = stopped
    return result


def start_throttle(fp: FlowerProcesses, links: int, mbit: float, down_mbit: float | None,
                   events: Path | None, timeout: float = 60.0, *, alternate: bool = False) -> list[str]:
    """Start a :mod:`sim.throttle` proxy in front of ``fp``'s SuperLink (stopped by ``fp.close``, by PID);
    return one ``127.0.0.1:port`` per link once it listens."""
    if fp.superlink_address is None:
        raise ValueError("start the SuperLink before the throttle")
    ready = fp.home / "throttle-ports.json"
    args = [sys.executable, "-m", "sim.throttle", "--target", fp.superlink_address, "--listeners", str(links),
            "--mbit", str(mbit), "--ready-file", str(ready), "--record"]
    if down_mbit is not None:
        args += ["--down-mbit", str(down_mbit)]
    if events is not None:
        args += ["--events-file", str(Path(events).resolve())]
    if alternate:
        args.append("--alternate")
    proc = fp.start("throttle", args)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the throttle exited with {proc.returncode}; logs:\n{fp.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the throttle did not listen within {timeout:.0f} s; logs:\n{fp.tail()}")
        time.sleep(0.05)
    return [f"127.0.0.1:{p}" for p in json.loads(ready.read_text())["ports"]]


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM / SIGHUP raise ``SystemExit`` (like Ctrl-C raises ``KeyboardInterrupt``), so cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C must stop the deployment even when we were started with SIGINT ignored (e.g. as a background
    # job of a non-interactive shell, where Python does not install its KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernodes", type=int, default=2, help="SuperNodes to start (default: %(default)s)")
    ap.add_argument("--tls", action="store_true", help="HTTPS with a CA and server certificate made now")
    ap.add_argument("--auth", action="store_true", help="SuperNode authentication with registered ECDSA keys")
    ap.add_argument("--unregistered", type=int, default=0,
                    help="with --auth: extra SuperNodes whose keys are not registered (they must be refused)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an app config value (pyproject [tool.flwr.app.config]); repeatable")
    ap.add_argument("--timeout", type=float, default=None, help="give up on flwr run after this many seconds")
    args = ap.parse_args(argv)
    if args.supernodes < 1:
        ap.error(f"--supernodes={args.supernodes} is out of range; allowed: >= 1")
    if args.unregistered and not args.auth:
        ap.error("--unregistered needs --auth")
    overrides = parse_set(args.set)
    if overrides.get("num-partitions", 0) not in (0, args.supernodes):
        ap.error("num-partitions comes from --supernodes (each SuperNode's --node-config); do not --set it")
    try:
        with signals_raise():
            res = run_deployment(overrides, num_supernodes=args.supernodes, tls=args.tls, auth=args.auth,
                                 unregistered=args.unregistered, timeout=args.timeout)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; every process started was stopped")
        return 130
    except SystemExit as exc:  # SIGTERM / SIGHUP via signals_raise
        log.error("terminated (exit %s); every process started was stopped", exc.code)
        raise
    print(format_summary(res.summary))
    mode = ", ".join(m for m, on in (("TLS", args.tls), ("SuperNode auth", args.auth)) if on) or "insecure"
    print(f"  deployment            {args.supernodes} SuperNodes on loopback ({mode}), {res.seconds:.0f} s in all")
    for j, code in enumerate(res.unregistered_exit_codes):
        print(f"  unregistered node {j}   exit code {code} (refused)" if code else
              f"  unregistered node {j}   exit code {code} (NOT refused)")
    print(json.dumps(res.summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
