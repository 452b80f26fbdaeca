"""Many virtual clients on Flower's simulation engine, the host memory their error states take, and a memory guard.

    # 10,000 clients of a 1.07M-parameter MLP, 100 per round (cyclic), each trains once:
    python -m sim.scale --num-supernodes 10000 --clients-per-round 100 --model mlp-wide \\
        --methods conef-cs,efsgd,conef-cs+disk --disk-supernodes 2000 --save

Per method, one simulation of the project's ServerApp and ClientApp (``--model``
is the app's ``model`` key: ``mlp-wide`` is the 1.07M-parameter MLP for MNIST;
default ``auto``) on MNIST (digits when MNIST is absent) in which every client trains
once: ``sampling=cyclic`` with ``fraction-train = clients-per-round / N`` for
``ceil(N / clients-per-round)`` rounds, one local step of a small batch, central
evaluation only after the last round. Every client's error state is real: it is
``conef_mod``'s state in the node's ``context.state``, all of which Flower keeps
in the ``flwr-simulation`` process. ``<method>+disk`` sets ``state-dir`` as well.

Measured: the peak resident memory (VmRSS polled from /proc) of that process and
of all processes of the run, the lowest MemAvailable, the per-client and total
serialized state bytes (as the clients report them), the wall time, and the RSS
against the number of clients that hold state (from the round log).

The :class:`MemoryGuard` stops a run before the kernel's OOM killer would: when
the simulation process's RSS passes ``--max-rss-gb`` or MemAvailable falls below
``--min-available-gb``, it kills every process of the run by PID (the simulation
process first) and the result records the size at which it stopped: rounds
completed, clients holding state, RSS at the stop.

Results go to ``--out`` (default ``outputs/scale/scale_<N>.json``); ``--save``
writes ``docs/results/scale_<N>.json`` and ``.md`` instead. An existing file is
never overwritten without ``--save`` or ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conef_fl.app_config import MODELS, check_key
from sim.flower_runtime import REPO, descendants, pid_alive
from sim.tables import markdown_table

log = logging.getLogger("sim.scale")

GIB = 1024**3
#: ``model`` values of results written before ``mlp-wide`` was an app model.
_LEGACY_MODELS = {"mlp-784-1024-256-10": "mlp-wide", "project": "auto"}
#: The simulation process (holds every node's Context) is recognised by this in its command line.
SIM_NEEDLE = "flwr-simulation"
_ROUND_RE = re.compile(r"round (\d+): accepted (\d+)/(\d+) replies")
_STATE_RE = re.compile(r"client error state ([\d.]+) KB")


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def clients_done(log_file: Path | None) -> tuple[int, int]:
    """(rounds completed, replies accepted so far) from the ServerApp's round log lines."""
    if log_file is None or not log_file.exists():
        return 0, 0
    rounds, accepted = 0, 0
    for m in _ROUND_RE.finditer(log_file.read_text(errors="replace")):
        rounds, accepted = max(rounds, int(m.group(1))), accepted + int(m.group(2))
    return rounds, accepted


@dataclass
class GuardStop:
    """Where a :class:`MemoryGuard` stopped a run."""

    reason: str
    sim_rss_bytes: int
    mem_available_bytes: int
    rounds_completed: int
    clients_with_state: int
    seconds: float
    pids_signalled: list[int] = field(default_factory=list)


