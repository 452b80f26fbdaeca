"""DDP hook benchmark (issue #4 §4): ours vs PyTorch's ``powerSGD_hook`` vs plain all-reduce.

Usage::

    PYTHONPATH=. python -m sim.bench_ddp [--steps 30] [--warmup 5] [--rank 4] [--batch 64]
                                         [--out docs/results/bench_ddp.json] [--save]

Spawns 2 processes (gloo on CPU, one torch thread each, a free port found at run time).
Every configuration trains its own copy of the same synthetic model (an MLP
1024-2048-1024-512-10 with ReLUs, 4,727,306 parameters, one fixed random batch per
rank, cross-entropy, SGD lr 0.01). The configurations run **round-robin**, one step
each in turn, so that background load hits all of them alike. The hooks run
``HOOK_WARMUP`` dense iterations (torch's minimum ``start_powerSGD_iter`` with error
feedback), then the remaining ``--warmup`` steps are compressed but untimed, then
``--steps`` steps are timed (wall time of zero_grad + forward + backward + hook +
optimizer step on rank 0; the median is reported).

What is measured (bytes per step, error and compressor state bytes) and why every
configuration runs with one DDP bucket is in ``docs/ddp.md``. Writes the JSON to
``--out`` and a markdown table next to it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.nn.parallel import DistributedDataParallel as DDP

from conef_fl.ddp import ConEFHookState, register_conef_hook
from conef_fl.measure import persistent_bytes
from sim.flower_runtime import free_port
from sim.tables import markdown_table

SCHEMA = "conef-fl/bench_ddp/1"
WORLD = 2
#: Dense iterations before compression (torch's minimum start_powerSGD_iter with error feedback).
HOOK_WARMUP = 2
LAYERS = (1024, 2048, 1024, 512, 10)


def synthetic_model() -> nn.Module:
    """The benchmark's MLP (4,727,306 parameters), initialised from seed 0 without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(LAYERS[:-1], LAYERS[1:], strict=True)):
            mods.append(nn.Linear(a, b))
            if i < len(LAYERS) - 2:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)


class _Run:
    """One configuration: its DDP model, optimizer, hook state and measurements."""

    def __init__(self, name: str, description: str, setup: Callable[[DDP], Any], ddp_kwargs: dict[str, Any]) -> None:
        self.name = name
        self.description = description
        self.model = synthetic_model()
        self.ddp = DDP(self.model, **ddp_kwargs)
        self.state = setup(self.ddp)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.times: list[float] = []
        self.bytes_per_step: list[int] = []
        self.loss = float("nan")

    def step(self, x: torch.Tensor, y: torch.Tensor, timed: bool) -> None:
        before = self._torch_numel()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.ddp(x), y)
        loss.backward()
        self.opt.step()
        elapsed = time.perf_counter() - t0
        self.loss = float(loss.detach())
        if timed:
            self.times.append(elapsed)
            self.bytes_per_step.append(self._bytes(before))

    def _torch_numel(self) -> int:
        s = self.state
        return s.total_numel_after_compression if isinstance(s, torch_powersgd.PowerSGDState) else 0

    def _bytes(self, numel_before: int) -> int:
        s = self.state
        if isinstance(s, ConEFHookState):
            return s.last_bytes_sent
        if isinstance(s, torch_powersgd.PowerSGDState):
            return 4 * (s.total_numel_after_compression - numel_before)
        return 4 * sum(p.numel() for p in self.model.parameters())

    def memory(self) -> tuple[int, int]:
        """``(error_state_bytes, compressor_state_bytes)``."""
        s = self.state
        if isinstance(s, ConEFHookState):
            return s.error_state_bytes(), s.compressor_state_bytes()
        if isinstance(s, torch_powersgd.PowerSGDState):
            pq = list(s.p_memory_dict.values()) + list(s.q_memory_dict.values())
            return persistent_bytes(s.error_dict.values()), persistent_bytes(pq)
        return 0, 0


#: DDP bucketing of every configuration but one: a single bucket (see the module notes).
ONE_BUCKET: dict[str, Any] = {"bucket_cap_mb_list": [64]}


