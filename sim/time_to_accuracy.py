"""Time to accuracy on a modeled link: measured client compute plus bytes over bandwidth, per round.

    # 1. measure each method's client compute per round (in-process, on a quiet machine: under the lock)
    flock /tmp/conef-heavy.lock python -m sim.time_to_accuracy calibrate --methods sgd,efsgd,qsgd,conef-cs-90 \
        --out docs/results/experiments/time-to-accuracy/compute.json
    # 2. model the wall-clock of finished grid runs and write the table, JSON and plot
    python -m sim.time_to_accuracy report --runs docs/results/experiments/mnist \
        --compute docs/results/experiments/time-to-accuracy/compute.json \
        --out docs/results/experiments/time-to-accuracy --targets 90,95 --bandwidths 1,10,100

Model. Each sampled client has its own link, ``B_up`` bit/s up and ``B_down = r·B_up`` down (a
device's access link; the server's link is not the bottleneck), and the clients
of a round work in parallel, so one round takes

    t_round = c_client + c_server + up_bytes / B_up + down_bytes / B_down

with ``c_client`` the measured compute of one client's round (local training and
the method's compression; :func:`calibrate`), ``c_server`` the server's measured
aggregation, ``up_bytes`` one client's reply record (``uplink_record_bytes_total /
accepted`` of the run's ``rounds.json``) and ``down_bytes`` one client's message
(``downlink_bytes_total / sampled``). Evaluation is not counted. Time to a target
accuracy = the modeled time at the first evaluated round whose test accuracy
reaches it (so it is resolved to the run's ``eval-every``); speed-up = FedAvg's
(``sgd``) time over the method's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("sim.time_to_accuracy")

#: Link bandwidths of the report, Mbit/s.
BANDWIDTHS_MBIT = (1.0, 10.0, 100.0)
#: The reference of the speed-up column.
REFERENCE = "sgd"


# --------------------------------------------------------------------------------------------
# compute calibration
# --------------------------------------------------------------------------------------------
def compute_from_rounds(rounds: Sequence[Mapping[str, Any]], skip_first: int = 1) -> dict[str, Any]:
    """Per-client compute of a run's rounds: ``(round_seconds − aggregate_seconds) / replied``.

    The first ``skip_first`` rounds (warm-up: imports, data loading) and evaluated rounds (their time
    includes the test-set evaluation) are left out. Returns the median and every value, in seconds.
    """
    client, server = [], []
    for row in rounds[skip_first:]:
        if row.get("accuracy") is not None or not row.get("replied") or row.get("round_seconds") is None:
            continue
        agg = float(row.get("aggregate_seconds") or 0.0)
        client.append((float(row["round_seconds"]) - agg) / int(row["replied"]))
        server.append(agg)
    if not client:
        raise ValueError("no round with round_seconds and replies (after the warm-up, not evaluated) to measure")
    return {"client_seconds": statistics.median(client), "server_seconds": statistics.median(server),
            "client_seconds_per_round": client, "rounds_used": len(client)}


def calibrate(methods: Sequence[str], *, rounds: int = 8, nodes: int = 10, task: str = "mnist",
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run each method for ``rounds`` rounds in process (``nodes`` clients, all sampled, one evaluation at the
    end) and measure its per-client compute (:func:`compute_from_rounds`). Run folders go to a temporary
    directory that is removed."""
    import platform

    import torch

    from sim import experiments as ex

    if rounds < 3:
        raise ValueError(f"rounds={rounds} is out of range; allowed: >= 3 (one warm-up, one evaluated, one measured)")
    spec = ex.TASKS[task]
    out: dict[str, Any] = {"task": task, "rounds": rounds, "nodes": nodes, "torch": torch.__version__,
                           "python": platform.python_version(), "machine": platform.machine(),
                           "threads": 1, "methods": {}}
    base = {"fraction-train": 1.0, "eval-every": rounds, **(extra or {})}
    with tempfile.TemporaryDirectory(prefix="conef-tta-") as tmp:
        # warm-up (imports, data set, first allocations), not measured
        ex.execute(ex.run_config(spec, ex.METHODS[methods[0]], 0, 2, Path(tmp), "warm-up", base), nodes)
        for mid in methods:
            method = ex.METHODS[mid]
            cfg = ex.run_config(spec, method, 0, rounds, Path(tmp), mid, base)
            ex.execute(cfg, nodes)
            rows = json.loads((Path(tmp) / mid / "rounds.json").read_text())
            out["methods"][mid] = compute_from_rounds(rows)
            log.info("%s: client compute %.4f s/round, server aggregation %.4f s/round", mid,
                     out["methods"][mid]["client_seconds"], out["methods"][mid]["server_seconds"])
    return out


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def round_bytes(row: Mapping[str, Any]) -> tuple[float, float]:
    """(uplink, downlink) bytes of one client in one round of ``rounds.json``."""
    accepted = int(row.get("accepted") or row.get("replied") or 0)
    sampled = int(row.get("sampled") or 0)
    up_total = row.get("uplink_record_bytes_total") or row.get("uplink_payload_bytes_total") or 0
    up = float(up_total) / accepted if accepted else 0.0
    down = float(row.get("downlink_bytes_total") or 0) / sampled if sampled else 0.0
    return up, down


