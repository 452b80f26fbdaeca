"""The main job: a federated simulation of ConEF on Flower's simulation engine.

    python -m sim.run                      # 100 virtual clients, 10 % per round, ConEF count sketch
    python -m sim.run --num-supernodes 1000 --set num-server-rounds=5
    python -m sim.run --set method=efsgd --set dataset=mnist --set data-dir=../shared/data/mnist
    python -m sim.run --ray-address 127.0.0.1:6379   # on a running Ray cluster (docs/ray.md)

It starts its own SuperLink (free ports, private FLWR_HOME, runtime dependency
installation disabled), runs the app with ``flwr run``, prints the summary the
ServerApp wrote, and stops every process it started (SuperLink, ServerApp,
Ray and its workers) — also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from conef_fl.app_config import parse_overrides
from sim.flower_runtime import REPO, simulation
from sim.ray_cluster import check_ray_address

log = logging.getLogger("sim.run")


def app_defaults() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` from pyproject.toml."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(data["tool"]["flwr"]["app"]["config"])


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, validated by the app's config schema (exits with the key's problem)."""
    try:
        return parse_overrides(items)
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None


def run_simulation(
    overrides: dict[str, Any], *, num_supernodes: int, timeout: float | None = None, quiet: bool = False,
    log_file: Path | None = None, ray_address: str | None = None, app_dir: Path = REPO,
) -> dict[str, Any]:
    """Run one simulation and return its summary (``summary.json`` written by the ServerApp).

    ``ray_address`` (``host:port`` of a running Ray head) runs the ClientApps on that
    cluster; an address where nothing listens raises :class:`ConnectionError`
    naming it within seconds, before anything is started. ``app_dir`` is the app
    folder given to ``flwr run`` (default: this repository).
    """
    if ray_address:
        check_ray_address(ray_address)
    cfg = dict(overrides)
    cfg.setdefault("min-available-nodes", num_supernodes)  # round 1 samples from every virtual node
    run_name = str(cfg.get("run-name") or f"{cfg.get('method', app_defaults()['method'])}-{int(time.time())}")
    cfg["run-name"] = run_name
    out_root = Path(str(cfg.get("output-dir", app_defaults()["output-dir"])))
    if not out_root.is_absolute():
        out_root = (Path.cwd() / out_root).resolve()
    cfg["output-dir"] = str(out_root)
    with simulation(num_supernodes, ray_address=ray_address) as (fp, conn):
        code = fp.run_app(conn, cfg, app_dir=app_dir, timeout=timeout, stream_to=log_file)
        if code != 0:
            raise RuntimeError(f"flwr run exited with {code}; SuperLink log:\n{fp.tail()}")
    summary_path = out_root / run_name / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the run finished but wrote no summary at {summary_path}")
    return json.loads(summary_path.read_text())


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable summary lines."""
    acc = s.get("final_accuracy")
    frac = s.get("uplink_fraction_of_dense")
    return "\n".join(
        [
            f"method {s['method']} ({s['inner_strategy']}) on {s['dataset']}: {s['rounds']} rounds, "
            f"{s['wall_seconds']:.0f} s",
            f"  final test accuracy   {acc:.4f}" if acc is not None else "  final test accuracy   n/a",
            f"  uplink                {s['uplink_bytes_total'] / 1e6:.2f} MB vs dense FedAvg "
            f"{s['dense_fedavg_uplink_bytes_total'] / 1e6:.2f} MB ({100 * (frac or 0):.1f} %)",
            f"  client error memory   {s['client_error_state_bytes'] / 1e3:.1f} KB vs EFSGD "
            f"{s['efsgd_error_state_bytes'] / 1e3:.1f} KB "
            f"(saving {100 * (s['error_memory_saving_vs_efsgd'] or 0):.1f} %)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-supernodes", type=int, default=100,
                    help="virtual clients (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an app config value (pyproject [tool.flwr.app.config]); repeatable")
    ap.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    ap.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                    help="run the ClientApps on this running Ray cluster (the head's GCS address; docs/ray.md)")
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    if args.num_supernodes < 1:
        raise SystemExit(f"--num-supernodes={args.num_supernodes} is out of range; allowed: >= 1")
    try:
        summary = run_simulation(overrides, num_supernodes=args.num_supernodes, timeout=args.timeout,
                                 ray_address=args.ray_address)
    except (RuntimeError, TimeoutError, ConnectionError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
