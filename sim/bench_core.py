"""Compressor-core benchmark (issues #2 §6 and #13): one run reports the whole compressor core.

For each size ``d`` (default 1M and 10M float32 values; ``--sizes 1e6,1e7,5e7`` adds 50M):

* one ``x.add_(y)`` over ``d`` values: the memory-bandwidth yardstick (on ``--device``);
* count-sketch update (``CountSketch.accumulate_``) and decompress
  (``CountSketch.estimate_add_`` into a ``d``-vector), ``v = 1`` (float32, float16,
  bfloat16 tables) and ``v = 3`` (float32), ``w = 0.1 d``, and the update +
  decompress pair, timed round-robin with ``add_``;
* a table-based count sketch in csvec's design (FetchSGD: an int64 bucket table and
  a float sign table of ``d`` entries per row, ``bincount`` to sketch, a gather to
  recover) at the same geometry (``v = 1``, ``0.1 d`` table entries), timed in the
  same loop: the in-process anchor;
* one EFSGD step and one ConEF step (``conef-cs``, β = 0.9, sketch ratio 0.1,
  ``v = 1``, float32 and float16 sketch) with the same ``Q``, for random-block-k
  10 %, random-k 1 %, top-k 1 % and scaled sign: time, persistent memory and the
  transient peak of the step beyond the payload it returns;
* every gradient compressor's ``compress``, ``decompress`` and ``decompress_add_``.

Once per run, the fixed cost per tensor: single tensors of ``d`` = 100K and 1M,
and a layer-wise model with ResNet-18's 62 tensor shapes (11.7M values), EFSGD
vs ConEF with every ``Q``.

Memory is **measured** (:func:`conef_fl.measure.persistent_bytes`,
:func:`conef_fl.measure.measure_transient`), never computed from shapes. Timing: one
warm-up call, then ``repeats`` timed calls; min and median are recorded; operations
compared by a ratio are timed round-robin in the same loop. Nothing here asserts on
timing: it is a benchmark, not a test.

Usage::

    python -m sim.bench_core [--sizes 1e6,1e7] [--repeats 7] [--threads 2] [--device cpu]
                             [--out outputs/bench_core.json] [--save] [--quick] [--parts ...]

Writes the JSON to ``--out`` and a markdown summary next to it (same name, ``.md``);
``--save`` also writes ``docs/results/bench_core.{json,md}`` (never written otherwise).
The keys are documented in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from conef_fl import native
from conef_fl.compressors import make_compressor
from conef_fl.error_stores.base import check_finite
from conef_fl.error_stores.sketch import CountSketch, SketchGeometry, hash_cache_info
from conef_fl.feedback import make_feedback
from conef_fl.measure import measure_transient, persistent_bytes
from conef_fl.registry import method_config
from conef_fl.worker import CompressionWorker

SCHEMA = "conef-fl/bench_core/2"
DEFAULT_SIZES = (1_000_000, 10_000_000)
DEFAULT_OUT = "outputs/bench_core.json"
SAVED_OUT = "docs/results/bench_core.json"
#: The size at which the targets are checked.
TARGET_D = 10_000_000
#: Error-compressor settings of the ConEF steps and sketches.
SKETCH_RATIO = 0.1
BETA = 0.9
#: A compressor call slower than this (seconds) is "slow": at larger sizes it is
#: skipped when its extrapolated time exceeds it, and it gets fewer repeats.
SLOW_LIMIT_S = 10.0
#: Wall-clock budget per timed item (seconds); repeats are cut to fit (recorded).
ITEM_BUDGET_S = 15.0
#: Single-tensor sizes of the fixed-cost-per-tensor measurement.
FIXED_COST_SIZES = (100_000, 1_000_000)
PARTS = ("sketch", "steps", "compressors", "fixed", "server")
#: Server aggregation through the ConEF wrapper (``sim.bench_server``): methods and reply counts.
SERVER_METHODS = ("conef-cs", "ef-topk", "ef-sign")
SERVER_REPLIES = (10, 100, 1000)

#: Gradient compressors whose EFSGD and ConEF steps are compared: name -> (label, kwargs for method_config).
STEP_COMPRESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "random-block-k": ("random-block-k 10 %", {"k_ratio": 0.1}),
    "random-k": ("random-k 1 %", {"k_ratio": 0.01}),
    "top-k": ("top-k 1 %", {"k_ratio": 0.01}),
    "scaled-sign": ("scaled sign", {}),
}
#: The main case of the step targets.
MAIN_Q = "random-block-k"
#: Sketch configurations: name -> (rows, table dtype).
SKETCH_CONFIGS: dict[str, tuple[int, str]] = {
    "v1_float32": (1, "float32"),
    "v1_float16": (1, "float16"),
    "v1_bfloat16": (1, "bfloat16"),
    "v3_float32": (3, "float32"),
}

#: Every gradient compressor: name -> constructor kwargs.
COMPRESSOR_PARAMS: dict[str, dict[str, Any]] = {
    "identity": {},
    "random-block-k": {"ratio": 0.1},
    "random-k": {"ratio": 0.01},
    "top-k": {"ratio": 0.01},
    "scaled-sign": {},
    "powersgd": {"rank": 4},
    "qsgd": {"levels": 16},
    "rbsgd": {"ratio": 0.1},
    "atomo": {"rank": 4},
}
#: How a compressor's time grows with d, for extrapolating to a larger size (exponent).
#: ATOMO is an SVD of a ~sqrt(d) x sqrt(d) matrix: O(d^1.5).
_GROWTH = {"atomo": 1.5}

_DEVICE = torch.device("cpu")


def _log(msg: str) -> None:
    print(f"[bench_core {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync() -> None:
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize(_DEVICE)


def resnet18_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 62 parameter shapes of torchvision's ResNet-18, in module order (11.7M values)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if s != 1 or cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(num_classes, 512), (num_classes,)]


class TableCountSketch:
    """A count sketch in csvec's design (FetchSGD's ``CSVec``), the in-process anchor.

    Per row an int64 bucket table and a float32 sign table with one entry per
    coordinate (3× the vector's own bytes at ``v = 1``), a ``bincount`` with weights
    to sketch, a gather to recover (csvec's ``unSketch`` before its top-k).
    """

    def __init__(self, numel: int, columns: int, rows: int = 1, seed: int = 0, device: torch.device = _DEVICE):
        g = torch.Generator().manual_seed(seed)
        self.columns = columns
        self.buckets = torch.randint(0, columns, (rows, numel), generator=g).to(device)
        self.signs = torch.randint(0, 2, (rows, numel), generator=g).to(device, torch.float32).mul_(2).sub_(1)
        self.table = torch.zeros(rows, columns, device=device)

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [self.buckets, self.signs, self.table]

    def accumulate_(self, x: torch.Tensor) -> None:
        for r in range(self.table.shape[0]):
            self.table[r] += torch.bincount(self.buckets[r], weights=self.signs[r] * x, minlength=self.columns)

    def estimate_add_(self, target: torch.Tensor) -> None:
        vals = [self.table[r][self.buckets[r]] * self.signs[r] for r in range(self.table.shape[0])]
        target.add_(vals[0] if len(vals) == 1 else torch.stack(vals).median(0).values)


# ---------------------------------------------------------------------------------------------
# timing and memory helpers
# ---------------------------------------------------------------------------------------------


def _summary(samples_s: Sequence[float]) -> dict[str, Any]:
    ms = [1e3 * s for s in samples_s]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "repeats": len(ms),
        "samples_ms": [round(x, 4) for x in ms],
    }


#: CPU seconds (``time.process_time``) of the latest :func:`_timed_call`.
_LAST_CPU_S = [0.0]


def _timed_call(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
    """Wall-clock seconds of one ``fn()`` call (``setup()`` first, untimed; synchronised around on CUDA).

    The process's CPU seconds of the same call are left in ``_LAST_CPU_S[0]``.
    """
    if setup is not None:
        setup()
    _sync()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync()
    t1, c1 = time.perf_counter(), time.process_time()
    _LAST_CPU_S[0] = c1 - c0
    return t1 - t0


def time_round_robin(
    items: dict[str, Callable[[], Any]],
    repeats: int,
    setup: dict[str, Callable[[], Any]] | None = None,
    budget_s: float = ITEM_BUDGET_S,
    warm: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several callables round-robin: one warm-up each, then ``repeats`` rounds.

    ``setup[name]`` (if given) runs before every call of ``items[name]`` and is not timed.
    The budget is ``budget_s`` per item: if ``repeats`` rounds (judged from the warm-up
    round) would exceed ``budget_s · len(items)``, fewer rounds are run: at least 3, or
    1 when one round takes more than :data:`SLOW_LIMIT_S`; ``repeats`` in each result
    says how many. ``warm`` (seconds per name): the caller already ran the warm-up
    calls and timed them. On CUDA every call is followed by a synchronisation.
    """
    setup = setup or {}
    if warm is None:
        warm = {name: _timed_call(fn, setup.get(name)) for name, fn in items.items()}
    per_round = sum(warm.values())
    total_budget = budget_s * len(items)
    n = repeats
    if per_round * repeats > total_budget:
        floor = 1 if per_round > SLOW_LIMIT_S else 3
        n = min(repeats, max(floor, int(total_budget // max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in items}
    cpu: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(n):
        for name, fn in items.items():
            samples[name].append(_timed_call(fn, setup.get(name)))
            cpu[name].append(_LAST_CPU_S[0])
    out = {}
    for name in items:
        s = _summary(samples[name])
        s["warmup_ms"] = 1e3 * warm[name]
        s["cpu_median_ms"] = 1e3 * statistics.median(cpu[name])
        s["cpu_min_ms"] = 1e3 * min(cpu[name])
        out[name] = s
    return out


def _transient(fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    """Run ``fn`` under :func:`measure_transient`; return its result and peak/retained bytes."""
    out, m = measure_transient(fn, _DEVICE)
    return out, {"peak_bytes": m.peak_bytes, "retained_bytes": m.retained_bytes}


def machine_info(threads: int) -> dict[str, Any]:
    """Torch version, threads, CPU model, memory and device of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "mem_total_bytes": mem_total,
        "device": str(_DEVICE),
        "device_name": torch.cuda.get_device_name(_DEVICE) if _DEVICE.type == "cuda" else cpu,
        # the compiled CPU kernels (conef_fl.native): used unless CONEF_NATIVE=0 or not built
        "native_kernels": native.ops() is not None,
    }


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _free() -> None:
    gc.collect()
    if _DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# the parts of one size
# ---------------------------------------------------------------------------------------------


def bench_sketch(d: int, repeats: int, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """``add_``, our sketch's update / decompress / pair per configuration and the table-based anchor.

    Everything is timed round-robin in one loop.
    """
    sketches = {
        name: CountSketch(SketchGeometry.for_ratio(d, SKETCH_RATIO, v), seed=12345, dtype=dt, device=_DEVICE)
        for name, (v, dt) in SKETCH_CONFIGS.items()
    }
    main = sketches["v1_float32"].geometry
    table = TableCountSketch(d, main.buckets * main.unit, rows=1, seed=12345, device=_DEVICE)

    def pair(sk: CountSketch | TableCountSketch) -> None:
        sk.accumulate_(x)
        sk.estimate_add_(target)

    items: dict[str, Callable[[], Any]] = {"add_": lambda: x.add_(y)}
    for name, sk in [*sketches.items(), ("table_sketch", table)]:
        items[f"{name}/update"] = lambda sk=sk: sk.accumulate_(x)
        items[f"{name}/decompress"] = lambda sk=sk: sk.estimate_add_(target)
        items[f"{name}/pair"] = lambda sk=sk: pair(sk)
    times = time_round_robin(items, repeats)
    add = times.pop("add_")
    add["gb_per_s"] = 12.0 * d / (add["median_ms"] * 1e-3) / 1e9  # read x, y; write x
    out: dict[str, Any] = {"add": add, "configs": {}}
    for name, sk in sketches.items():
        v, dt = SKETCH_CONFIGS[name]
        g = sk.geometry
        _, upd_mem = _transient(lambda sk=sk: sk.accumulate_(x))
        _, dec_mem = _transient(lambda sk=sk: sk.estimate_add_(target))
        tb = persistent_bytes(sk.persistent_tensors())
        entry: dict[str, Any] = {
            "rows": v, "dtype": dt, "ratio": SKETCH_RATIO, "buckets": g.buckets, "unit": g.unit,
            "width": g.buckets * g.unit, "table_bytes": tb, "table_fraction_of_4d": tb / (4 * d),
        }
        for op in ("update", "decompress", "pair"):
            t = times[f"{name}/{op}"]
            t["over_add"] = t["median_ms"] / add["median_ms"]
            entry[op] = t
        entry["update"]["transient"] = upd_mem
        entry["decompress"]["transient"] = dec_mem
        out["configs"][name] = entry
    fp32 = out["configs"]["v1_float32"]
    for name in ("v1_float16", "v1_bfloat16"):
        c = out["configs"][name]
        c["pair_over_fp32_pair"] = c["pair"]["median_ms"] / fp32["pair"]["median_ms"]
        c["pair_over_fp32_pair_min"] = c["pair"]["min_ms"] / fp32["pair"]["min_ms"]
    tbytes = persistent_bytes(table.persistent_tensors())
    anchor: dict[str, Any] = {"design": "csvec (int64 buckets + float32 signs per coordinate, bincount / gather)",
                              "rows": 1, "columns": table.columns, "persistent_bytes": tbytes,
                              "persistent_fraction_of_4d": tbytes / (4 * d)}
    for op in ("update", "decompress", "pair"):
        t = times[f"table_sketch/{op}"]
        t["over_ours"] = t["median_ms"] / fp32[op]["median_ms"]
        t["over_ours_min"] = t["min_ms"] / fp32[op]["min_ms"]
        anchor[op] = t
    out["table_sketch"] = anchor
    del sketches, table
    return out


def _step_configs(q: str, kw: dict[str, Any]) -> dict[str, Any]:
    common = {"compressor": q, **kw}
    sk = {"beta": BETA, "sketch_ratio": SKETCH_RATIO, "sketch_rows": 1}
    return {
        "efsgd": method_config("efsgd", **common),
        "conef": method_config("conef-cs", **common, **sk, sketch_dtype="float32"),
        "conef_fp16": method_config("conef-cs", **common, **sk, sketch_dtype="float16"),
    }


def _transient_entry(payload_bytes: int, mem: dict[str, int], four_d: int) -> dict[str, Any]:
    peak = mem["peak_bytes"]
    return {
        "peak_bytes": peak,
        "retained_bytes": mem["retained_bytes"],
        "payload_bytes": payload_bytes,
        "peak_minus_payload_bytes": peak - payload_bytes,
        "peak_minus_payload_fraction_of_4d": (peak - payload_bytes) / four_d,
    }


def bench_steps(d: int, repeats: int, src: torch.Tensor, u: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """EFSGD vs ConEF steps with the same Q: time (round-robin), persistent and transient memory.

    Also returns the fixed per-step overheads shared by every method (timed in the
    main case's loop): ``check_finite`` of the update, which every ``step`` runs first.
    """
    out: dict[str, Any] = {}
    overheads: dict[str, Any] = {}
    four_d = 4 * d
    refill = lambda: u.copy_(src)  # noqa: E731 - refill of the preallocated update buffer (not timed)
    for q, (label, kw) in STEP_COMPRESSORS.items():
        cfgs = _step_configs(q, kw)
        fbs = {name: make_feedback(cfg, (d,), key="bench", device=_DEVICE) for name, cfg in cfgs.items()}
        seeds = {name: iter(range(1, 10**6)) for name in fbs}
        items = {
            name: (lambda fb=fb, it=seeds[name]: fb.step(u, seed=next(it), consume=True)) for name, fb in fbs.items()
        }
        setup = {name: refill for name in fbs}
        if q == MAIN_Q:
            items["check_finite"] = lambda: check_finite(u, "u")
        times = time_round_robin(items, repeats, setup)
        if q == MAIN_Q:
            overheads["check_finite"] = times.pop("check_finite")
            del items["check_finite"]
        entry: dict[str, Any] = {"label": label, "params": kw, "methods": {}}
        for name, fb in fbs.items():
            refill()
            payload, mem = _transient(lambda fb=fb: fb.step(u, seed=999_983, consume=True))
            pb = persistent_bytes(fb.persistent_tensors())
            entry["methods"][name] = {
                "config": cfgs[name].to_dict(),
                "time": times[name],
                "persistent_bytes": pb,
                "nbytes": fb.nbytes,
                "persistent_fraction_of_4d": pb / four_d,
                "transient": _transient_entry(payload.nbytes, mem, four_d),
            }
        ef = times["efsgd"]
        entry["conef_over_efsgd"] = times["conef"]["median_ms"] / ef["median_ms"]
        entry["conef_over_efsgd_min"] = times["conef"]["min_ms"] / ef["min_ms"]
        entry["conef_fp16_over_efsgd"] = times["conef_fp16"]["median_ms"] / ef["median_ms"]
        out[q] = entry
        _log(f"  steps {label}: EFSGD {ef['median_ms']:.2f} ms, ConEF {times['conef']['median_ms']:.2f} ms "
             f"({entry['conef_over_efsgd']:.2f}x)")
        del fbs, items
        _free()
    return out, overheads


def _time_model_steps(shapes: Sequence[tuple[int, ...]], q: str, kw: dict[str, Any], repeats: int,
                      gen: torch.Generator) -> dict[str, Any]:
    """One step over every tensor of a layer-wise model, EFSGD vs ConEF (fp32 sketch), round-robin.

    Each method is one :class:`~conef_fl.worker.CompressionWorker` (what a client runs): every
    tensor is checked, then stepped with ``consume=True``; ConEF steps its small tensors together
    (``worker.group``).
    """
    cfgs = {k: v for k, v in _step_configs(q, kw).items() if k in ("efsgd", "conef")}
    names = {f"layer{i}": s for i, s in enumerate(shapes)}
    srcs = {k: torch.randn(s, generator=gen).to(_DEVICE) for k, s in names.items()}
    bufs = {k: torch.empty_like(t) for k, t in srcs.items()}
    total = sum(t.numel() for t in srcs.values())
    models = {name: CompressionWorker(cfg, names, device=_DEVICE) for name, cfg in cfgs.items()}
    seeds = {name: iter(range(1, 10**6)) for name in models}

    def refill() -> None:
        for k, b in bufs.items():
            b.copy_(srcs[k])

    def run(name: str, seed: int | None = None) -> int:
        s = next(seeds[name]) if seed is None else seed
        return sum(p.nbytes for p in models[name].step(bufs, seed=s, consume=True).values())

    items = {name: (lambda name=name: run(name)) for name in models}
    times = time_round_robin(items, repeats, {name: refill for name in models})
    group = models["conef"].group
    entry: dict[str, Any] = {"tensors": len(shapes), "numel": total, "methods": {},
                             "conef_grouped_tensors": len(group.keys) if group is not None else 0}
    for name in models:
        refill()
        payload_bytes, mem = _transient(lambda name=name: run(name, 999_983))
        entry["methods"][name] = {
            "time": times[name],
            "persistent_bytes": persistent_bytes(models[name].persistent_tensors()),
            "transient": _transient_entry(int(payload_bytes), mem, 4 * total),
        }
    ef, ce = times["efsgd"], times["conef"]
    entry["conef_over_efsgd"] = ce["median_ms"] / ef["median_ms"]
    entry["conef_over_efsgd_min"] = ce["min_ms"] / ef["min_ms"]
    entry["extra_ms_per_tensor"] = (ce["median_ms"] - ef["median_ms"]) / len(shapes)
    return entry


def bench_fixed_cost(repeats: int) -> dict[str, Any]:
    """The fixed cost per tensor: sketch operations and steps on small single tensors, and a layer-wise model."""
    gen = torch.Generator().manual_seed(7)
    out: dict[str, Any] = {"single": {}, "resnet18": {}}
    for d in FIXED_COST_SIZES:
        x = torch.randn(d, generator=gen).to(_DEVICE)
        y, target = torch.randn_like(x), torch.zeros_like(x)
        sk = CountSketch(SketchGeometry.for_ratio(d, SKETCH_RATIO), seed=3, device=_DEVICE)
        t = time_round_robin({"add_": lambda x=x, y=y: x.add_(y), "update": lambda sk=sk, x=x: sk.accumulate_(x),
                              "decompress": lambda sk=sk, t=target: sk.estimate_add_(t)}, max(repeats, 15))
        entry: dict[str, Any] = {"d": d, "sketch": t, "steps": {}}
        for q, (_label, kw) in STEP_COMPRESSORS.items():
            model = _time_model_steps([(d,)], q, kw, max(repeats, 15), gen)
            entry["steps"][q] = model
        out["single"][str(d)] = entry
        _log(f"  fixed cost d={d}: update {t['update']['median_ms']:.3f} ms, decompress "
             f"{t['decompress']['median_ms']:.3f} ms, add_ {t['add_']['median_ms']:.3f} ms")
        _free()
    shapes = resnet18_shapes()
    out["resnet18"]["shapes"] = [list(s) for s in shapes]
    for q, (label, kw) in STEP_COMPRESSORS.items():
        e = _time_model_steps(shapes, q, kw, repeats, gen)
        e["label"] = label
        out["resnet18"][q] = e
        _log(f"  layer-wise ResNet-18, {label}: EFSGD {e['methods']['efsgd']['time']['median_ms']:.1f} ms, "
             f"ConEF {e['methods']['conef']['time']['median_ms']:.1f} ms ({e['conef_over_efsgd']:.2f}x)")
        _free()
    return out


def bench_compressors(d: int, repeats: int, x: torch.Tensor, target: torch.Tensor,
                      previous: dict[str, Any] | None) -> dict[str, Any]:
    """Each Q's compress, decompress (new tensor) and decompress_add_ (into a buffer), with memory."""
    out: dict[str, Any] = {}
    for name, kw in COMPRESSOR_PARAMS.items():
        entry: dict[str, Any] = {"params": kw, "skipped": None}
        prev = (previous or {}).get(name)
        if d > TARGET_D and prev is not None and prev.get("compress") and prev.get("d"):
            # extrapolate the previous size's time; skip if it would exceed the slow limit
            t_prev = (prev["compress"]["median_ms"] + prev["decompress"]["median_ms"]) / 1e3
            growth = (d / prev["d"]) ** _GROWTH.get(name, 1.0)
            predicted = t_prev * growth
            if predicted > SLOW_LIMIT_S:
                entry["skipped"] = (
                    f"predicted {predicted:.1f} s per compress+decompress at d={d} "
                    f"(from {t_prev:.2f} s at d={prev['d']}, growth d^{_GROWTH.get(name, 1.0)}) > {SLOW_LIMIT_S} s"
                )
                out[name] = entry
                _log(f"  compressor {name}: skipped ({entry['skipped']})")
                continue
        q = make_compressor(name, **kw)
        seeds = iter(range(1, 10**6))
        state: dict[str, Any] = {}

        def comp(q=q, seeds=seeds, state=state) -> None:
            state["payload"] = q.compress(x, seed=next(seeds), key="bench")

        def decomp(q=q, state=state) -> None:
            q.decompress(state["payload"])

        def decomp_add(q=q, state=state) -> None:
            q.decompress_add_(state["payload"], target, alpha=1e-3)

        items = {"compress": comp, "decompress": decomp, "decompress_add": decomp_add}
        # The warm-up compress runs under measure_transient; for a slow compressor (one call
        # > SLOW_LIMIT_S) that measurement is kept instead of paying for another call.
        t0 = time.perf_counter()
        _, cmem = _transient(comp)
        warm = {"compress": time.perf_counter() - t0}
        for op in ("decompress", "decompress_add"):  # rest of the warm-up round
            t0 = time.perf_counter()
            items[op]()
            warm[op] = time.perf_counter() - t0
        first = warm["compress"]
        times = time_round_robin(items, repeats, warm=warm)
        entry["d"] = d
        entry.update(times)
        entry["compress_transient_from_warmup"] = first > SLOW_LIMIT_S
        if first > SLOW_LIMIT_S:
            payload = state["payload"]
        else:
            payload, cmem = _transient(lambda q=q: q.compress(x, seed=424_242, key="bench"))
        _, dmem = _transient(lambda q=q, p=payload: q.decompress(p))
        _, amem = _transient(lambda q=q, p=payload: q.decompress_add_(p, target, alpha=1e-3))
        entry["compress"]["transient"] = cmem
        entry["decompress"]["transient"] = dmem
        entry["decompress_add"]["transient"] = amem
        entry["payload_bytes"] = payload.nbytes
        entry["payload_fraction_of_4d"] = payload.nbytes / (4 * d)
        entry["slow"] = first > SLOW_LIMIT_S or times["compress"]["median_ms"] > 1e3 * SLOW_LIMIT_S
        out[name] = entry
        _log(f"  compressor {name}: compress {times['compress']['median_ms']:.1f} ms, "
             f"decompress {times['decompress']['median_ms']:.1f} ms ({times['compress']['repeats']} repeats)")
        del q, payload, state
        _free()
    return out


def bench_size(d: int, repeats: int, parts: Sequence[str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything for one size ``d``."""
    gen = torch.Generator().manual_seed(d)
    res: dict[str, Any] = {"d": d, "load_avg_start": _loadavg()}
    t0 = time.perf_counter()
    x = torch.randn(d, generator=gen).to(_DEVICE)
    target = torch.zeros_like(x)
    if "sketch" in parts:
        _log(f"d={d}: add_, sketches and the table-based anchor")
        y = torch.randn(d, generator=gen).to(_DEVICE)
        res["sketch"] = bench_sketch(d, repeats, x, y, target)
        del y
        x.copy_(torch.randn(d, generator=gen))  # add_ grew x; restore a standard normal vector
        target.zero_()
        _free()
    if "steps" in parts:
        _log(f"d={d}: EFSGD vs ConEF steps")
        u = torch.empty_like(x)
        res["steps"], res["overheads"] = bench_steps(d, repeats, x, u)
        del u
        _free()
    if "compressors" in parts:
        _log(f"d={d}: compressors")
        res["compressors"] = bench_compressors(d, repeats, x, target, previous)
    res["load_avg_end"] = _loadavg()
    res["elapsed_s"] = time.perf_counter() - t0
    del x, target
    _free()
    return res


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------


def _target(name: str, measured: float | None, target: float, unit: str, note: str = "",
            measured_min: float | None = None, at_least: bool = False,
            measured_cpu: float | None = None) -> dict[str, Any]:
    met = None if measured is None else bool(measured >= target if at_least else measured <= target)
    met_cpu = None if measured_cpu is None else bool(measured_cpu >= target if at_least else measured_cpu <= target)
    return {"name": name, "measured": measured, "measured_min": measured_min, "measured_cpu": measured_cpu,
            "target": target, "unit": unit, "at_least": at_least, "met": met, "met_cpu": met_cpu, "note": note}


def _cpu_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Ratio of the CPU-time medians of two timings (``None`` if either lacks them)."""
    if "cpu_median_ms" not in a or "cpu_median_ms" not in b or b["cpu_median_ms"] <= 0:
        return None
    return a["cpu_median_ms"] / b["cpu_median_ms"]


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Targets of issue #13 (and #2 §6) at d = 10M (or the largest size run) and on the fixed-cost part."""
    sizes = result["sizes"]
    rows: list[dict[str, Any]] = []
    d = None
    if sizes:
        key = str(TARGET_D) if str(TARGET_D) in sizes else max(sizes, key=int)
        r = sizes[key]
        d = r["d"]
        if "sketch" in r:
            add = r["sketch"]["add"]
            c = r["sketch"]["configs"]["v1_float32"]
            rows.append(_target("sketch update + decompress / add_ (v=1, w=0.1d, fp32)", c["pair"]["over_add"], 2.0,
                                "x add_", f"pair {c['pair']['median_ms']:.2f} ms (min {c['pair']['min_ms']:.2f}) vs "
                                f"add_ {add['median_ms']:.2f} ms (min {add['min_ms']:.2f})",
                                c["pair"]["min_ms"] / add["min_ms"], measured_cpu=_cpu_ratio(c["pair"], add)))
            for name in ("v1_float16", "v1_bfloat16"):
                h = r["sketch"]["configs"][name]
                rows.append(_target(f"sketch pair, {h['dtype']} table / fp32 table", h["pair_over_fp32_pair"], 1.5,
                                    "x fp32", f"{h['pair']['median_ms']:.2f} vs {c['pair']['median_ms']:.2f} ms",
                                    h["pair_over_fp32_pair_min"], measured_cpu=_cpu_ratio(h["pair"], c["pair"])))
            a = r["sketch"]["table_sketch"]
            rows.append(_target("table-based count sketch (csvec design) / ours, update + decompress",
                                a["pair"]["over_ours"], 20.0, "x ours",
                                f"{a['pair']['median_ms']:.1f} vs {c['pair']['median_ms']:.2f} ms; its tables: "
                                f"{100 * a['persistent_fraction_of_4d']:.0f} % of 4d", a["pair"]["over_ours_min"],
                                at_least=True, measured_cpu=_cpu_ratio(a["pair"], c["pair"])))
        if "steps" in r:
            for q, e in r["steps"].items():
                main = " (main case)" if q == MAIN_Q else ""
                ce, ee = e["methods"]["conef"]["time"], e["methods"]["efsgd"]["time"]
                rows.append(_target(f"ConEF step / EFSGD step, {e['label']}{main}", e["conef_over_efsgd"], 1.0,
                                    "x EFSGD", f"{ce['median_ms']:.2f} vs {ee['median_ms']:.2f} ms (mins "
                                    f"{ce['min_ms']:.2f} vs {ee['min_ms']:.2f})", e["conef_over_efsgd_min"],
                                    measured_cpu=_cpu_ratio(ce, ee)))
            m = r["steps"][MAIN_Q]["methods"]
            for meth, lab, lim in (("conef", "fp32", 0.10), ("conef_fp16", "fp16", 0.05)):
                rows.append(_target(f"persistent error state / 4d, {lab} sketch", m[meth]["persistent_fraction_of_4d"],
                                    lim, "fraction", f"{m[meth]['persistent_bytes']} B vs 4d = {4 * d} B"))
            for e in r["steps"].values():
                for meth, lab in (("efsgd", "EFSGD"), ("conef", "ConEF fp32"), ("conef_fp16", "ConEF fp16")):
                    t = e["methods"][meth]["transient"]
                    rows.append(_target(f"step transient (peak - payload) / 4d, {lab}, {e['label']}",
                                        t["peak_minus_payload_fraction_of_4d"], 0.02, "fraction",
                                        f"peak {t['peak_bytes']} B, payload {t['payload_bytes']} B"))
    fixed = result.get("fixed_cost")
    if fixed:
        for q, e in fixed["resnet18"].items():
            if q == "shapes":
                continue
            ce, ee = e["methods"]["conef"]["time"], e["methods"]["efsgd"]["time"]
            rows.append(_target(f"layer-wise ResNet-18 ({e['tensors']} tensors), ConEF / EFSGD, {e['label']}",
                                e["conef_over_efsgd"], 1.2, "x EFSGD",
                                f"{ce['median_ms']:.1f} vs {ee['median_ms']:.1f} ms; "
                                f"{1e3 * e['extra_ms_per_tensor']:.0f} us more per tensor", e["conef_over_efsgd_min"],
                                measured_cpu=_cpu_ratio(ce, ee)))
    server = result.get("server")
    if server:
        for row in server["rows"]:
            if row["replies"] != max(r["replies"] for r in server["rows"]):
                continue
            label = f"server, {row['method']}, {row['replies']:,} replies"
            rows.append(_target(f"{label}: CPU ms per reply", row["cpu_ms_per_reply"], server["target_ms_per_reply"],
                                "ms", f"wall {row['ms_per_reply']:.2f} ms per reply"))
            rows.append(_target(f"{label}: peak extra memory / (2 models + 1 reply)",
                                row["peak_over_2_models_plus_one_reply"], 1.0, "x limit",
                                f"{row['peak_extra_bytes'] / 1e6:.2f} MB; model {row['model_bytes'] / 1e6:.2f} MB"))
    return {"d": d, "rows": rows}


def bench_server_part(replies: Sequence[int], repeats: int) -> dict[str, Any]:
    """Server aggregation scaling: :func:`sim.bench_server.measure` for every method and reply count.

    One thread, the 184,586-parameter MNIST CNN; time per reply (wall and CPU) and the
    peak extra memory of ``aggregate_train`` against "2 models + 1 reply".
    """
    from sim import bench_server

    _log(f"server aggregation: {', '.join(SERVER_METHODS)} with {', '.join(map(str, replies))} replies")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [bench_server.measure(m, int(n), repeats) for m in SERVER_METHODS for n in replies]
    finally:
        torch.set_num_threads(threads)
    return {"model": "MnistCNN (184,586 parameters)", "threads": 1, "repeats": repeats,
            "target_ms_per_reply": bench_server.TARGET_MS_PER_REPLY, "rows": rows}


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------


def run_benchmark(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 7, threads: int = 2,
                  command: str | None = None, quick: bool = False, parts: Sequence[str] = PARTS,
                  device: str = "cpu") -> dict[str, Any]:
    """Run the whole benchmark and return the result dict (see ``docs/benchmarks.md``)."""
    global _DEVICE
    _DEVICE = torch.device(device)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(threads),
        "settings": {
            "sizes": list(sizes),
            "repeats": repeats,
            "warmup": 1,
            "threads": threads,
            "device": str(_DEVICE),
            "quick": quick,
            "parts": list(parts),
            "sketch_ratio": SKETCH_RATIO,
            "beta": BETA,
            "slow_limit_s": SLOW_LIMIT_S,
            "item_budget_s": ITEM_BUDGET_S,
            "step_compressors": {q: kw for q, (_, kw) in STEP_COMPRESSORS.items()},
            "sketch_configs": {k: {"rows": v, "dtype": dt} for k, (v, dt) in SKETCH_CONFIGS.items()},
            "compressor_params": COMPRESSOR_PARAMS,
            "fixed_cost_sizes": list(FIXED_COST_SIZES),
        },
        "load_avg_start": _loadavg(),
        "sizes": {},
    }
    previous: dict[str, Any] | None = None
    for d in sizes:
        r = bench_size(int(d), repeats, parts, previous)
        result["sizes"][str(int(d))] = r
        previous = r.get("compressors")
        _log(f"d={d}: done in {r['elapsed_s']:.1f} s, load {_loadavg()}")
    if "fixed" in parts:
        _log("fixed cost per tensor: single tensors and layer-wise ResNet-18")
        result["fixed_cost"] = bench_fixed_cost(repeats)
    if "server" in parts:
        result["server"] = bench_server_part(SERVER_REPLIES[:2] if quick else SERVER_REPLIES, max(1, repeats // 5))
    result["load_avg_end"] = _loadavg()
    result["elapsed_s"] = time.perf_counter() - t0
    result["hash_cache"] = hash_cache_info()  # process-wide sketch hash structures held at the end
    result["targets"] = evaluate_targets(result)
    return result


def sketch_speed(d: int = 10_000_000, rows: int = 1, ratio: float = 0.1, dtype: str = "float32",
                 repeats: int = 7, threads: int = 2) -> dict[str, float]:
    """Median ms of one ``add_`` over ``d`` floats and of a count-sketch update + decompress.

    The headline number of the benchmark, small enough to quote::

        >>> from sim.bench_core import sketch_speed
        >>> sketch_speed(10_000_000)  # doctest: +SKIP
        {'add_ms': ..., 'update_ms': ..., 'decompress_ms': ..., 'pair_ms': ..., 'pair_over_add': ...}
    """
    torch.set_num_threads(threads)
    x, y, target = torch.randn(d), torch.randn(d), torch.zeros(d)
    sk = CountSketch(SketchGeometry.for_ratio(d, ratio, rows), seed=1, dtype=dtype)
    t = time_round_robin({
        "add": lambda: x.add_(y),
        "update": lambda: sk.accumulate_(x),
        "decompress": lambda: sk.estimate_add_(target),
        "pair": lambda: (sk.accumulate_(x), sk.estimate_add_(target)),
    }, repeats)
    out = {f"{k}_ms": v["median_ms"] for k, v in t.items()}
    out["pair_over_add"] = t["pair"]["median_ms"] / t["add"]["median_ms"]
    return out


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def _mb(b: float | None) -> str:
    return "–" if b is None else f"{b / 1e6:.2f}"


def _ms(t: dict[str, Any] | None) -> str:
    return "–" if not t else f"{t['median_ms']:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def to_markdown(result: dict[str, Any]) -> str:
    """A short markdown summary: the targets table, one table per size, the fixed cost per tensor."""
    m = result["machine"]
    lines = [
        "# Compressor-core benchmark",
        "",
        f"Generated by `{result.get('command') or 'python -m sim.bench_core'}` on {result['created_utc']}; "
        f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch_version']}, "
        f"{result['settings']['threads']} threads, device {m.get('device', 'cpu')}, native kernels "
        f"{'on' if m.get('native_kernels') else 'off'}, medians of "
        f"{result['settings']['repeats']} runs after one warm-up (in the same loop for compared items). "
        f"Load average at start {result['load_avg_start']}, at end {result['load_avg_end']}; "
        f"total {result['elapsed_s']:.0f} s. Keys: `docs/benchmarks.md`.",
        "",
    ]
    loads = [result["load_avg_start"], result["load_avg_end"]]
    loads += [r[k] for r in result["sizes"].values() for k in ("load_avg_start", "load_avg_end")]
    worst = max((la[0] for la in loads if la), default=0.0)
    cpus = m.get("logical_cpus") or 0
    if cpus and worst > cpus:
        lines += [f"**Warning: the machine was oversubscribed** (1-min load average up to {worst:.1f} on {cpus} "
                  f"logical CPUs). Timings then include scheduler stalls, worst with several threads (spread between "
                  f"`min_ms` and `median_ms` in the JSON); ratios of mins are shown next to ratios of medians.", ""]
    t = result["targets"]
    lines += [f"## Targets (d = {t['d']:,} unless stated, same run)" if t["d"] else "## Targets", "",
              "| target | measured (medians) | ratio of mins | CPU time (medians) | limit | met | met (CPU) | note |",
              "|---|---|---|---|---|---|---|---|"]
    for row in t["rows"]:
        frac, ms = row["unit"] == "fraction", row["unit"] == "ms"
        meas = "–" if row["measured"] is None else (_pct(row["measured"]) if frac else
                                                     f"{row['measured']:.2f}{' ms' if ms else '×'}")
        mmin = "" if row.get("measured_min") is None else f"{row['measured_min']:.2f}×"
        lim = f"{100 * row['target']:.0f} %" if frac else f"{row['target']:.1f}{' ms' if ms else '×'}"
        lim = ("≥ " if row.get("at_least") else "≤ ") + lim
        met = "–" if row["met"] is None else ("yes" if row["met"] else "**no**")
        cpu = "" if row.get("measured_cpu") is None else f"{row['measured_cpu']:.2f}×"
        met_cpu = "" if row.get("met_cpu") is None else ("yes" if row["met_cpu"] else "**no**")
        lines.append(f"| {row['name']} | {meas} | {mmin} | {cpu} | {lim} | {met} | {met_cpu} | {row['note']} |")
    for r in result["sizes"].values():
        d = r["d"]
        lines += ["", f"## d = {d:,} (load {r['load_avg_start']} → {r['load_avg_end']})", ""]
        if "sketch" in r:
            s = r["sketch"]
            add = s["add"]
            cf = r.get("overheads", {}).get("check_finite")
            cf_txt = f" `check_finite(u)`, run at the start of every step: {cf['median_ms']:.2f} ms." if cf else ""
            lines += [f"`add_` over d floats: {add['median_ms']:.2f} ms (min {add['min_ms']:.2f}, "
                      f"{add['gb_per_s']:.0f} GB/s).{cf_txt}", "",
                      "| sketch (w = 0.1 d) | update ms | decompress ms | pair ms | pair × add_ | table MB | "
                      "transient MB |", "|---|---|---|---|---|---|---|"]
            for name, c in s["configs"].items():
                tr = max(c["update"]["transient"]["peak_bytes"], c["decompress"]["transient"]["peak_bytes"])
                lines.append(f"| {name} ({c['buckets']} × {c['unit']}) | {_ms(c['update'])} | {_ms(c['decompress'])} "
                             f"| {_ms(c['pair'])} | {c['pair']['over_add']:.2f}× | {_mb(c['table_bytes'])} | "
                             f"{_mb(tr)} |")
            a = s["table_sketch"]
            over = a["pair"]["median_ms"] / add["median_ms"]
            lines.append(f"| table-based, csvec design (c = {a['columns']:,}) | {_ms(a['update'])} | "
                         f"{_ms(a['decompress'])} | {_ms(a['pair'])} | {over:.2f}× | "
                         f"{_mb(a['persistent_bytes'])} | – |")
        if "steps" in r:
            lines += ["", "| step | median ms | × EFSGD | persistent MB | transient − payload |",
                      "|---|---|---|---|---|"]
            for e in r["steps"].values():
                ef_ms = e["methods"]["efsgd"]["time"]["median_ms"]
                for meth, mm in e["methods"].items():
                    ratio = "1" if meth == "efsgd" else f"{mm['time']['median_ms'] / ef_ms:.2f}×"
                    tr = mm["transient"]["peak_minus_payload_fraction_of_4d"]
                    lines.append(f"| {meth}, {e['label']} | {_ms(mm['time'])} | {ratio} | "
                                 f"{_mb(mm['persistent_bytes'])} | {_pct(tr)} of 4d |")
        if "compressors" in r:
            lines += ["", "| Q | compress ms | decompress ms | decompress_add_ ms | payload MB | compress peak MB |",
                      "|---|---|---|---|---|---|"]
            for q, c in r["compressors"].items():
                if c.get("skipped"):
                    lines.append(f"| {q} | skipped | | | | {c['skipped']} |")
                    continue
                lines.append(f"| {q} | {_ms(c['compress'])} | {_ms(c['decompress'])} | {_ms(c['decompress_add'])} | "
                             f"{_mb(c['payload_bytes'])} | {_mb(c['compress']['transient']['peak_bytes'])} |")
    fixed = result.get("fixed_cost")
    if fixed:
        lines += ["", "## Fixed cost per tensor", "",
                  "| tensor | sketch update ms | decompress ms | add_ ms | Q | EFSGD step ms | ConEF step ms | × |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in fixed["single"].values():
            sk = e["sketch"]
            for q, st in e["steps"].items():
                ef, ce = st["methods"]["efsgd"]["time"], st["methods"]["conef"]["time"]
                lines.append(f"| d = {e['d']:,} | {_ms(sk['update'])} | {_ms(sk['decompress'])} | {_ms(sk['add_'])} "
                             f"| {q} | {_ms(ef)} | {_ms(ce)} | {st['conef_over_efsgd']:.2f}× |")
        lines += ["", "| layer-wise ResNet-18 (62 tensors, 11.7M values) | EFSGD ms | ConEF ms | × | extra per tensor "
                      "| ConEF transient − payload |", "|---|---|---|---|---|---|"]
        for q, e in fixed["resnet18"].items():
            if q == "shapes":
                continue
            ef, ce = e["methods"]["efsgd"]["time"], e["methods"]["conef"]["time"]
            tr = e["methods"]["conef"]["transient"]["peak_minus_payload_fraction_of_4d"]
            lines.append(f"| {e['label']} | {_ms(ef)} | {_ms(ce)} | {e['conef_over_efsgd']:.2f}× | "
                         f"{1e3 * e['extra_ms_per_tensor']:.0f} µs | {_pct(tr)} of 4d |")
    server = result.get("server")
    if server:
        lines += ["", f"## Server aggregation ({server['model']}, {server['threads']} thread, median of "
                      f"{server['repeats']})", "",
                  "| method | replies | ms per reply (wall) | CPU ms per reply | peak extra MB "
                  "| × (2 models + 1 reply) |",
                  "|---|---|---|---|---|---|"]
        for row in server["rows"]:
            lines.append(f"| {row['method']} | {row['replies']:,} | {row['ms_per_reply']:.2f} | "
                         f"{row['cpu_ms_per_reply']:.2f} | {row['peak_extra_bytes'] / 1e6:.2f} | "
                         f"{row['peak_over_2_models_plus_one_reply']:.2f}× |")
    return "\n".join(lines) + "\n"


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    _log(f"wrote {out} and {out.with_suffix('.md')}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench_core", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="comma-separated d values (floats allowed: 1e6,1e7,5e7); empty: fixed-cost part only")
    p.add_argument("--repeats", type=int, default=7, help="timed runs after one warm-up (median and min kept)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="torch device of every tensor (cpu, cuda, cuda:1, ...)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output; markdown goes next to it (.md)")
    p.add_argument("--save", action="store_true", help=f"also write {SAVED_OUT} and its .md (the committed results)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="smoke test: d = 1M only, 3 repeats")
    a = p.parse_args(argv)
    sizes = [1_000_000] if a.quick else _parse_sizes(a.sizes)
    repeats = 3 if a.quick else a.repeats
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    if repeats < 1 or a.threads < 1 or not parts or set(parts) - set(PARTS):
        p.error(f"--repeats and --threads must be >= 1; --parts a non-empty subset of {','.join(PARTS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available")
    cmd = "python -m sim.bench_core " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run_benchmark(sizes, repeats, a.threads, command=cmd.strip(), quick=a.quick, parts=parts,
                           device=a.device)
    _write(result, Path(a.out))
    if a.save:
        _write(result, Path(SAVED_OUT))
    _log(f"done in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
