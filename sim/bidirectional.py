"""Downlink bytes per round with and without a compressed downlink, full and partial participation.

    python -m sim.bidirectional --out docs/results/bidirectional.json

Runs the real ServerApp/ClientApp in process (:mod:`sim.inmemory`) on digits:
cross-silo (10 clients, all every round) and cross-device (100 clients, 10 % per
round), each with a dense downlink and with a random-block-k downlink (server-side
error feedback, the uplink's round seed). Reports accuracy, uplink and downlink
bytes per round, and total bytes as a fraction of dense FedAvg (uplink + downlink).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sim.inmemory import run_inmemory

log = logging.getLogger("sim.bidirectional")

SETTINGS = {
    "full": {"clients": 10, "fraction-train": 1.0},
    "partial-10%": {"clients": 100, "fraction-train": 0.1},
}


def run(rounds: int, out_dir: Path, method: str = "conef-cs") -> list[dict]:
    results = []
    for name, s in SETTINGS.items():
        for downlink in ("", "random-block-k"):
            run_name = f"{name}-{downlink or 'dense'}"
            cfg = {"method": method, "num-server-rounds": rounds, "fraction-train": s["fraction-train"],
                   "downlink": downlink, "downlink-k-ratio": 0.1, "output-dir": str(out_dir), "run-name": run_name,
                   "eval-every": 10}
            run_inmemory(cfg, s["clients"])
            summary = json.loads((out_dir / run_name / "summary.json").read_text())
            rows = json.loads((out_dir / run_name / "rounds.json").read_text())
            dense_round = rows[0]["dense_bytes_per_client"]
            dense_total = sum(dense_round * r["sampled"] * 2 for r in rows)  # dense FedAvg: model down + update up
            up = sum(r["uplink_payload_bytes_total"] for r in rows)
            down = sum(r["downlink_bytes_total"] for r in rows)
            res = {
                "setting": name, "downlink": downlink or "dense", "clients": s["clients"],
                "fraction_train": s["fraction-train"], "rounds": rounds,
                "final_accuracy": summary["final_accuracy"],
                "uplink_bytes_total": up, "downlink_bytes_total": down,
                "downlink_bytes_per_round_mean": down / len(rows),
                "downlink_bytes_per_round_after_round_1": (
                    sum(r["downlink_bytes_total"] for r in rows[1:]) / max(1, len(rows) - 1)
                ),
                "dense_fedavg_bytes_total": dense_total,
                "total_fraction_of_dense": (up + down) / dense_total,
            }
            log.info("%s", res)
            results.append(res)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--out", default="docs/results/bidirectional.json")
    args = ap.parse_args(argv)
    results = run(args.rounds, Path("outputs") / "bidirectional")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    lines = [
        "| setting | downlink | final acc | uplink MB | downlink MB | downlink KB/round (after r1) | total / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['downlink']} | {r['final_accuracy']:.4f} | {r['uplink_bytes_total'] / 1e6:.2f} "
            f"| {r['downlink_bytes_total'] / 1e6:.2f} | {r['downlink_bytes_per_round_after_round_1'] / 1e3:.1f} "
            f"| {100 * r['total_fraction_of_dense']:.1f} % |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
