"""Server aggregation through the ConEF wrapper: time per reply and peak extra memory, 10 / 100 / 1,000 replies.

    python -m sim.bench_server                       # -> outputs/bench_server.json
    python -m sim.bench_server --save                # -> docs/results/bench_server.json

Replies are built once (one error-feedback step of a random update on the 184,586-
parameter MNIST CNN, encoded exactly as ``conef_mod`` sends it) and the wrapper's
``aggregate_train`` is timed on them (median of ``--repeats``; wall clock, and the process's CPU
time, which a loaded machine inflates less). Peak extra memory is what
``aggregate_train`` allocates beyond the replies it was given: torch allocations from the
profiler's memory events plus numpy and Python allocations from ``tracemalloc`` (measured in
separate calls; their peaks added: an upper bound). ``machine.native_kernels`` says whether the
compiled kernels of :mod:`conef_fl.native` were used (the scaled-sign decode runs through them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
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

from conef_fl import native
from conef_fl.flower import ConEF
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import encode_payloads
from conef_fl.measure import measure_transient
from conef_fl.tasks.models import MnistCNN
from conef_fl.worker import CompressionWorker

log = logging.getLogger("sim.bench_server")
SAVED = Path("docs/results/bench_server.json")
SCHEMA = "conef-fl/bench_server/2"
#: Issue #13 target 5: time per reply at the 184k-parameter CNN.
TARGET_MS_PER_REPLY = 1.0


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        new, metrics = strategy.aggregate_train(1, replies)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert new is not None and metrics["conef.accepted"] == n
    tracemalloc.start()  # numpy and Python allocations (without the profiler, whose own objects it would count)
    strategy.aggregate_train(1, replies)
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _, torch_mem = measure_transient(lambda: strategy.aggregate_train(1, replies))
    reply_bytes = sum(a.count_bytes() for a in replies[0].content.array_records.values())
    peak = int(torch_mem.peak_bytes) + int(numpy_peak)
    limit = 2 * model_bytes + reply_bytes
    ms = 1e3 * statistics.median(times) / n
    return {"method": method, "replies": n, "ms_per_reply": ms, "ms_per_reply_min": 1e3 * min(times) / n,
            "cpu_ms_per_reply": 1e3 * statistics.median(cpu) / n,
            "times_s": times, "peak_extra_bytes": peak, "peak_torch_bytes": int(torch_mem.peak_bytes),
            "peak_numpy_python_bytes": int(numpy_peak), "model_bytes": model_bytes, "reply_bytes": reply_bytes,
            "peak_over_2_models_plus_one_reply": peak / limit,
            "targets": {"ms_per_reply_le_1": ms <= TARGET_MS_PER_REPLY,
                        "peak_le_2_models_plus_one_reply": peak <= limit}}


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
    t0, load_start = time.time(), _loadavg()
    rows = [measure(m, int(n), args.repeats) for m in args.methods.split(",") for n in args.replies.split(",")]
    result = {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.fromtimestamp(t0, datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "sim.bench_server", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_version": torch.__version__,
                    "python_version": platform.python_version(), "torch_threads": torch.get_num_threads(),
                    "native_kernels": native.ops() is not None},
        "load_avg_start": load_start,
        "load_avg_end": _loadavg(),
        "elapsed_s": time.time() - t0,
        "targets": {"ms_per_reply": TARGET_MS_PER_REPLY, "peak_extra": "2 x model + one reply",
                    "model": "MnistCNN (184,586 parameters)"},
        "rows": rows,
    }
    out = SAVED if args.save else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"load average {result['load_avg_start']} -> {result['load_avg_end']}")
    for r in rows:
        ratio = r["peak_over_2_models_plus_one_reply"]
        print(f"{r['method']:10s} {r['replies']:5d} replies: {r['ms_per_reply']:.3f} ms/reply "
              f"(CPU {r['cpu_ms_per_reply']:.3f}), peak extra "
              f"{r['peak_extra_bytes'] / 1e6:.2f} MB = {ratio:.2f} x (2 models + 1 reply)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