def _configs(rank: int, psgd_ratio: float | None) -> list[tuple[str, str, Callable[[DDP], Any], dict[str, Any]]]:
    def torch_psgd(ddp: DDP) -> Any:
        state = torch_powersgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=HOOK_WARMUP,
            use_error_feedback=True,
            warm_start=True,
        )
        ddp.register_comm_hook(state, torch_powersgd.powerSGD_hook)
        return state

    def ours(method: str, **kw: Any) -> Callable[[DDP], Any]:
        return lambda ddp: register_conef_hook(ddp, method, warmup_steps=HOOK_WARMUP, **kw)

    default = "ConEF, random-block-k 10 %, count sketch 10 %, beta 0.9 (default)"
    out: list[tuple[str, str, Callable[[DDP], Any], dict[str, Any]]] = [
        ("allreduce", "plain DDP all-reduce (no hook)", lambda ddp: None, ONE_BUCKET),
        (
            f"torch-powersgd-r{rank}",
            f"torch powerSGD_hook, rank {rank}, EF + warm start",
            torch_psgd,
            ONE_BUCKET,
        ),
        ("conef-cs", f"ours: {default}", ours("conef-cs"), ONE_BUCKET),
        (
            "conef-cs-flat",
            "ours: conef-cs, whole bucket as one segment",
            ours("conef-cs", layerwise=False),
            ONE_BUCKET,
        ),
        ("efsgd", "ours: EFSGD, random-block-k 10 %, dense error", ours("efsgd"), ONE_BUCKET),
        (
            f"conef-powersgd-r{rank}",
            f"ours: PowerSGD rank {rank} + ConEF (count sketch 10 %)",
            ours("conef-powersgd", rank=rank),
            ONE_BUCKET,
        ),
        (
            f"ef-powersgd-r{rank}",
            f"ours: PowerSGD rank {rank} + EFSGD (dense error)",
            ours("ef-powersgd", rank=rank),
            ONE_BUCKET,
        ),
        ("sgd-hook", "ours: plain all-reduce through the hook (overhead reference)", ours("sgd"), ONE_BUCKET),
        ("conef-cs-buckets", "ours: conef-cs with DDP's default buckets (overlap)", ours("conef-cs"), {}),
    ]
    if psgd_ratio is not None:
        out.append(
            (
                "conef-cs-matched",
                f"ours: conef-cs with k_ratio {psgd_ratio:.4f} (torch PowerSGD's bytes)",
                ours("conef-cs", k_ratio=psgd_ratio),
                ONE_BUCKET,
            )
        )
    return out


def psgd_bytes_ratio(model: nn.Module, rank: int) -> float:
    """Bytes of torch's PowerSGD hook per step / dense bytes (its own ``_should_compress`` rule)."""
    dense = after = 0
    for p in model.parameters():
        n = p.shape[0]
        m = p.numel() // n
        r = min(n, m, rank)
        ok, full, comp = torch_powersgd._should_compress(n, m, r, 2)
        dense += full
        after += comp if ok else full
    return after / dense