class MemoryGuard(threading.Thread):
    """Polls the run's processes; stops the run by PID before memory runs out.

    Parameters
    ----------
    max_rss:
        Stop when the simulation process's RSS exceeds this many bytes (0 = off).
    min_available:
        Stop when the system's MemAvailable falls below this many bytes (0 = off).
    log_file:
        The run's streamed log, for the rounds and clients completed (optional).
    root:
        Watch the descendants of this PID (default: this process) that appear after
        the guard is created; only those are ever signalled.
    interval:
        Seconds between polls.

    Raises
    ------
    ValueError
        A negative limit or a non-positive interval.
    """

    def __init__(self, max_rss: int = 0, min_available: int = 0, *, log_file: Path | None = None,
                 root: int | None = None, interval: float = 0.25, needle: str = SIM_NEEDLE) -> None:
        super().__init__(daemon=True)
        if max_rss < 0 or min_available < 0:
            raise ValueError(f"max_rss={max_rss}, min_available={min_available}: allowed: >= 0 bytes (0 = off)")
        if not interval > 0:
            raise ValueError(f"interval={interval!r} is out of range; allowed: > 0 seconds")
        self.max_rss, self.min_available = int(max_rss), int(min_available)
        self.log_file, self.root, self.interval, self.needle = log_file, root or os.getpid(), interval, needle
        self.peak_rss = 0
        self.peak_total_rss = 0
        self.min_mem_available = mem_available()
        self.samples: list[tuple[float, int, int]] = []  # (seconds, clients with state, simulation RSS)
        self.stopped: GuardStop | None = None
        self._t0 = time.monotonic()
        self._halt = threading.Event()
        #: processes that existed before: never signalled (e.g. a test runner's helpers)
        self._preexisting = set(descendants(self.root))

    def run(self) -> None:
        last_sample = -1e9
        while not self._halt.is_set():
            pids = [p for p in descendants(self.root) if p not in self._preexisting]
            sim = [p for p in pids if self.needle in _cmdline(p)]
            sim_rss = max((_rss(p) for p in sim), default=0)
            total = sum(_rss(p) for p in pids)
            avail = mem_available()
            self.peak_rss = max(self.peak_rss, sim_rss)
            self.peak_total_rss = max(self.peak_total_rss, total)
            if avail:
                self.min_mem_available = min(self.min_mem_available, avail)
            now = time.monotonic() - self._t0
            reason = ""
            if self.max_rss and sim_rss > self.max_rss:
                reason = f"simulation process RSS {sim_rss / GIB:.2f} GiB > limit {self.max_rss / GIB:.2f} GiB"
            elif self.min_available and avail and avail < self.min_available and sim:
                reason = f"MemAvailable {avail / GIB:.2f} GiB < floor {self.min_available / GIB:.2f} GiB"
            if reason:
                rounds, clients = clients_done(self.log_file)
                signalled = self._stop_run(sim, pids)
                self.stopped = GuardStop(reason, sim_rss, avail, rounds, clients, now, signalled)
                log.warning("memory guard: %s; stopped the run after %d rounds, %d clients holding state "
                            "(pids %s)", reason, rounds, clients, signalled)
                return
            if now - last_sample >= 5.0 and sim:
                self.samples.append((round(now, 1), clients_done(self.log_file)[1], sim_rss))
                last_sample = now
            self._halt.wait(self.interval)

    def _stop_run(self, sim: list[int], pids: list[int]) -> list[int]:
        """SIGKILL the simulation process (it holds the memory), then SIGTERM/SIGKILL the rest of the run."""
        for p in sim:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        rest = [p for p in pids if p not in sim]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in rest if pid_alive(p)]
            for p in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(pid_alive(p) for p in alive):
                time.sleep(0.1)
        return [*sim, *rest]

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round rows of a run: ``rounds.json`` when it finished, else its last checkpoint's history.

    The ServerApp checkpoints after every round, so a run stopped by the guard or
    ``--timeout`` still tells exactly what its completed rounds did.
    """
    if (run_dir / "rounds.json").exists():
        return json.loads((run_dir / "rounds.json").read_text())
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        return []
    import torch

    history = torch.load(ckpt, weights_only=True)["strategy"].get("history", [])
    return [dict(h) for h in history]


def state_numbers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Clients trained, serialized state bytes (total and per client) and round times from round rows."""
    if not rows:
        return {}
    accepted = sum(int(r["accepted"]) for r in rows)
    total = sum(int(r["client_serialized_state_bytes_total"]) for r in rows)
    secs = [float(r.get("round_seconds", 0.0)) for r in rows]
    return {
        "clients_trained": accepted,
        "client_error_state_bytes_each": max(float(r["client_error_state_bytes_mean"]) for r in rows),
        "client_serialized_state_bytes_each": round(total / accepted) if accepted else 0,
        "client_serialized_state_bytes_total": total,
        "first_round_seconds": round(secs[0], 1),
        "later_rounds_mean_seconds": round(sum(secs[1:]) / len(secs[1:]), 1) if len(secs) > 1 else None,
    }


def plan(num_supernodes: int, clients_per_round: int) -> tuple[float, int]:
    """(fraction-train, rounds) so that cyclic sampling trains every client exactly once."""
    if num_supernodes < 1 or not 1 <= clients_per_round <= num_supernodes:
        raise ValueError(f"num_supernodes={num_supernodes}, clients_per_round={clients_per_round}: allowed: "
                         "1 <= clients_per_round <= num_supernodes")
    fraction = clients_per_round / num_supernodes
    per_round = max(int(num_supernodes * fraction), 1)  # what the wrapper samples
    return fraction, math.ceil(num_supernodes / per_round)