def modeled_times(rounds: Sequence[Mapping[str, Any]], client_seconds: float, server_seconds: float,
                  mbit: float, downlink_ratio: float = 1.0) -> list[float]:
    """Cumulative modeled wall-clock (s) at the end of each round of ``rounds``: uplink ``mbit`` Mbit/s,
    downlink ``downlink_ratio × mbit``."""
    if not mbit > 0:
        raise ValueError(f"bandwidth={mbit} Mbit/s is out of range; allowed: > 0")
    if not downlink_ratio > 0:
        raise ValueError(f"downlink_ratio={downlink_ratio} is out of range; allowed: > 0")
    bps = mbit * 1e6 / 8.0  # bytes per second
    t, out = 0.0, []
    for row in rounds:
        up, down = round_bytes(row)
        t += client_seconds + server_seconds + up / bps + down / (downlink_ratio * bps)
        out.append(t)
    return out


def time_to_target(rounds: Sequence[Mapping[str, Any]], times: Sequence[float], target: float) -> float | None:
    """Modeled time of the first evaluated round with test accuracy >= ``target`` (%), None if never."""
    for row, t in zip(rounds, times, strict=True):
        acc = row.get("accuracy")
        if acc is not None and 100 * float(acc) >= target:
            return t
    return None


def load_run_dirs(dirs: Sequence[Path], methods: Sequence[str] = (), seeds: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Finished runs (``<id>-s<seed>/rounds.json`` with ``summary.json``) under ``dirs``, optionally by method
    and seed; a run name found in several folders is taken from the first."""
    from sim.experiments import load_runs

    runs, seen = [], set()
    for d in dirs:
        for r in load_runs(Path(d)):
            if (methods and r["method_id"] not in methods) or (seeds and r["seed"] not in seeds) or r["name"] in seen:
                continue
            seen.add(r["name"])
            r["source"] = str(d)
            runs.append(r)
    return runs


def build_report(runs: Sequence[Mapping[str, Any]], compute: Mapping[str, Any], *, targets: Sequence[float],
                 bandwidths: Sequence[float] = BANDWIDTHS_MBIT, downlink_ratio: float = 1.0) -> dict[str, Any]:
    """Per method and bandwidth: the modeled curve (mean over seeds), time to each target and speed-up."""
    cal = compute["methods"]
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method_id"], []).append(r)
    missing = sorted(m for m in by_method if m not in cal)
    if missing:
        raise ValueError(f"no compute calibration for {missing}; calibrated: {sorted(cal)}")
    methods: dict[str, Any] = {}
    for mid, rs in by_method.items():
        c, s = cal[mid]["client_seconds"], cal[mid]["server_seconds"]
        up_down = [round_bytes(row) for row in rs[0]["rounds"]]
        entry: dict[str, Any] = {
            "seeds": sorted(r["seed"] for r in rs), "engine": sorted({r.get("engine", "inmemory") for r in rs}),
            "source": sorted({r.get("source", "") for r in rs}),
            "client_compute_seconds": c, "server_aggregate_seconds": s,
            "uplink_bytes_per_client_round": statistics.fmean(u for u, _ in up_down),
            "downlink_bytes_per_client_round": statistics.fmean(d for _, d in up_down),
            "bandwidths": {},
        }
        for mbit in bandwidths:
            per_seed = []
            curves = []
            for r in rs:
                times = modeled_times(r["rounds"], c, s, mbit, downlink_ratio)
                per_seed.append({str(t): time_to_target(r["rounds"], times, t) for t in targets})
                curves.append({int(row["round"]): (times[i], 100 * float(row["accuracy"]))
                               for i, row in enumerate(r["rounds"]) if row.get("accuracy") is not None})
            common = sorted(set.intersection(*(set(cv) for cv in curves)))
            curve = [[statistics.fmean(cv[x][0] for cv in curves), statistics.fmean(cv[x][1] for cv in curves)]
                     for x in common]
            ttt = {}
            for t in targets:
                vals = [p[str(t)] for p in per_seed]
                reached = [v for v in vals if v is not None]
                ttt[str(t)] = {"seconds_mean": statistics.fmean(reached) if len(reached) == len(vals) else None,
                               "seconds_per_seed": vals, "seeds_reached": len(reached)}
            entry["bandwidths"][f"{mbit:g}"] = {
                "seconds_per_round": (c + s + (entry["uplink_bytes_per_client_round"]
                                               + entry["downlink_bytes_per_client_round"] / downlink_ratio)
                                      * 8 / (mbit * 1e6)),
                "time_to_target": ttt, "curve_seconds_accuracy": curve}
        methods[mid] = entry
    ref = methods.get(REFERENCE)
    for e in methods.values():
        for bw, b in e["bandwidths"].items():
            for t, v in b["time_to_target"].items():
                r_s = ref["bandwidths"][bw]["time_to_target"][t]["seconds_mean"] if ref else None
                v["speedup_vs_fedavg"] = (r_s / v["seconds_mean"]) if r_s and v["seconds_mean"] else None
    return {"model": "t_round = client compute + server aggregation + uplink bytes / B + downlink bytes / "
                     f"({downlink_ratio:g}·B) (each client its own link; clients in parallel; evaluation not counted)",
            "targets_percent": list(targets), "bandwidths_mbit": list(bandwidths), "downlink_ratio": downlink_ratio,
            "compute": {k: v for k, v in compute.items() if k != "methods"}, "methods": methods}


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "not reached"
    return f"{x / 60:.1f} min" if x >= 600 else f"{x:.0f} s"


def report_markdown(report: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """The speed-up table: per bandwidth and target, time to reach it and speed-up over FedAvg."""
    ms = report["methods"]
    lines = ["# Time to accuracy (modeled link)", "", f"Model: {report['model']}.", "",
             "| method | seeds | engine | client compute (s/round) | uplink KB/client/round | "
             "downlink KB/client/round | " + " | ".join(f"s/round @ {b:g} Mbit/s up" for b in report["bandwidths_mbit"])
             + " |", "|" + "---|" * (6 + len(report["bandwidths_mbit"]))]
    for mid, e in ms.items():
        lines.append(f"| {labels.get(mid, mid)} | {','.join(map(str, e['seeds']))} | {'/'.join(e['engine'])} | "
                     f"{e['client_compute_seconds']:.3f} | {e['uplink_bytes_per_client_round'] / 1e3:.1f} | "
                     f"{e['downlink_bytes_per_client_round'] / 1e3:.1f} | "
                     + " | ".join(f"{e['bandwidths'][f'{b:g}']['seconds_per_round']:.2f}"
                                  for b in report["bandwidths_mbit"]) + " |")
    for t in report["targets_percent"]:
        lines += ["", f"Time to {t:g} % test accuracy (mean over seeds; all seeds must reach it) and speed-up over "
                  "FedAvg (SGD):", "",
                  "| method | " + " | ".join(f"{b:g} Mbit/s | speed-up" for b in report["bandwidths_mbit"]) + " |",
                  "|---|" + "---|---|" * len(report["bandwidths_mbit"])]
        for mid, e in ms.items():
            cells = []
            for b in report["bandwidths_mbit"]:
                v = e["bandwidths"][f"{b:g}"]["time_to_target"][str(t)]
                sp = v.get("speedup_vs_fedavg")
                reached = "" if v["seeds_reached"] == len(e["seeds"]) else f" ({v['seeds_reached']}/{len(e['seeds'])})"
                cells += [_fmt_s(v["seconds_mean"]) + reached, "–" if sp is None else f"{sp:.2f}×"]
            lines.append(f"| {labels.get(mid, mid)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.time_to_accuracy", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure each method's client compute per round (run under the lock)")
    c.add_argument("--methods", required=True, help="comma-separated method ids of sim.experiments")
    c.add_argument("--rounds", type=int, default=8)
    c.add_argument("--nodes", type=int, default=10)
    c.add_argument("--task", default="mnist")
    c.add_argument("--out", type=Path, required=True, help="compute.json to write")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config overrides")
    r = sub.add_parser("report", help="model the wall-clock of finished runs; table, JSON and plot")
    r.add_argument("--runs", type=Path, action="append", required=True, help="grid folder(s) with run folders")
    r.add_argument("--compute", type=Path, required=True, help="compute.json from calibrate")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--methods", default="", help="comma-separated method ids (default: every calibrated one)")
    r.add_argument("--seeds", default="", help="comma-separated seeds (default: every seed found)")
    r.add_argument("--targets", default="90,95", help="target test accuracies, %%")
    r.add_argument("--bandwidths", default=",".join(f"{b:g}" for b in BANDWIDTHS_MBIT), help="uplink Mbit/s")
    r.add_argument("--downlink-ratio", type=float, default=1.0,
                   help="downlink bandwidth as a multiple of the uplink's (1: symmetric links)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "calibrate":
        from sim import experiments as ex

        methods = _csv(args.methods)
        unknown = [m for m in methods if m not in ex.METHODS]
        if unknown:
            raise SystemExit(f"unknown method id(s) {unknown}; valid: {', '.join(ex.METHODS)}")
        try:
            extra = ex.parse_set(args.set)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        data = calibrate(methods, rounds=args.rounds, nodes=args.nodes, task=args.task, extra=extra)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))
        print(json.dumps({m: round(v["client_seconds"], 4) for m, v in data["methods"].items()}, indent=2))
        return 0
    from sim import plots
    from sim.experiments import METHODS

    compute = json.loads(args.compute.read_text())
    methods = _csv(args.methods) or sorted(compute["methods"])
    try:
        targets = [float(t) for t in _csv(args.targets)]
        bandwidths = [float(b) for b in _csv(args.bandwidths)]
    except ValueError as exc:
        raise SystemExit(f"--targets/--bandwidths must be numbers: {exc}") from None
    try:
        seeds = [int(x) for x in _csv(args.seeds)]
    except ValueError:
        raise SystemExit(f"--seeds={args.seeds!r} must be comma-separated integers") from None
    runs = load_run_dirs(args.runs, methods, seeds)
    if not runs:
        raise SystemExit(f"no finished runs of {methods} under {[str(d) for d in args.runs]}")
    report = build_report(runs, compute, targets=targets, bandwidths=bandwidths, downlink_ratio=args.downlink_ratio)
    labels = {m: METHODS[m].label if m in METHODS else m for m in report["methods"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_accuracy.json").write_text(json.dumps(report, indent=2))
    md = report_markdown(report, labels)
    (args.out / "time_to_accuracy.md").write_text(md)
    plots.plot_time_to_accuracy(report, labels, args.out / "accuracy_vs_wallclock.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
