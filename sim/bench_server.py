"""Server aggregation through the ConEF wrapper: time per reply and peak extra memory, 10 / 100 / 1,000 replies.

    python -m sim.bench_server                       # -> outputs/bench_server.json
    python -m sim.bench_server --save                # -> docs/results/bench_server.json

Replies are built once (one error-feedback step of a random update on the 184,586-
parameter MNIST CNN, encoded exactly as ``conef_mod`` sends it) and the wrapper's
``aggregate_train`` is timed on them (median of ``--repeats``). Peak extra memory is what
``aggregate_train`` allocates beyond the replies it was given: torch allocations from the
profiler's memory events plus numpy and Python allocations from ``tracemalloc`` (measured in
separate calls; their peaks added: an upper bound).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from conef_fl.flower import ConEF
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import encode_payloads
from conef_fl.measure import measure_transient
from conef_fl.tasks.models import MnistCNN
from conef_fl.worker import CompressionWorker

log = logging.getLogger("sim.bench_server")
SAVED = Path("docs/results/bench_server.json")


def _setup(method: str, n: int) -> tuple[ConEF, list[Message], int]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    shapes = {k: tuple(v.shape) for k, v in MnistCNN().state_dict().items()}
    nodes = list(range(1, n + 1))
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = nodes
    strategy = ConEF(FedAvg(fraction_train=1.0, min_available_nodes=n), method)
    rng = np.random.default_rng(0)
    model = ArrayRecord({k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()})
    msgs = list(strategy.configure_train(1, model, ConfigRecord(), grid))
    seed = int(msgs[0].content["config"][P.ROUND_SEED_KEY])
    gen = torch.Generator().manual_seed(0)
    replies = []
    for i, node in enumerate(nodes):
        if i < 8:  # eight distinct payloads, reused: encoding 1,000 would dominate the benchmark's own time
            worker = CompressionWorker(strategy.method, shapes)
            arrays, meta = encode_payloads(worker.step({k: torch.randn(s, generator=gen) for k, s in shapes.items()},
                                                       seed=seed))
            encoded = (arrays, meta)
        TaskIdentity.node_id = node
        metrics = MetricRecord({"num-examples": 10 + i, **{k: 0 for k in P.CLIENT_METRICS}, P.M_ROUND: 1})
        replies.append(Message(RecordDict({P.PAYLOAD_RECORD: encoded[0], P.PAYLOAD_META_RECORD: encoded[1],
                                           "metrics": metrics}), dst_node_id=0, message_type="train"))
    return strategy, replies, 4 * sum(int(np.prod(s)) for s in shapes.values())


def measure(method: str, n: int, repeats: int) -> dict[str, Any]:
    strategy, replies, model_bytes = _setup(method, n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        new, metrics = strategy.aggregate_train(1, replies)
        times.append(time.perf_counter() - t0)
        assert new is not None and metrics["conef.accepted"] == n
    tracemalloc.start()  # numpy and Python allocations (without the profiler, whose own objects it would count)
    strategy.aggregate_train(1, replies)
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _, torch_mem = measure_transient(lambda: strategy.aggregate_train(1, replies))
    reply_bytes = sum(a.count_bytes() for a in replies[0].content.array_records.values())
    peak = int(torch_mem.peak_bytes) + int(numpy_peak)
    return {"method": method, "replies": n, "ms_per_reply": 1e3 * statistics.median(times) / n,
            "peak_extra_bytes": peak, "model_bytes": model_bytes, "reply_bytes": reply_bytes,
            "peak_over_2_models_plus_one_reply": peak / (2 * model_bytes + reply_bytes)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="conef-cs,ef-topk,ef-sign")
    ap.add_argument("--replies", default="10,100,1000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench_server.json")
    ap.add_argument("--save", action="store_true", help=f"write {SAVED}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(m, int(n), args.repeats) for m in args.methods.split(",") for n in args.replies.split(",")]
    out = SAVED if args.save else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    for r in rows:
        ratio = r["peak_over_2_models_plus_one_reply"]
        print(f"{r['method']:10s} {r['replies']:5d} replies: {r['ms_per_reply']:.3f} ms/reply, peak extra "
              f"{r['peak_extra_bytes'] / 1e6:.2f} MB = {ratio:.2f} x (2 models + 1 reply)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
