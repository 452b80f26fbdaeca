"""Check the time-to-accuracy model on a real deployment behind rate-limited links.

    flock /tmp/conef-heavy.lock python -m sim.link_check --mbit 0,10,1 --methods efsgd,sgd --rounds 5 \
        --compute docs/results/experiments/time-to-accuracy/compute.json \
        --out docs/results/experiments/link-check/link_check.json

For each method and bandwidth it starts a SuperLink and ``--supernodes`` SuperNodes on
loopback (:func:`sim.deploy.run_deployment`), each SuperNode behind its own
:mod:`sim.throttle` link (``--mbit`` both ways; 0 = unlimited), runs the MNIST
protocol's client work (``fraction-train`` 1, every client every round) and compares,
per round,

- **link level**: each message's transfer, from the proxy's chunk log: measured
  duration vs ``wire bytes / B``, and wire bytes vs the bytes the model uses
  (``rounds.json``);
- **client level**: first byte of the model sent to a SuperNode to last byte of its
  reply, vs the model's ``c_client + down/B + up/B`` (``c_client`` from
  ``sim.time_to_accuracy calibrate``);
- **round level**: the ServerApp's ``round_seconds`` vs the model. Flower polls: the
  SuperNode asks for work every 3 s when idle and the ServerApp pulls replies every
  3 s, so a round takes up to ~6 s more than its transfers and compute; the JSON
  reports that gap.

The first round (start-up) and the last (evaluation) are left out. The tolerances are
stated in the JSON (``tolerance``); whether each check passed is reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sim.time_to_accuracy import round_bytes

log = logging.getLogger("sim.link_check")

#: A new transfer starts after this many seconds without a chunk in that direction.
GAP_SECONDS = 1.0
#: Transfers smaller than this (polls, heartbeats, small replies) are not messages of a round.
MIN_TRANSFER_BYTES = 20_000
#: Link level: measured rate within this fraction of the configured rate.
RATE_TOLERANCE = 0.05
#: Client level: |measured − model| within this fraction of the model plus ``CLIENT_SLACK_SECONDS``
#: (the SuperNode hands the message to its ClientApp process and back through its own API).
CLIENT_TOLERANCE = 0.10
CLIENT_SLACK_SECONDS = 1.5


def transfers(events: Sequence[Sequence[Any]], direction: str) -> list[dict[str, float]]:
    """Group a link's chunk log into transfers: runs of ``direction`` chunks with gaps < ``GAP_SECONDS``."""
    out: list[dict[str, float]] = []
    cur: dict[str, float] | None = None
    for t, d, n in events:
        if d != direction:
            continue
        if cur is None or t - cur["end"] >= GAP_SECONDS:
            if cur is not None:
                out.append(cur)
            cur = {"start": t, "end": t, "bytes": n, "first_chunk": n}
        else:
            cur["end"] = t
            cur["bytes"] += n
    if cur is not None:
        out.append(cur)
    return [x for x in out if x["bytes"] >= MIN_TRANSFER_BYTES]


def measured_rate(tr: Mapping[str, float]) -> float | None:
    """Bytes per second of a transfer: the first chunk passes at once (the bucket starts full)."""
    span = tr["end"] - tr["start"]
    return (tr["bytes"] - tr["first_chunk"]) / span if span > 0 else None