def measure(
    spec: str, num_supernodes: int, *, clients_per_round: int, dataset: str, work: Path, model: str = "auto",
    max_rss: int = 0, min_available: int = 0, batch_size: int = 4, timeout: float | None = None,
) -> dict[str, Any]:
    """One run of method ``spec`` (``"conef-cs"``, ``"efsgd"``, ``"conef-cs+disk"``); its measurements."""
    from sim.run import run_simulation

    method, _, variant = spec.partition("+")
    if variant not in ("", "disk"):
        raise ValueError(f"method {spec!r}: the only variant is '+disk' (state-dir), e.g. 'conef-cs+disk'")
    check_key("model", model, where="--model")
    fraction, rounds = plan(num_supernodes, clients_per_round)
    run_name = f"scale-{method}{'-disk' if variant else ''}-{num_supernodes}"
    state_dir = work / f"{run_name}-state"
    overrides: dict[str, Any] = {
        "method": method, "num-server-rounds": rounds, "fraction-train": fraction, "sampling": "cyclic",
        "dataset": dataset, "local-steps": 1, "local-epochs": 0, "batch-size": batch_size,
        "output-dir": str(work), "run-name": run_name, "eval-every": rounds, "norm-guard": 0.0, "model": model,
        "sample-by": "node",  # cyclic over node ids: every client trains once, no discovery round-trip per node
    }
    if variant == "disk":
        shutil.rmtree(state_dir, ignore_errors=True)
        overrides["state-dir"] = str(state_dir)
    log_file = work / f"{run_name}.log"
    log_file.unlink(missing_ok=True)
    shutil.rmtree(work / run_name, ignore_errors=True)  # no rounds or checkpoint of an earlier run
    guard = MemoryGuard(max_rss, min_available, log_file=log_file)
    guard.start()
    t0 = time.time()
    summary: dict[str, Any] | None = None
    error = ""
    timed_out = False
    try:
        summary = run_simulation(overrides, num_supernodes=num_supernodes, log_file=log_file, app_dir=REPO,
                                 timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        error = str(exc)[:2000]
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s (--timeout)"
        timed_out = True
    finally:
        guard.stop()
    wall = time.time() - t0
    rounds_done, clients = clients_done(log_file)
    result: dict[str, Any] = {
        "method": method, "state_dir": variant == "disk", "num_supernodes": num_supernodes,
        "clients_per_round": clients_per_round, "rounds_planned": rounds, "dataset": dataset,
        "model": model, "local_steps": 1,
        "batch_size": batch_size, "rounds_completed": rounds_done, "clients_with_state": clients,
        "simulation_process_peak_rss_bytes": guard.peak_rss, "all_processes_peak_rss_bytes": guard.peak_total_rss,
        "min_mem_available_bytes": guard.min_mem_available, "wall_seconds": round(wall, 1),
        "stopped_by_guard": guard.stopped is not None, "timed_out": timed_out,
        "guard": asdict(guard.stopped) if guard.stopped else None,
        "guard_limits": {"max_rss_bytes": max_rss, "min_available_bytes": min_available},
        "rss_vs_clients": guard.samples,
    }
    states = _STATE_RE.findall(log_file.read_text(errors="replace")) if log_file.exists() else []
    if states:  # the wrapper's round log: mean error state of the round's clients (also for stopped runs)
        result["client_error_state_bytes_each_from_log"] = round(float(states[-1]) * 1e3)
    result.update(state_numbers(round_rows(work / run_name)))
    if summary is not None:
        result.update({
            "num_params": summary["num_params"],
            "failed_or_rejected": summary["failed_replies"] + summary["rejected_replies"],
            "final_accuracy": summary["final_accuracy"],
        })
    else:
        result["num_params"] = _num_params(model, dataset)
    if error and guard.stopped is None and not timed_out:
        result["error"] = error
    if variant == "disk":
        result["state_dir_bytes"] = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file()) \
            if state_dir.exists() else 0
        shutil.rmtree(state_dir, ignore_errors=True)
    return result


def _num_params(model: str, dataset: str) -> int:
    from conef_fl.tasks import build_model
    from conef_fl.tasks.models import count_parameters

    return count_parameters(build_model(dataset, _LEGACY_MODELS.get(model, model)))


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    header = ("method", "clients", "params", "clients holding state", "state / client", "state, all clients",
              "simulation process peak RSS", "all processes peak RSS", "wall", "outcome")
    rows = []
    for r in results:
        name = r["method"] + (" + state-dir" if r["state_dir"] else "")
        each = r.get("client_serialized_state_bytes_each")
        total = r.get("client_serialized_state_bytes_total")
        if r["stopped_by_guard"]:
            g = r["guard"]
            outcome = (f"stopped by the memory guard after {g['clients_with_state']:,} clients "
                       f"(round {g['rounds_completed']}): {g['reason']}")
        elif r.get("timed_out"):
            outcome = (f"stopped by --timeout after {r['clients_with_state']:,} clients "
                       f"(round {r['rounds_completed']} of {r['rounds_planned']})")
        elif "error" in r:
            outcome = "failed: " + r["error"].splitlines()[0][:120]
        else:
            outcome = f"completed, {r.get('clients_trained', 0):,} clients trained once"
            if r.get("state_dir_bytes"):
                outcome += f"; {r['state_dir_bytes'] / 1e9:.2f} GB of state files"
        rows.append((
            name, f"{r['num_supernodes']:,}", f"{r.get('num_params', 0):,}", f"{r['clients_with_state']:,}",
            f"{each / 1e3:.0f} KB" if each else "n/a", f"{total / 1e9:.2f} GB" if total else "n/a",
            f"{r['simulation_process_peak_rss_bytes'] / GIB:.2f} GiB",
            f"{r['all_processes_peak_rss_bytes'] / GIB:.2f} GiB",
            f"{r['wall_seconds'] / 60:.1f} min", outcome,
        ))
    return "\n".join(markdown_table(header, rows)) + "\n"