def _worker(rank: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        ratio = psgd_bytes_ratio(synthetic_model(), args.rank)
        wanted = set(args.configs.split(",")) if args.configs else None
        runs = [_Run(*c) for c in _configs(args.rank, ratio) if wanted is None or c[0] in wanted]
        gen = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(args.batch, LAYERS[0], generator=gen)
        y = torch.randint(0, LAYERS[-1], (args.batch,), generator=gen)
        for i in range(args.warmup + args.steps):
            for run in runs:
                run.step(x, y, timed=i >= args.warmup)
        d = sum(p.numel() for p in runs[0].model.parameters())
        result = {"d": d, "psgd_ratio": ratio, "runs": {}}
        for run in runs:
            err, comp = run.memory()
            t = sorted(run.times)
            result["runs"][run.name] = {
                "description": run.description,
                "median_step_ms": 1e3 * statistics.median(t),
                "p25_step_ms": 1e3 * t[len(t) // 4],
                "p75_step_ms": 1e3 * t[(3 * len(t)) // 4],
                "bytes_per_step": statistics.median(run.bytes_per_step),
                "bytes_ratio": statistics.median(run.bytes_per_step) / (4 * d),
                "error_state_bytes": err,
                "compressor_state_bytes": comp,
                "final_loss": run.loss,
            }
        dist.barrier()
    except BaseException:
        result["__error__"] = traceback.format_exc()
    finally:
        if rank == 0:
            torch.save(result, out_file)
        if dist.is_initialized():
            dist.destroy_process_group()


def _targets(res: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    runs = res["runs"]
    tp = runs[f"torch-powersgd-r{rank}"]
    ours_p = runs[f"conef-powersgd-r{rank}"]
    cs = runs["conef-cs"]
    matched = runs["conef-cs-matched"]
    torch_err = tp["error_state_bytes"]
    out = [
        {
            "target": "bytes all-reduced per step / dense, conef-cs default (k = 10 %)",
            "measured": cs["bytes_ratio"],
            "limit": 0.10,
            "met": cs["bytes_ratio"] <= 0.10,
            "note": f"{cs['bytes_per_step']:.0f} B vs dense {4 * res['d']} B",
        },
        {
            "target": "error-state bytes / torch PowerSGD error_dict, conef-cs default",
            "measured": cs["error_state_bytes"] / torch_err,
            "limit": 0.10,
            "met": cs["error_state_bytes"] <= 0.10 * torch_err,
            "note": f"{cs['error_state_bytes']} B vs {torch_err} B",
        },
        {
            "target": f"error-state bytes / torch PowerSGD error_dict, conef-powersgd rank {rank}",
            "measured": ours_p["error_state_bytes"] / torch_err,
            "limit": 0.10,
            "met": ours_p["error_state_bytes"] <= 0.10 * torch_err,
            "note": f"{ours_p['error_state_bytes']} B vs {torch_err} B",
        },
    ]
    for name, run in ((f"conef-powersgd-r{rank}", ours_p), ("conef-cs-matched", matched)):
        out.append(
            {
                "target": f"median step time / torch PowerSGD rank {rank} at the same bytes: {name}",
                "measured": run["median_step_ms"] / tp["median_step_ms"],
                "limit": 1.0,
                "met": run["median_step_ms"] <= tp["median_step_ms"],
                "note": (
                    f"{run['median_step_ms']:.1f} vs {tp['median_step_ms']:.1f} ms; bytes "
                    f"{run['bytes_per_step']:.0f} vs {tp['bytes_per_step']:.0f}"
                ),
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    """The markdown summary of a report."""
    res, machine, model, steps = report["results"], report["machine"], report["model"], report["steps"]
    intro = (
        f"Generated by `{report['command']}` on {report['created']}; {machine['cpu']}, {machine['logical_cpus']} "
        f"logical CPUs, torch {machine['torch']}, {WORLD} processes (gloo, 1 thread each), load average at start "
        f"{report['load_start']}, at end {report['load_end']}. Model: {model['name']} ({res['d']:,} parameters), "
        f"batch {model['batch_per_rank']} per rank. {steps['timed']} timed steps after {steps['warmup']} untimed "
        "ones, configurations interleaved round-robin. Keys: `docs/ddp.md`."
    )
    runs = [
        [f"`{name}`: {r['description']}", f"{r['median_step_ms']:.1f} ({r['p25_step_ms']:.1f}–{r['p75_step_ms']:.1f})",
         f"{r['bytes_per_step']:,.0f}", f"{100 * r['bytes_ratio']:.2f}", f"{r['error_state_bytes']:,}",
         f"{r['compressor_state_bytes']:,}"]
        for name, r in res["runs"].items()
    ]  # fmt: skip
    targets = [
        [t["target"], f"{t['measured']:.4f}", f"≤ {t['limit']}", "yes" if t["met"] else "**no**", t["note"]]
        for t in report["targets"]
    ]
    run_header = ["configuration", "median step ms (p25–p75)", "bytes/step/rank", "% of dense", "error state B"]
    lines = ["# DDP hook benchmark", "", intro, "", *markdown_table([*run_header, "compressor state B"], runs)]
    lines += ["", "## Targets", "", *markdown_table(["target", "measured", "limit", "met", "note"], targets)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON and markdown reports."""
    p = argparse.ArgumentParser(prog="python -m sim.bench_ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 3)")
    p.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--configs", default="", help="comma-separated subset of configuration names")
    p.add_argument("--out", default="docs/results/bench_ddp.json")
    p.add_argument("--save", action="store_true", help="overwrite --out (and its .md) if it exists")
    args = p.parse_args(argv)
    if args.warmup < HOOK_WARMUP + 1:
        p.error(f"--warmup={args.warmup} is out of range; allowed: >= {HOOK_WARMUP + 1}")
    for name in ("steps", "rank", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} is out of range; allowed: >= 1")
    out = Path(args.out)
    if (out.exists() or out.with_suffix(".md").exists()) and not args.save:
        p.error(f"--out {out} exists; pass --save to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.pt")
    load_start = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, str(tmp))) for r in range(WORLD)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(1800)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
    if not tmp.exists():
        print(f"benchmark failed: no result (exit codes {[q.exitcode for q in procs]})", file=sys.stderr)
        return 1
    res = torch.load(tmp, weights_only=False)
    tmp.unlink()
    if "__error__" in res:
        print(res["__error__"], file=sys.stderr)
        return 1
    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m sim.bench_ddp", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "world_size": WORLD,
        "backend": "gloo",
        "threads_per_rank": 1,
        "model": {"name": "MLP " + "-".join(map(str, LAYERS)) + " (ReLU)", "batch_per_rank": args.batch},
        "steps": {"warmup": args.warmup, "timed": args.steps, "hook_dense_warmup": HOOK_WARMUP},
        "powersgd_rank": args.rank,
        "load_start": load_start,
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "wall_time_s": time.perf_counter() - start,
        "results": res,
        "targets": _targets(res, args.rank) if not args.configs else [],
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