def analyse(rounds: Sequence[Mapping[str, Any]], links: Sequence[Mapping[str, Any]], mbit: float,
            client_seconds: float | None, server_seconds: float | None) -> dict[str, Any]:
    """Compare one deployment's measured rounds and link transfers with the model."""
    bps = mbit * 1e6 / 8.0 if mbit else None
    # transfers per link; round r (1-based) = the r-th downlink transfer and the first uplink after it
    per_link = []
    for link in links:
        downs, ups = transfers(link["events"], "down"), transfers(link["events"], "up")
        pairs = []
        for d in downs:
            u = next((x for x in ups if x["start"] >= d["start"]), None)
            pairs.append({"down": d, "up": u})
        per_link.append(pairs)
    n_rounds = len(rounds)
    rows = []
    for i, row in enumerate(rounds):
        if i == 0 or i == n_rounds - 1:
            continue  # start-up round; the evaluated last round
        up_model, down_model = round_bytes(row)
        entry: dict[str, Any] = {"round": row["round"], "round_seconds": row.get("round_seconds"),
                                 "model_uplink_bytes": up_model, "model_downlink_bytes": down_model}
        spans, rates, wire = [], [], []
        for pairs in per_link:
            if i >= len(pairs) or pairs[i]["up"] is None:
                continue
            d, u = pairs[i]["down"], pairs[i]["up"]
            spans.append(u["end"] - d["start"])
            wire.append((u["bytes"], d["bytes"]))
            rates += [r for r in (measured_rate(d), measured_rate(u)) if r is not None]
        if spans:
            entry["client_span_seconds"] = statistics.fmean(spans)
            entry["wire_uplink_bytes"] = statistics.fmean(w[0] for w in wire)
            entry["wire_downlink_bytes"] = statistics.fmean(w[1] for w in wire)
        if rates:
            entry["measured_rate_bytes_per_s"] = statistics.fmean(rates)
        if client_seconds is not None:
            transfer = (up_model + down_model) / bps if bps else 0.0
            entry["model_client_seconds"] = client_seconds + transfer
            entry["model_round_seconds"] = client_seconds + (server_seconds or 0.0) + transfer
        rows.append(entry)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    out: dict[str, Any] = {"mbit": mbit, "rounds": rows}
    for key in ("round_seconds", "client_span_seconds", "model_client_seconds", "model_round_seconds",
                "measured_rate_bytes_per_s", "wire_uplink_bytes", "wire_downlink_bytes", "model_uplink_bytes",
                "model_downlink_bytes"):
        out[f"{key}_mean"] = mean(key)
    if bps and out["measured_rate_bytes_per_s_mean"]:
        err = out["measured_rate_bytes_per_s_mean"] / bps - 1.0
        out["rate_error"] = err
        out["rate_within_tolerance"] = abs(err) <= RATE_TOLERANCE
    if out["client_span_seconds_mean"] is not None and out["model_client_seconds_mean"] is not None:
        gap = out["client_span_seconds_mean"] - out["model_client_seconds_mean"]
        out["client_gap_seconds"] = gap
        out["client_within_tolerance"] = abs(gap) <= CLIENT_TOLERANCE * out["model_client_seconds_mean"] \
            + CLIENT_SLACK_SECONDS
    if out["round_seconds_mean"] is not None and out["model_round_seconds_mean"] is not None:
        out["round_gap_seconds"] = out["round_seconds_mean"] - out["model_round_seconds_mean"]
    if out["wire_downlink_bytes_mean"] and out["model_downlink_bytes_mean"]:
        out["wire_over_model_bytes"] = ((out["wire_uplink_bytes_mean"] + out["wire_downlink_bytes_mean"])
                                        / (out["model_uplink_bytes_mean"] + out["model_downlink_bytes_mean"]))
    return out


def add_unthrottled_model(runs: list[dict[str, Any]]) -> None:
    """Second model, with the compute measured in the deployment itself: the client span of the same method's
    unthrottled run (ClientApp process start, data loading, training, Flower's hand-offs) plus bytes / B."""
    base = {r["method"]: r for r in runs if r.get("mbit") == 0 and r.get("client_span_seconds_mean") is not None}
    for r in runs:
        b = base.get(r.get("method", ""))
        if b is None or not r.get("mbit") or r.get("client_span_seconds_mean") is None:
            continue
        bps = r["mbit"] * 1e6 / 8.0
        model = b["client_span_seconds_mean"] + (r["model_uplink_bytes_mean"] + r["model_downlink_bytes_mean"]) / bps
        r["model_client_seconds_from_unthrottled"] = model
        r["client_error_vs_unthrottled_model"] = r["client_span_seconds_mean"] / model - 1.0
        r["client_within_tolerance_vs_unthrottled_model"] = (
            abs(r["client_span_seconds_mean"] - model) <= CLIENT_TOLERANCE * model + CLIENT_SLACK_SECONDS)