def _write(path: Path, text: str, *, allowed: bool) -> None:
    if path.exists() and not allowed:
        raise SystemExit(f"{path} exists; pass --force (or --save for docs/results) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-supernodes", type=int, default=1000, help="virtual clients (default: %(default)s)")
    ap.add_argument("--clients-per-round", type=int, default=100, help="replies per round (default: %(default)s)")
    ap.add_argument("--methods", default="conef-cs,efsgd", help="comma-separated; '<method>+disk' adds state-dir")
    ap.add_argument("--disk-supernodes", type=int, default=0,
                    help="virtual clients for the '+disk' runs (default: --num-supernodes)")
    ap.add_argument("--model", choices=MODELS, default="auto",
                    help="the app's model key (mlp-wide: 1,068,810 parameters on MNIST; default %(default)s)")
    ap.add_argument("--dataset", default="")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-rss-gb", type=float, default=12.0,
                    help="memory guard: simulation process RSS limit in GiB (0 = off; default %(default)s)")
    ap.add_argument("--min-available-gb", type=float, default=2.0,
                    help="memory guard: stop when MemAvailable falls below this many GiB (0 = off)")
    ap.add_argument("--timeout", type=float, default=None, help="give up a run after this many seconds")
    ap.add_argument("--out", default="", help="results JSON (default: outputs/scale/scale_<N>.json)")
    ap.add_argument("--save", action="store_true", help="write docs/results/scale_<N>.json and .md")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: refill the state numbers of the results file from the runs' folders "
                         "(rounds.json, or the last checkpoint of a stopped run) and rewrite its table")
    args = ap.parse_args(argv)
    if args.max_rss_gb < 0 or args.min_available_gb < 0:
        raise SystemExit(f"--max-rss-gb={args.max_rss_gb}, --min-available-gb={args.min_available_gb}: "
                         "allowed: >= 0")
    n = args.num_supernodes
    try:
        plan(n, args.clients_per_round)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    dataset = args.dataset or ("mnist" if (REPO / ".." / "shared" / "data" / "mnist").is_dir() else "digits")
    if args.model == "mlp-wide" and dataset != "mnist":
        raise SystemExit(f"--model mlp-wide has 1M parameters only on MNIST (dataset={dataset!r})")
    if args.save:
        out = REPO / "docs" / "results" / f"scale_{n}.json"
    else:
        out = Path(args.out or f"outputs/scale/scale_{n}.json")
    if out.exists() and not (args.save or args.force or args.report_only):
        raise SystemExit(f"{out} exists; pass --force to overwrite it")
    work = (Path("outputs") / "scale").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads(out.read_text())
        for r in results:
            name = f"scale-{r['method']}{'-disk' if r['state_dir'] else ''}-{r['num_supernodes']}"
            r.update(state_numbers(round_rows(work / name)))
            if not r.get("num_params"):
                r["num_params"] = _num_params(r["model"], r["dataset"])
        _write(out, json.dumps(results, indent=1), allowed=True)
        _write(out.with_suffix(".md"), markdown(results), allowed=True)
        print(markdown(results))
        return 0
    results = []
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        size = args.disk_supernodes if spec.endswith("+disk") and args.disk_supernodes else n
        log.info("=== %s with %d virtual clients", spec, size)
        r = measure(spec, size, clients_per_round=min(args.clients_per_round, size), dataset=dataset, work=work,
                    model=args.model, max_rss=int(args.max_rss_gb * GIB),
                    min_available=int(args.min_available_gb * GIB), batch_size=args.batch_size,
                    timeout=args.timeout)
        results.append(r)
        log.info("%s: %d clients holding state, peak RSS %.2f GiB, %.0f s%s", spec, r["clients_with_state"],
                 r["simulation_process_peak_rss_bytes"] / GIB, r["wall_seconds"],
                 " (stopped by the memory guard)" if r["stopped_by_guard"] else "")
        _write(out, json.dumps(results, indent=1), allowed=True)  # after each run: a stop keeps what was measured
    if args.save:
        _write(out.with_suffix(".md"), markdown(results), allowed=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
