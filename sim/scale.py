"""1000 virtual clients on Flower's simulation engine, and the host memory their error states take.

    python -m sim.scale --num-supernodes 1000 --methods efsgd,conef-cs --out docs/results/scale_1000.json

Per method: one simulation where every client trains once (fraction-train 1.0, so all
N error states exist at the end), on MNIST with the 184,586-parameter CNN (digits when
MNIST is absent). Reported: the serialized state bytes every client stored in its
``context.state`` (summed over the N clients, as reported by the clients and counted
by the strategy), and the peak resident memory (VmHWM/VmRSS polled from /proc) of the
``flwr-simulation`` process, which holds every virtual node's ``context.state``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from pathlib import Path

from sim.flower_runtime import REPO, descendants
from sim.run import run_simulation

log = logging.getLogger("sim.scale")


class RssMonitor(threading.Thread):
    """Polls the RSS of our descendant processes whose command line contains ``needle``."""

    def __init__(self, needle: str = "flwr-simulation", interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.needle = needle
        self.interval = interval
        self.peak_rss = 0
        self.peak_total_rss = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = 0
            for pid in descendants(os.getpid()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rss = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                            if line.startswith("VmRSS:")), 0)
                total += rss
                if self.needle in cmd:
                    self.peak_rss = max(self.peak_rss, rss)
            self.peak_total_rss = max(self.peak_total_rss, total)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def measure(method: str, num_supernodes: int, dataset: str, out_dir: Path) -> dict:
    overrides = {
        "method": method, "num-server-rounds": 1, "fraction-train": 1.0, "dataset": dataset,
        "local-steps": 1, "local-epochs": 0, "batch-size": 32, "output-dir": str(out_dir),
        "run-name": f"scale-{method}-{num_supernodes}", "eval-every": 1,
    }
    mon = RssMonitor()
    mon.start()
    t0 = time.time()
    try:
        summary = run_simulation(overrides, num_supernodes=num_supernodes, log_file=out_dir / f"{method}.log")
    finally:
        mon.stop()
    rows = json.loads((out_dir / overrides["run-name"] / "rounds.json").read_text())
    return {
        "method": method,
        "num_supernodes": num_supernodes,
        "dataset": dataset,
        "num_params": summary["num_params"],
        "clients_trained": sum(r["accepted"] for r in rows),
        "client_error_state_bytes_each": summary["client_error_state_bytes"],
        "client_serialized_state_bytes_total": sum(r["client_serialized_state_bytes_total"] for r in rows),
        "simulation_process_peak_rss_bytes": mon.peak_rss,
        "all_processes_peak_rss_bytes": mon.peak_total_rss,
        "wall_seconds": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-supernodes", type=int, default=1000)
    ap.add_argument("--methods", default="efsgd,conef-cs")
    ap.add_argument("--dataset", default="")
    ap.add_argument("--out", default="docs/results/scale_1000.json")
    args = ap.parse_args(argv)
    dataset = args.dataset or ("mnist" if (REPO / ".." / "shared" / "data" / "mnist").is_dir() else "digits")
    out = Path(args.out)
    work = Path("outputs") / "scale"
    work.mkdir(parents=True, exist_ok=True)
    results = [measure(m, args.num_supernodes, dataset, work) for m in args.methods.split(",")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for r in results:
        log.info(
            "%s: %d clients trained, state %.1f KB each, %.1f MB in all client states, "
            "simulation process peak RSS %.0f MB, %.0f s",
            r["method"], r["clients_trained"], r["client_error_state_bytes_each"] / 1e3,
            r["client_serialized_state_bytes_total"] / 1e6, r["simulation_process_peak_rss_bytes"] / 1e6,
            r["wall_seconds"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