def run_one(method: str, mbit: float, *, supernodes: int, rounds: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    """One throttled deployment; returns its rounds and the proxy's per-link log."""
    from sim import experiments as ex
    from sim.deploy import run_deployment

    spec = ex.TASKS["mnist"]
    with tempfile.TemporaryDirectory(prefix="conef-linkcheck-") as tmp:
        cfg = ex.run_config(spec, ex.METHODS[method], 0, rounds, Path(tmp), f"{method}-{mbit:g}mbit",
                            {"fraction-train": 1.0, "eval-every": rounds, **extra})
        cfg.pop("num-partitions", None)
        events = Path(tmp) / "throttle.json"
        res = run_deployment(cfg, num_supernodes=supernodes, throttle_mbit=mbit, throttle_events=events,
                             timeout=60.0 + rounds * 60.0, log_file=Path(tmp) / "flwr.log")
        links = json.loads(events.read_text())["links"] if events.exists() else []
    return {"rounds": res.rounds, "links": links, "seconds": res.seconds, "stopped_pids": res.stopped_pids}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.link_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbit", default="0,10,1", help="link bandwidths, Mbit/s (0: unlimited)")
    ap.add_argument("--methods", default="efsgd,sgd", help="method ids of sim.experiments")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--supernodes", type=int, default=2)
    ap.add_argument("--compute", type=Path, help="compute.json of sim.time_to_accuracy calibrate")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from sim.experiments import METHODS, parse_set

    if args.rounds < 3:
        ap.error(f"--rounds={args.rounds} is out of range; allowed: >= 3 (start-up and evaluated rounds are dropped)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method id(s) {unknown}; valid: {', '.join(METHODS)}")
    try:
        bandwidths = [float(b) for b in args.mbit.split(",") if b]
        extra = parse_set(args.set)
    except ValueError as exc:
        ap.error(str(exc))
    compute = json.loads(args.compute.read_text())["methods"] if args.compute else {}
    results: dict[str, Any] = {
        "tolerance": {"rate_fraction": RATE_TOLERANCE, "client_fraction": CLIENT_TOLERANCE,
                      "client_slack_seconds": CLIENT_SLACK_SECONDS, "gap_seconds": GAP_SECONDS,
                      "min_transfer_bytes": MIN_TRANSFER_BYTES},
        "supernodes": args.supernodes, "rounds": args.rounds, "runs": []}
    for method in methods:
        c = compute.get(method, {})
        for mbit in bandwidths:
            log.info("%s at %g Mbit/s", method, mbit)
            try:
                raw = run_one(method, mbit, supernodes=args.supernodes, rounds=args.rounds, extra=extra)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                log.error("%s at %g Mbit/s failed: %s", method, mbit, exc)
                results["runs"].append({"method": method, "mbit": mbit, "error": str(exc)[-2000:]})
                continue
            a = analyse(raw["rounds"], raw["links"], mbit, c.get("client_seconds"), c.get("server_seconds"))
            a.update({"method": method, "deployment_seconds": raw["seconds"],
                      "link_bytes": [{k: v for k, v in link.items() if k != "events"} for link in raw["links"]],
                      "link_transfers": [{d: transfers(link["events"], d) for d in ("down", "up")}
                                         for link in raw["links"]]})
            results["runs"].append(a)
            log.info("%s %g Mbit/s: round %.2f s (model %s), client span %s s (model %s), rate error %s", method,
                     mbit, a["round_seconds_mean"] or float("nan"), a.get("model_round_seconds_mean"),
                     a.get("client_span_seconds_mean"), a.get("model_client_seconds_mean"), a.get("rate_error"))
    add_unthrottled_model(results["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps([{k: r.get(k) for k in ("method", "mbit", "round_seconds_mean", "model_round_seconds_mean",
                                               "client_span_seconds_mean", "model_client_seconds_mean",
                                               "model_client_seconds_from_unthrottled", "rate_error",
                                               "wire_over_model_bytes", "error")}
                      for r in results["runs"]], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
