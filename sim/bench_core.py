"""Compressor-core benchmark (issue #2 §6): sketch, EF steps, compressors, measured memory.

One run measures, for each size ``d``:

* one ``x.add_(y)`` over ``d`` float32 values: the memory-bandwidth yardstick;
* count-sketch update (``CountSketch.accumulate_``) and decompress
  (``CountSketch.estimate_add_`` into a ``d``-vector), ``v = 1`` and ``3``,
  ``w = 0.1 d``, float32 and float16 tables, and the update + decompress pair;
* one EFSGD step and one ConEF step (``conef-cs``, β = 0.9, sketch ratio 0.1,
  ``v = 1``, float32 and float16 sketch) with the same ``Q``, for random-block-k
  10 %, random-k 1 %, top-k 1 % and scaled sign;
* every gradient compressor's ``compress`` and ``decompress``;
* persistent bytes of each method and the peak transient bytes of each step,
  **measured** (:func:`conef_fl.memory.persistent_bytes`,
  :func:`conef_fl.memory.measure_transient`), never computed from shapes.

Timing: one warm-up call, then ``repeats`` timed calls; min and median are
recorded. Operations compared by a ratio are timed round-robin in the same loop
(``add_`` with the sketch operations, EFSGD with ConEF), so background load hits
both sides alike. Nothing here asserts on timing: it is a benchmark, not a test.

Usage::

    python -m sim.bench_core [--sizes 1e6,1e7,5e7] [--repeats 7] [--threads 2]
                             [--out docs/results/bench_core.json] [--quick]

Writes the JSON to ``--out`` and a markdown summary next to it (same name,
``.md``). The keys are documented in ``docs/benchmarks.md``.
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

from conef_fl.compressors import make_compressor
from conef_fl.errors.base import check_finite
from conef_fl.errors.sketch import CountSketch, SketchGeometry
from conef_fl.feedback import make_feedback
from conef_fl.memory import measure_transient, persistent_bytes
from conef_fl.registry import method_config

SCHEMA = "conef-fl/bench_core/1"
DEFAULT_SIZES = (1_000_000, 10_000_000, 50_000_000)
#: The size at which the targets of issue #2 are checked.
TARGET_D = 10_000_000
#: Error-compressor settings of the ConEF steps.
SKETCH_RATIO = 0.1
BETA = 0.9
#: A compressor call slower than this (seconds) is "slow": at larger sizes it is
#: skipped when its extrapolated time exceeds it, and it gets fewer repeats.
SLOW_LIMIT_S = 10.0
#: Wall-clock budget per timed item (seconds); repeats are cut to fit (recorded).
ITEM_BUDGET_S = 15.0
#: ``csvec`` (FetchSGD's count sketch), d = 10M, r = 1, c = 2M, same kind of machine
#: (docs: /work/shared/guide/PERFORMANCE.md); not installable here, so not re-measured.
CSVEC_REFERENCE = {"d": 10_000_000, "rows": 1, "columns": 2_000_000, "sketch_ms": 1000.0, "recover_ms": 3100.0}

#: Gradient compressors whose EFSGD and ConEF steps are compared: name -> (label, kwargs for method_config).
STEP_COMPRESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "random-block-k": ("random-block-k 10 %", {"k_ratio": 0.1}),
    "random-k": ("random-k 1 %", {"k_ratio": 0.01}),
    "top-k": ("top-k 1 %", {"k_ratio": 0.01}),
    "scaled-sign": ("scaled sign", {}),
}
#: The main case of the step targets.
MAIN_Q = "random-block-k"

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


def _log(msg: str) -> None:
    print(f"[bench_core {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    calls and timed them.
    """
    setup = setup or {}
    if warm is None:
        warm = {}
        for name, fn in items.items():
            if name in setup:
                setup[name]()
            t0 = time.perf_counter()
            fn()
            warm[name] = time.perf_counter() - t0
    per_round = sum(warm.values())
    total_budget = budget_s * len(items)
    n = repeats
    if per_round * repeats > total_budget:
        floor = 1 if per_round > SLOW_LIMIT_S else 3
        n = min(repeats, max(floor, int(total_budget // max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(n):
        for name, fn in items.items():
            if name in setup:
                setup[name]()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    out = {}
    for name in items:
        s = _summary(samples[name])
        s["warmup_ms"] = 1e3 * warm[name]
        out[name] = s
    return out


def _transient(fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    """Run ``fn`` under :func:`measure_transient`; return its result and peak/retained bytes."""
    out, m = measure_transient(fn)
    return out, {"peak_bytes": m.peak_bytes, "retained_bytes": m.retained_bytes}


def machine_info(threads: int) -> dict[str, Any]:
    """Torch version, threads, CPU model and memory of this machine."""
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
    }


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _free() -> None:
    gc.collect()


# ---------------------------------------------------------------------------------------------
# the parts of one size
# ---------------------------------------------------------------------------------------------


def _sketch_configs() -> list[tuple[str, int, str]]:
    return [(f"v{v}_{dt}", v, dt) for v in (1, 3) for dt in ("float32", "float16")]


def bench_sketch(d: int, repeats: int, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 extra: dict[str, tuple[float, int, str]] | None = None) -> dict[str, Any]:
    """``add_`` and sketch update / decompress / pair, timed round-robin in one loop."""
    configs: dict[str, tuple[float, int, str]] = {name: (SKETCH_RATIO, v, dt) for name, v, dt in _sketch_configs()}
    configs.update(extra or {})
    sketches = {}
    for name, (ratio, v, dt) in configs.items():
        geom = SketchGeometry.for_ratio(d, ratio, v)
        sketches[name] = CountSketch(geom, seed=12345, dtype=dt)

    def pair(sk: CountSketch) -> None:
        sk.accumulate_(x)
        sk.estimate_add_(target)

    items: dict[str, Callable[[], Any]] = {"add_": lambda: x.add_(y)}
    for name, sk in sketches.items():
        items[f"{name}/update"] = lambda sk=sk: sk.accumulate_(x)
        items[f"{name}/decompress"] = lambda sk=sk: sk.estimate_add_(target)
        items[f"{name}/pair"] = lambda sk=sk: pair(sk)
    times = time_round_robin(items, repeats)
    add = times.pop("add_")
    add["gb_per_s"] = 12.0 * d / (add["median_ms"] * 1e-3) / 1e9  # read x, y; write x
    out: dict[str, Any] = {"add": add, "configs": {}}
    for name, sk in sketches.items():
        ratio, v, dt = configs[name]
        g = sk.geometry
        _, upd_mem = _transient(lambda sk=sk: sk.accumulate_(x))
        _, dec_mem = _transient(lambda sk=sk: sk.estimate_add_(target))
        entry: dict[str, Any] = {
            "rows": v,
            "dtype": dt,
            "ratio": ratio,
            "buckets": g.buckets,
            "unit": g.unit,
            "width": g.buckets * g.unit,
            "table_bytes": persistent_bytes(sk.persistent_tensors()),
            "table_fraction_of_4d": persistent_bytes(sk.persistent_tensors()) / (4 * d),
        }
        for op in ("update", "decompress", "pair"):
            t = times[f"{name}/{op}"]
            t["over_add"] = t["median_ms"] / add["median_ms"]
            entry[op] = t
        entry["update"]["transient"] = upd_mem
        entry["decompress"]["transient"] = dec_mem
        out["configs"][name] = entry
    del sketches
    return out


def _step_configs(q: str, kw: dict[str, Any]) -> dict[str, Any]:
    common = {"compressor": q, **kw}
    sk = {"beta": BETA, "sketch_ratio": SKETCH_RATIO, "sketch_rows": 1}
    return {
        "efsgd": method_config("efsgd", **common),
        "conef": method_config("conef-cs", **common, **sk, sketch_dtype="float32"),
        "conef_fp16": method_config("conef-cs", **common, **sk, sketch_dtype="float16"),
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
        fbs = {name: make_feedback(cfg, (d,), key="bench") for name, cfg in cfgs.items()}
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
            peak = mem["peak_bytes"]
            entry["methods"][name] = {
                "config": cfgs[name].to_dict(),
                "time": times[name],
                "persistent_bytes": pb,
                "nbytes": fb.nbytes,
                "persistent_fraction_of_4d": pb / four_d,
                "transient": {
                    "peak_bytes": peak,
                    "retained_bytes": mem["retained_bytes"],
                    "payload_bytes": payload.nbytes,
                    "peak_minus_payload_bytes": peak - payload.nbytes,
                    "peak_minus_payload_fraction_of_4d": (peak - payload.nbytes) / four_d,
                },
            }
        ef = times["efsgd"]["median_ms"]
        entry["conef_over_efsgd"] = times["conef"]["median_ms"] / ef
        entry["conef_fp16_over_efsgd"] = times["conef_fp16"]["median_ms"] / ef
        out[q] = entry
        del fbs, items
        _free()
    return out, overheads


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


def bench_size(d: int, repeats: int, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything for one size ``d``."""
    gen = torch.Generator().manual_seed(d)
    res: dict[str, Any] = {"d": d, "load_avg_start": _loadavg()}
    t0 = time.perf_counter()
    x = torch.randn(d, generator=gen)
    y = torch.randn(d, generator=gen)
    target = torch.zeros(d)
    extra = {}
    if d == CSVEC_REFERENCE["d"]:
        extra["csvec_match_v1_float32"] = (CSVEC_REFERENCE["columns"] / d, 1, "float32")
    _log(f"d={d}: add_ and sketches")
    res["sketch"] = bench_sketch(d, repeats, x, y, target, extra)
    x.copy_(torch.randn(d, generator=gen))  # add_ grew x; restore a standard normal vector
    target.zero_()
    _log(f"d={d}: EFSGD vs ConEF steps")
    u = torch.empty(d)
    res["steps"], res["overheads"] = bench_steps(d, repeats, x, u)
    del u, y
    _free()
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
            measured_min: float | None = None) -> dict[str, Any]:
    met = None if measured is None else bool(measured <= target)
    return {"name": name, "measured": measured, "measured_min": measured_min, "target": target, "unit": unit,
            "met": met, "note": note}


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Targets of issue #2 §6 at d = 10M (or the largest size run, if 10M was not run)."""
    sizes = result["sizes"]
    key = str(TARGET_D) if str(TARGET_D) in sizes else max(sizes, key=int)
    r = sizes[key]
    d = r["d"]
    sk = r["sketch"]["configs"]["v1_float32"]
    add = r["sketch"]["add"]
    rows = []
    for cfg, lab, extra in (("v1_float32", "fp32", ""), ("v1_float16", "fp16", "; fp16 table, for reference")):
        c = r["sketch"]["configs"][cfg]
        rows.append(_target(f"sketch update + decompress / add_ (v=1, w=0.1d, {lab})", c["pair"]["over_add"], 2.5,
                            "x add_",
                            f"pair {c['pair']['median_ms']:.2f} ms (min {c['pair']['min_ms']:.2f}) vs add_ "
                            f"{add['median_ms']:.2f} ms (min {add['min_ms']:.2f}){extra}",
                            c["pair"]["min_ms"] / add["min_ms"]))
    for q, e in r["steps"].items():
        main = " (main case)" if q == MAIN_Q else ""
        ce, ee = e["methods"]["conef"]["time"], e["methods"]["efsgd"]["time"]
        rows.append(_target(f"ConEF step / EFSGD step, {e['label']}{main}", e["conef_over_efsgd"], 1.2,
                            "x EFSGD", f"{ce['median_ms']:.2f} vs {ee['median_ms']:.2f} ms (mins {ce['min_ms']:.2f} "
                            f"vs {ee['min_ms']:.2f})", ce["min_ms"] / ee["min_ms"]))
    m = r["steps"][MAIN_Q]["methods"]
    rows.append(_target("persistent error state / 4d, fp32 sketch", m["conef"]["persistent_fraction_of_4d"], 0.10,
                        "fraction", f"{m['conef']['persistent_bytes']} B vs 4d = {4 * d} B"))
    rows.append(_target("persistent error state / 4d, fp16 sketch", m["conef_fp16"]["persistent_fraction_of_4d"],
                        0.05, "fraction", f"{m['conef_fp16']['persistent_bytes']} B vs 4d = {4 * d} B"))
    for q, e in r["steps"].items():
        for meth, lab in (("conef", "fp32"), ("conef_fp16", "fp16")):
            t = e["methods"][meth]["transient"]
            main = " (main case)" if q == MAIN_Q else ""
            ef = e["methods"]["efsgd"]["transient"]
            rows.append(_target(f"ConEF step transient (peak - payload) / 4d, {lab} sketch, {e['label']}{main}",
                                t["peak_minus_payload_fraction_of_4d"], 0.02, "fraction",
                                f"peak {t['peak_bytes']} B, payload {t['payload_bytes']} B; EFSGD with the same Q: "
                                f"{100 * ef['peak_minus_payload_fraction_of_4d']:.2f} %"))
    csv = None
    if "csvec_match_v1_float32" in r["sketch"]["configs"]:
        c = r["sketch"]["configs"]["csvec_match_v1_float32"]
        csv = {
            "reference": CSVEC_REFERENCE,
            "ours_config": "csvec_match_v1_float32 (v=1, w=0.2d = c, fp32)",
            "ours_update_ms": c["update"]["median_ms"],
            "ours_decompress_ms": c["decompress"]["median_ms"],
            "speedup_sketch": CSVEC_REFERENCE["sketch_ms"] / c["update"]["median_ms"],
            "speedup_recover": CSVEC_REFERENCE["recover_ms"] / c["decompress"]["median_ms"],
            "speedup_sketch_v1_w01d": CSVEC_REFERENCE["sketch_ms"] / sk["update"]["median_ms"],
            "speedup_recover_v1_w01d": CSVEC_REFERENCE["recover_ms"] / sk["decompress"]["median_ms"],
            "note": "csvec numbers come from PERFORMANCE.md (same kind of machine, different run), not this run; "
                    "csvec's unSketch also selects the top-k after recovering every coordinate",
        }
    return {"d": d, "rows": rows, "csvec": csv}


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------


def run_benchmark(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 7, threads: int = 2,
                  command: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Run the whole benchmark and return the result dict (see ``docs/benchmarks.md``)."""
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
            "quick": quick,
            "sketch_ratio": SKETCH_RATIO,
            "beta": BETA,
            "slow_limit_s": SLOW_LIMIT_S,
            "item_budget_s": ITEM_BUDGET_S,
            "step_compressors": {q: kw for q, (_, kw) in STEP_COMPRESSORS.items()},
            "compressor_params": COMPRESSOR_PARAMS,
        },
        "load_avg_start": _loadavg(),
        "sizes": {},
    }
    previous: dict[str, Any] | None = None
    for d in sizes:
        r = bench_size(int(d), repeats, previous)
        result["sizes"][str(int(d))] = r
        previous = r["compressors"]
        _log(f"d={d}: done in {r['elapsed_s']:.1f} s, load {_loadavg()}")
    result["load_avg_end"] = _loadavg()
    result["elapsed_s"] = time.perf_counter() - t0
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


def to_markdown(result: dict[str, Any]) -> str:
    """A short markdown summary: one table per size and the targets table."""
    m = result["machine"]
    lines = [
        "# Compressor-core benchmark",
        "",
        f"Generated by `{result.get('command') or 'python -m sim.bench_core'}` on {result['created_utc']}; "
        f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch_version']}, "
        f"{result['settings']['threads']} threads, medians of {result['settings']['repeats']} runs after one warm-up. "
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
    lines += [f"## Targets (d = {t['d']:,}, same run)", "",
              "| target | measured (medians) | ratio of mins | limit | met | note |", "|---|---|---|---|---|---|"]
    for row in t["rows"]:
        meas = "–" if row["measured"] is None else (
            f"{100 * row['measured']:.3f} %" if row["unit"] == "fraction" else f"{row['measured']:.2f}×")
        mmin = "" if row.get("measured_min") is None else f"{row['measured_min']:.2f}×"
        lim = f"{100 * row['target']:.0f} %" if row["unit"] == "fraction" else f"{row['target']:.1f}×"
        met = "–" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['name']} | {meas} | {mmin} | ≤ {lim} | {met} | {row['note']} |")
    if t.get("csvec"):
        c = t["csvec"]
        lines += ["", f"vs `csvec` (r = 1, c = 2M, d = 10M: sketch 1.0 s, recover 3.1 s; numbers from "
                      f"PERFORMANCE.md, not this run): ours at w = c: update {c['ours_update_ms']:.1f} ms "
                      f"(**{c['speedup_sketch']:.0f}×** faster), decompress {c['ours_decompress_ms']:.1f} ms "
                      f"(**{c['speedup_recover']:.0f}×**); at w = 0.1d: {c['speedup_sketch_v1_w01d']:.0f}× / "
                      f"{c['speedup_recover_v1_w01d']:.0f}×."]
    for r in result["sizes"].values():
        d = r["d"]
        s = r["sketch"]
        add = s["add"]
        cf = r.get("overheads", {}).get("check_finite")
        cf_txt = f" `check_finite(u)`, run at the start of every step: {cf['median_ms']:.2f} ms." if cf else ""
        lines += ["", f"## d = {d:,} (load {r['load_avg_start']} → {r['load_avg_end']})", "",
                  f"`add_` over d floats: {add['median_ms']:.2f} ms (min {add['min_ms']:.2f}, "
                  f"{add['gb_per_s']:.0f} GB/s).{cf_txt}", "",
                  "| operation | median ms | × add_ / × EFSGD | persistent MB | transient peak − payload MB |",
                  "|---|---|---|---|---|"]
        for name, c in s["configs"].items():
            tr = max(c["update"]["transient"]["peak_bytes"], c["decompress"]["transient"]["peak_bytes"])
            lines.append(f"| sketch {name} (w={c['width']:,}): update / decompress / pair | "
                         f"{_ms(c['update'])} / {_ms(c['decompress'])} / {_ms(c['pair'])} | "
                         f"{c['pair']['over_add']:.2f}× (pair) | {_mb(c['table_bytes'])} | {_mb(tr)} |")
        for e in r["steps"].values():
            ef_ms = e["methods"]["efsgd"]["time"]["median_ms"]
            for meth, mm in e["methods"].items():
                ratio = "1" if meth == "efsgd" else f"{mm['time']['median_ms'] / ef_ms:.2f}×"
                lines.append(f"| step {meth}, {e['label']} | {_ms(mm['time'])} | {ratio} | "
                             f"{_mb(mm['persistent_bytes'])} | {_mb(mm['transient']['peak_minus_payload_bytes'])} |")
        lines += ["", "| Q | compress ms | decompress ms | decompress_add_ ms | payload MB | compress peak MB |",
                  "|---|---|---|---|---|---|"]
        for q, c in r["compressors"].items():
            if c.get("skipped"):
                lines.append(f"| {q} | skipped | | | | {c['skipped']} |")
                continue
            lines.append(f"| {q} | {_ms(c['compress'])} | {_ms(c['decompress'])} | {_ms(c['decompress_add'])} | "
                         f"{_mb(c['payload_bytes'])} | {_mb(c['compress']['transient']['peak_bytes'])} |")
    return "\n".join(lines) + "\n"


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench_core", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="comma-separated d values (floats allowed: 1e6,1e7,5e7)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs after one warm-up (median and min kept)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", default="docs/results/bench_core.json", help="JSON output; markdown goes next to it (.md)")
    p.add_argument("--quick", action="store_true", help="smoke test: d = 1M only, 3 repeats")
    a = p.parse_args(argv)
    sizes = [1_000_000] if a.quick else _parse_sizes(a.sizes)
    repeats = 3 if a.quick else a.repeats
    if repeats < 1 or a.threads < 1 or not sizes:
        p.error("--repeats and --threads must be >= 1 and --sizes non-empty")
    cmd = "python -m sim.bench_core " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run_benchmark(sizes, repeats, a.threads, command=cmd.strip(), quick=a.quick)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    _log(f"wrote {out} and {out.with_suffix('.md')} in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
