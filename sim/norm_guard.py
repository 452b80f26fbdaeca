"""The norm guard's effect: the MNIST protocol with ``norm-guard`` 10 (default) and 0 (off).

    python -m sim.norm_guard --rounds 300 --out outputs/norm_guard.json       # the full protocol
    python -m sim.norm_guard --rounds 100 --save                              # -> docs/results/norm_guard.json
    python -m sim.norm_guard --rounds 50 --attack 1e4 --save                  # one hostile client

Each method runs twice in process (:mod:`sim.inmemory`, the real ServerApp and
ClientApp) with the same seed; reported: final and best accuracy, and how many replies
the guard refused. With ``--attack F`` the client of partition 0 multiplies every value
it sends by ``F`` whenever it is sampled (a valid payload, just huge). A result file
under ``docs/results`` is written only with ``--save``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from sim.experiments import SHARED_DATA, TASKS
from sim.inmemory import run_inmemory

log = logging.getLogger("sim.norm_guard")
SAVED = Path("docs/results/norm_guard.json")


def _hostile(factor: float):
    """A send_and_receive that scales partition 0's payload values by ``factor``."""
    import numpy as np
    from flwr.app import Array

    from conef_fl.flower import protocol as P
    from sim.inmemory import InMemoryGrid

    honest = InMemoryGrid.send_and_receive

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(honest(self, messages, timeout=timeout))
        for reply in replies:
            ctx = self.contexts.get(reply.metadata.src_node_id)
            if ctx is None or ctx.node_config.get("partition-id") != 0 or reply.has_error():
                continue
            payload = reply.content.get(P.PAYLOAD_RECORD)
            for key in list(payload.keys()) if payload is not None else []:
                arr = payload[key].numpy()
                if arr.dtype.kind == "f":
                    payload[key] = Array(np.ascontiguousarray(arr * np.asarray(factor, arr.dtype)))
        return replies

    return send_and_receive


def measure(method: str, guard: float, rounds: int, seed: int, work: Path, attack: float = 0.0) -> dict[str, Any]:
    from unittest import mock

    from sim.inmemory import InMemoryGrid

    task = TASKS["mnist"]
    name = f"{method}-guard{guard:g}-attack{attack:g}-s{seed}"
    cfg = {**task.base, "method": method, "norm-guard": guard, "num-server-rounds": rounds, "seed": seed,
           "eval-every": max(1, rounds // 10), "output-dir": str(work), "run-name": name,
           "data-dir": str(SHARED_DATA / "mnist")}
    if attack:
        with mock.patch.object(InMemoryGrid, "send_and_receive", _hostile(attack)):
            run_inmemory(cfg, task.num_nodes)
    else:
        run_inmemory(cfg, task.num_nodes)
    summary = json.loads((work / name / "summary.json").read_text())
    rows = json.loads((work / name / "rounds.json").read_text())
    refused = [r for row in rows for r in row["rejections"] if "norm_guard" in r]
    return {"method": method, "norm_guard": guard, "attack_factor": attack, "rounds": rounds, "seed": seed,
            "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "replies_accepted": sum(r["accepted"] for r in rows), "replies_refused_by_guard": len(refused)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--methods", default="conef-cs,efsgd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attack", type=float, default=0.0, help="partition 0 scales its values by this (0 = honest)")
    ap.add_argument("--out", default="", help="result JSON (default: a temporary folder)")
    ap.add_argument("--save", action="store_true", help=f"write {SAVED}")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds} is out of range; allowed: >= 1")
    if not (SHARED_DATA / "mnist").is_dir():
        ap.error(f"MNIST not found at {SHARED_DATA / 'mnist'}")
    with tempfile.TemporaryDirectory(prefix="norm-guard-") as tmp:
        rows = [measure(m, g, args.rounds, args.seed, Path(tmp), args.attack)
                for m in args.methods.split(",") for g in (10.0, 0.0)]
    saved = SAVED.with_name("norm_guard_attack.json") if args.attack else SAVED
    out = saved if args.save else Path(args.out or Path(tempfile.gettempdir()) / "norm_guard.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    for r in rows:
        log.info("%s norm-guard %g, attack %g: final %.4f best %.4f, %d replies accepted, %d refused by the guard",
                 r["method"], r["norm_guard"], r["attack_factor"], r["final_accuracy"], r["best_accuracy"],
                 r["replies_accepted"], r["replies_refused_by_guard"])
    log.info("written %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
