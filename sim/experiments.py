"""Experiment grids: many methods × seeds on one federated task, then tables and plots.

    python -m sim.experiments --task mnist --out docs/results/experiments/mnist
    python -m sim.experiments --task mnist --out OUT --methods sgd,efsgd,conef-cs-90 --seeds 0,1,2 --rounds 150
    python -m sim.experiments --task mnist --out OUT --only conef-cs-90 --force     # redo one method
    python -m sim.experiments --task mnist --out OUT --report-only                   # tables/plots only
    python -m sim.experiments --study beta --task mnist --out docs/results/experiments/beta-mnist
    python -m sim.experiments --task mnist --out OUT --engine flower --methods efsgd,conef-cs-90 --seeds 0

Every run goes through the project's real ServerApp and ClientApp, by default
(``--engine inmemory``) over :class:`sim.inmemory.InMemoryGrid` (same strategy,
same client code, same records as a Flower simulation, no Ray, no SuperLink);
with ``--engine flower`` through Flower's own simulation engine
(:func:`sim.run.run_simulation`: ``flwr run``, a SuperLink, Ray actors). Each
run's ``experiment.json`` and the report's setting line name the engine. Each run writes
``<out>/<method-id>-s<seed>/`` (``rounds.json``, ``rounds.csv``, ``summary.json``,
``model.pt``, plus ``experiment.json``: the run config used). A run whose
``summary.json`` exists is skipped (resume); ``--force`` re-runs.
``--only METHOD`` runs one method and leaves the others' folders alone. At the
end the grid's ``results.md``, ``results.json`` and PNG plots are (re)written
from every finished run folder (see :mod:`sim.plots`).

Runs execute in ``--jobs`` worker processes (default 1 = in this process). A
worker's Flower/ServerApp output goes to ``<out>/logs/worker-<pid>.log``; the
console gets one line per evaluated round and one per finished run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conef_fl.app_config import parse_overrides

log = logging.getLogger("sim.experiments")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


# --------------------------------------------------------------------------------------------
# methods and tasks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodRun:
    """One entry of the comparison: a table id, a label and the run-config overrides it uses."""

    id: str
    label: str
    overrides: Mapping[str, Any]
    note: str = ""
    #: simulation-only options of the in-process grid (not run-config keys; e.g. ``error-reset-every``)
    sim: Mapping[str, Any] = field(default_factory=dict)


#: Gradient compressor of the EF/ConEF family and rbSGD: random block, 10 % of each tensor.
_BLOCK = {"compressor": "random-block-k", "k-ratio": 0.1}

#: The comparison (paper's Tables 3–5 plus the baselines of the issue). Parameters are chosen so
#: that every method but SGD sends <= 10 % of dense fp32 (measured on the MNIST CNN; the table
#: reports the measured fraction of every run).
METHODS: dict[str, MethodRun] = {
    m.id: m
    for m in [
        MethodRun("sgd", "SGD (dense FedAvg)", {"method": "sgd"}),
        MethodRun("efsgd", "EFSGD", {"method": "efsgd", **_BLOCK}),
        MethodRun("conef-cs-60", "ConEF-CS 60 %", {"method": "conef-cs", **_BLOCK, "sketch-ratio": 0.4, "beta": 0.5},
                  "count sketch w = 0.4 d, v = 1, β = 0.5 (β from the β study; see docs/experiments.md)"),
        MethodRun("conef-cs-90", "ConEF-CS 90 %", {"method": "conef-cs", **_BLOCK, "sketch-ratio": 0.1, "beta": 0.5},
                  "count sketch w = 0.1 d, v = 1, β = 0.5 (β from the β study; see docs/experiments.md)"),
        *(MethodRun(f"conef-cs-90-er{h}", f"ConEF-CS 90 % + sketch error reset every {h} rounds",
                    {"method": "conef-cs", **_BLOCK, "sketch-ratio": 0.1, "beta": 0.5},
                    f"as ConEF-CS 90 %; every {h} rounds the round's clients' sketches are replaced by their mean "
                    "(paper App. G.4; simulation study of the in-process grid, not carried by the Flower protocol; "
                    "its bytes are in the uplink/downlink columns)", sim={"error-reset-every": h})
          for h in (10, 50)),
        MethodRun("partial-efsgd-b0.5", "partial EFSGD (β 0.5)",
                  {"method": "partial-efsgd", **_BLOCK, "beta": 0.5},
                  "EFSGD feeding back (1 − β) of a dense error (the paper's Alg. 4 with C = identity): "
                  "ConEF-CS 90 %'s control"),
        MethodRun("decayed-efsgd-90", "stale-error control for ConEF-CS 90 %",
                  {"method": "decayed-efsgd", **_BLOCK, "sketch-ratio": 0.1, "beta": 0.5},
                  "partial EFSGD β 0.5, dense fp32 error aged ×0.55 per step = the expected ageing of ConEF-CS "
                  "90 %'s sketch (conef_fl/error_stores/decayed.py); no memory saving"),
        MethodRun("decayed-efsgd-60", "stale-error control for ConEF-CS 60 %",
                  {"method": "decayed-efsgd", **_BLOCK, "sketch-ratio": 0.4, "beta": 0.5},
                  "partial EFSGD β 0.5, dense fp32 error aged ×0.925 per step = the expected ageing of ConEF-CS "
                  "60 %'s sketch; no memory saving"),
        MethodRun("conef-cs-60-b0.9", "ConEF-CS 60 % (paper's β 0.9)",
                  {"method": "conef-cs", **_BLOCK, "sketch-ratio": 0.4, "beta": 0.9},
                  "count sketch w = 0.4 d, v = 1, β = 0.9 (the paper's choice for ResNet-18)"),
        MethodRun("conef-cs-90-b0.95", "ConEF-CS 90 % (paper's β 0.95)",
                  {"method": "conef-cs", **_BLOCK, "sketch-ratio": 0.1, "beta": 0.95},
                  "count sketch w = 0.1 d, v = 1, β = 0.95 (the paper's choice for ResNet-18)"),
        MethodRun("conef-cs-sign-90", "ConEF-CS 90 % + scaled sign",
                  {"method": "conef-cs", "compressor": "scaled-sign", "sketch-ratio": 0.1, "beta": 0.5},
                  "Q = scaled sign (as EF + scaled sign), count sketch w = 0.1 d, v = 1, β = 0.5"),
        MethodRun("conef-cs-sign-90-b0.9", "ConEF-CS 90 % + scaled sign (β 0.9)",
                  {"method": "conef-cs", "compressor": "scaled-sign", "sketch-ratio": 0.1, "beta": 0.9},
                  "Q = scaled sign, count sketch w = 0.1 d, v = 1, β = 0.9 (paper's Table 1 setting)"),
        MethodRun("conef-cs-sign-60-b0.9", "ConEF-CS 60 % + scaled sign (β 0.9)",
                  {"method": "conef-cs", "compressor": "scaled-sign", "sketch-ratio": 0.4, "beta": 0.9},
                  "Q = scaled sign, count sketch w = 0.4 d, v = 1, β = 0.9 (β 0.5 diverged with sign at 90 %)"),
        MethodRun("conef-cs-90-bidir", "ConEF-CS 90 % + compressed downlink",
                  {"method": "conef-cs", **_BLOCK, "sketch-ratio": 0.1, "beta": 0.5, "downlink": "random-block-k",
                   "downlink-k-ratio": 0.1},
                  "β = 0.5; the server sends random-block-k updates (server error feedback, uplink's seed)"),
        MethodRun("efsgd-bidir", "EFSGD + compressed downlink",
                  {"method": "efsgd", **_BLOCK, "downlink": "random-block-k", "downlink-k-ratio": 0.1},
                  "the server sends random-block-k updates (server error feedback, uplink's seed)"),
        MethodRun("conef-q", "ConEF-Q (s = 3)", {"method": "conef-q", **_BLOCK, "quant-levels": 3},
                  "error quantized, 3 levels (3 bits/entry)"),
        MethodRun("iconef-v1", "iConEF-v1", {"method": "iconef-v1", **_BLOCK, "quant-levels": 16},
                  "both error stores 16-level quantizers"),
        MethodRun("iconef-v2", "iConEF-v2", {"method": "iconef-v2", **_BLOCK, "quant-levels": 16},
                  "ẽ = Q(p − Δ) (random block), q 16-level quantizer"),
        MethodRun("hefsgd", "hEFSGD", {"method": "hefsgd", **_BLOCK, "error-topk-ratio": 0.05},
                  "error kept as its top-5 % (values + int32 indices = 0.4 d bytes)"),
        MethodRun("rbsgd", "rbSGD", {"method": "rbsgd", **_BLOCK}, "random block scaled by d/k"),
        *(MethodRun(f"rbsgd-lr{lr:g}", f"rbSGD (lr {lr:g})", {"method": "rbsgd", **_BLOCK, "local-lr": lr},
                    f"random block scaled by d/k; {why}")
          for lr, why in [(0.03, "local lr 0.03 (rbSGD's lr tuned over 0.1, 0.03, 0.01)"),
                          (0.08, "local lr 0.08 = Shakespeare's 0.8 × k/d (it diverged at 0.8)"),
                          (0.01, "local lr = SGD's × k/d (the paper tunes rbSGD's lr separately)")]),
        MethodRun("qsgd", "QSGD (s = 3)", {"method": "qsgd", "qsgd-levels": 3}, "3 levels: sign + 2 bits"),
        MethodRun("ef-topk", "EF + top-k (5 %)", {"method": "ef-topk", "compressor": "top-k", "k-ratio": 0.05},
                  "5 % values + int32 indices = 10 % of dense"),
        MethodRun("ef-sign", "EF + scaled sign", {"method": "ef-sign"}, "1 bit/entry + one scale"),
        MethodRun("ef-powersgd", "EF + PowerSGD (r = 8)", {"method": "ef-powersgd", "rank": 8}),
        MethodRun("atomo", "ATOMO (budget 6)", {"method": "atomo", "rank": 6}, "SVD atoms, expected 6 per tensor"),
    ]
}


@dataclass(frozen=True)
class TaskSpec:
    """A federated task: base run config, number of clients, default grid."""

    name: str
    base: Mapping[str, Any]
    num_nodes: int
    rounds: int
    methods: Sequence[str]
    seeds: Sequence[int] = (0,)
    #: methods run on every seed of ``--seeds``; the others only on the first seed
    multi_seed: Sequence[str] = ()
    text: bool = False
    #: methods of the zoomed plot ``accuracy_vs_round_main.png`` (mean and the seeds' range)
    highlight: Sequence[str] = ()


_MAIN_METHODS = ("sgd", "efsgd", "conef-cs-60", "conef-cs-90", "rbsgd", "rbsgd-lr0.01", "qsgd")

TASKS: dict[str, TaskSpec] = {
    "mnist": TaskSpec(
        "mnist",
        {
            "dataset": "mnist", "data-dir": str(SHARED_DATA / "mnist"), "partitioning": "dirichlet",
            "dirichlet-alpha": 0.5, "fraction-train": 0.1, "local-epochs": 0, "local-steps": 5,
            "batch-size": 32, "local-lr": 0.1, "lr-decay-rounds": "200,260", "lr-decay-factor": 0.1,
            "eval-every": 20,
        },
        num_nodes=100,
        rounds=300,
        methods=tuple(m for m in METHODS if m not in ("conef-cs-90-bidir", "efsgd-bidir")),
        seeds=(0, 1, 2),
        multi_seed=_MAIN_METHODS,
        highlight=("sgd", "efsgd", "conef-cs-60", "conef-cs-90", "partial-efsgd-b0.5", "rbsgd-lr0.01", "qsgd"),
    ),
    "shakespeare": TaskSpec(
        "shakespeare",
        {
            "dataset": "shakespeare", "data-dir": str(SHARED_DATA / "tinyshakespeare"), "partitioning": "natural",
            "fraction-train": 0.05, "local-epochs": 0, "local-steps": 5, "batch-size": 16, "local-lr": 0.8,
            "eval-every": 25,
        },
        num_nodes=201,
        rounds=400,
        methods=("sgd", "efsgd", "conef-cs-90", "rbsgd-lr0.08"),
        seeds=(0,),
        text=True,
    ),
    # The converged language task: LEAF's CharLSTM (815,945 parameters) cost 2,100-2,900 s per 400-round run
    # here and had not converged (SGD 43.95 %); a 65,489-parameter GRU on 10 clients (speaking roles grouped),
    # 3 per round, 10 local steps, lr 3.0 (the best of 1 / 3 / 6 in a centralised check) decayed x0.1 at
    # rounds 100 and 130 fits a run in minutes and reaches its plateau.
    "shakespeare-gru": TaskSpec(
        "shakespeare-gru",
        {
            "dataset": "shakespeare", "data-dir": str(SHARED_DATA / "tinyshakespeare"), "partitioning": "natural",
            "model": "char-gru", "fraction-train": 0.3, "local-epochs": 0, "local-steps": 10, "batch-size": 32,
            "local-lr": 3.0, "lr-decay-rounds": "100,130", "lr-decay-factor": 0.1, "eval-every": 10,
        },
        num_nodes=10,
        rounds=150,
        methods=("efsgd", "conef-cs-90", "sgd", "conef-cs-60"),
        seeds=(0,),
        text=True,
    ),
    "digits": TaskSpec(
        "digits",
        {
            "dataset": "digits", "partitioning": "iid", "fraction-train": 0.5, "local-epochs": 0,
            "local-steps": 2, "batch-size": 16, "local-lr": 0.2, "eval-every": 1,
        },
        num_nodes=4,
        rounds=3,
        methods=("sgd", "conef-cs-90"),
        seeds=(0,),
    ),
}


@dataclass
class Run:
    """One run of the grid: method id, seed, full run config, folder name."""

    method_id: str
    seed: int
    config: dict[str, Any]
    num_nodes: int
    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: simulation-only options (:attr:`MethodRun.sim`)
    sim: dict[str, Any] = field(default_factory=dict)

    def folder(self, out: Path) -> Path:
        return out / self.name


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` run-config overrides, validated by the app's config schema."""
    return parse_overrides(items)


def run_config(task: TaskSpec, method: MethodRun, seed: int, rounds: int, out: Path, name: str,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full run config of one run (task base, method overrides, seed, rounds, output folder)."""
    cfg: dict[str, Any] = {**task.base, **method.overrides, **(extra or {})}
    cfg.update({"seed": seed, "num-server-rounds": rounds, "output-dir": str(out.resolve()), "run-name": name})
    if int(cfg.get("eval-every", 1)) > rounds:
        cfg["eval-every"] = rounds
    return cfg


def plan_grid(task: TaskSpec, methods: Sequence[str], seeds: Sequence[int], rounds: int, out: Path,
              extra: Mapping[str, Any] | None = None, all_seeds: bool = False) -> list[Run]:
    """Runs of a method grid: methods in ``task.multi_seed`` (or all, with ``all_seeds``) on every seed."""
    runs = []
    for seed_i, seed in enumerate(seeds):
        for mid in methods:
            if seed_i > 0 and not all_seeds and task.multi_seed and mid not in task.multi_seed:
                continue
            name = f"{mid}-s{seed}"
            runs.append(Run(mid, seed, run_config(task, METHODS[mid], seed, rounds, out, name, extra),
                            task.num_nodes, name, sim=dict(METHODS[mid].sim)))
    return runs


# --------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------
class _RoundLine(logging.Handler):
    """Forwards the ServerApp's "round N: test accuracy" lines, prefixed with the run name."""

    def __init__(self, stream: Any) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.run_name = ""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("round ") and "test accuracy" in msg:
            self.stream.write(f"  [{self.run_name}] {msg}\n")
            self.stream.flush()


_ROUND_HANDLER: _RoundLine | None = None


def _init_worker(log_dir: str) -> None:
    """Worker process: Flower/ServerApp output to a log file, round lines to the console."""
    global _ROUND_HANDLER
    console = os.fdopen(os.dup(2), "w", buffering=1)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(str(Path(log_dir) / f"worker-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _ROUND_HANDLER = _RoundLine(console)
    logging.getLogger("conef_fl.server").addHandler(_ROUND_HANDLER)


#: ``--engine`` values: the in-process grid, or Flower's simulation engine.
ENGINES = ("inmemory", "flower")
ENGINE_LABELS = {"inmemory": "the in-process grid (sim/inmemory.py)",
                 "flower": "Flower's simulation engine (flwr run, SuperLink, Ray)"}


#: Simulation-only options (:attr:`MethodRun.sim`) the in-process grid understands.
SIM_OPTIONS = ("error-reset-every",)


def execute(cfg: Mapping[str, Any], num_nodes: int, engine: str = "inmemory",
            sim: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one configuration with the real ServerApp/ClientApp on ``engine``; return its summary.

    ``sim``: simulation-only options of the in-process grid (``error-reset-every``: see
    :class:`sim.inmemory.InMemoryGrid`); recorded in ``experiment.json`` and, with the resets' bytes, in
    ``summary.json`` (``error_reset``)."""
    import torch

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not valid; allowed: {', '.join(ENGINES)}")
    sim = dict(sim or {})
    unknown = sorted(set(sim) - set(SIM_OPTIONS))
    if unknown:
        raise ValueError(f"unknown simulation option(s) {unknown}; allowed: {', '.join(SIM_OPTIONS)}")
    if sim and engine != "inmemory":
        raise ValueError(f"simulation options {sorted(sim)} exist only on the in-process grid, not engine={engine}")
    torch.set_num_threads(1)
    if _ROUND_HANDLER is not None:
        _ROUND_HANDLER.run_name = str(cfg["run-name"])
    out = Path(str(cfg["output-dir"])) / str(cfg["run-name"])
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"run_config": dict(cfg), "num_nodes": num_nodes, "engine": engine}
    if sim:
        meta["simulation"] = sim
    (out / "experiment.json").write_text(json.dumps(meta, indent=2))
    t0 = time.time()
    if engine == "flower":
        from sim.run import run_simulation

        run_simulation(dict(cfg), num_supernodes=num_nodes, log_file=out / "flwr.log")
    else:
        from sim.inmemory import run_inmemory

        grid = run_inmemory(cfg, num_nodes, error_reset_every=int(sim.get("error-reset-every", 0)))
        if grid.error_reset_every:
            up, down = grid.error_reset_bytes()
            summary = json.loads((out / "summary.json").read_text())
            summary["error_reset"] = {
                "every_rounds": grid.error_reset_every, "variant": "round's clients' sketches replaced by their mean",
                "resets": len(grid.error_resets), "uplink_bytes": up, "downlink_bytes": down,
                "sketch_bytes_per_client": grid.error_resets[0]["sketch_bytes_per_client"] if grid.error_resets else 0,
                "where": "simulation study of the in-process grid (sim/inmemory.py); not in the Flower protocol"}
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary = json.loads((out / "summary.json").read_text())
    summary["total_seconds"] = time.time() - t0
    return summary


def is_done(run: Run, out: Path) -> bool:
    """A run is finished when its ``summary.json`` exists."""
    return (run.folder(out) / "summary.json").exists()


def _check_same_config(run: Run, out: Path) -> None:
    meta = run.folder(out) / "experiment.json"
    if not meta.exists():
        return
    old = json.loads(meta.read_text()).get("run_config", {})
    diff = {k: (old.get(k), v) for k, v in run.config.items() if old.get(k) != v and k not in _IGNORED_KEYS}
    if diff:
        log.warning("%s: finished with a different config %s; kept (use --force to re-run)", run.name, diff)


class Executor:
    """Runs :class:`Run` objects, in this process (``jobs=1``) or in a pool of worker processes."""

    def __init__(self, out: Path, jobs: int = 1, engine: str = "inmemory") -> None:
        self.out = out
        self.jobs = jobs
        self.engine = engine
        self.pool: cf.ProcessPoolExecutor | None = None
        if jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                               initargs=(str(out / "logs"),))

    def submit(self, run: Run) -> cf.Future[dict[str, Any]]:
        # the default engine is not passed: execute(cfg, num_nodes) stays the call for the in-process grid
        args: tuple[Any, ...] = (run.config, run.num_nodes) if self.engine == "inmemory" and not run.sim else \
            (run.config, run.num_nodes, self.engine, *((run.sim,) if run.sim else ()))
        if self.pool is not None:
            return self.pool.submit(execute, *args)
        fut: cf.Future[dict[str, Any]] = cf.Future()
        try:
            fut.set_result(execute(*args))
        except Exception as exc:  # reported by the caller like a worker's failure
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def adopt(run: Run, source: Path, out: Path) -> None:
    """Copy a finished run with the same config (from another folder) in as ``run``'s folder."""
    dst = run.folder(out)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(source, dst)
    meta = json.loads((dst / "experiment.json").read_text())
    meta["run_config"] = dict(run.config)
    meta["copied_from"] = str(source)
    (dst / "experiment.json").write_text(json.dumps(meta, indent=2))


def run_all(runs: Sequence[Run], out: Path, *, jobs: int = 1, force: bool = False,
            reuse: Sequence[Path] = (), engine: str = "inmemory") -> dict[str, dict[str, Any]]:
    """Run every unfinished run (all with ``force``); returns summaries of the runs done now, by name.

    A run with the same config finished in one of the ``reuse`` folders is copied in instead of run."""
    todo = []
    for r in runs:
        if is_done(r, out) and not force:
            _check_same_config(r, out)
            if _engine_of(r.folder(out)) != engine:
                log.warning("%s: finished on engine %s, not %s; kept (use --force to re-run, or another --out)",
                            r.name, _engine_of(r.folder(out)), engine)
            log.info("skip %s (summary.json exists)", r.name)
            continue
        same = None if force or not reuse else find_equivalent(r, reuse, engine=engine)
        if same is not None:
            adopt(r, same, out)
            log.info("copied %s from %s (same run config)", r.name, same)
        else:
            todo.append(r)
    log.info("%d runs planned, %d finished before, %d to run (%d in parallel)", len(runs), len(runs) - len(todo),
             len(todo), jobs)
    done: dict[str, dict[str, Any]] = {}
    if not todo:
        return done
    ex = Executor(out, jobs, engine)
    t0 = time.time()
    try:
        futures: dict[cf.Future[dict[str, Any]], tuple[int, Run]] = {}
        for i, r in enumerate(todo, 1):
            if jobs == 1:
                log.info("run %d/%d: %s (%d rounds)", i, len(todo), r.name, r.config["num-server-rounds"])
            futures[ex.submit(r)] = (i, r)
        for fut in cf.as_completed(futures):
            i, r = futures[fut]
            try:
                s = fut.result()
            except Exception as exc:
                log.error("run %s failed: %s: %s", r.name, type(exc).__name__, exc)
                continue
            done[r.name] = s
            acc = s.get("final_accuracy")
            log.info("done %d/%d %s: final accuracy %s, uplink %.1f %% of dense, error memory %.1f KB, %.0f s "
                     "(elapsed %.0f s)", len(done), len(todo), r.name, f"{acc:.4f}" if acc is not None else "n/a",
                     100 * (s.get("uplink_fraction_of_dense") or 0.0), s["client_error_state_bytes"] / 1e3,
                     s.get("wall_seconds", 0.0), time.time() - t0)
    finally:
        ex.close()
    return done


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run folder under ``out``: summary, rounds and the experiment metadata."""
    runs = []
    for meta in sorted(out.glob("*/experiment.json")):
        folder = meta.parent
        if not (folder / "summary.json").exists() or not (folder / "rounds.json").exists():
            continue
        info = json.loads(meta.read_text())
        rounds = json.loads((folder / "rounds.json").read_text())
        if isinstance(rounds, dict):
            rounds = rounds.get("rounds", [])
        name = folder.name
        mid, _, seed = name.rpartition("-s")
        runs.append({"name": name, "method_id": mid, "seed": int(seed) if seed.isdigit() else 0,
                     "summary": json.loads((folder / "summary.json").read_text()), "rounds": rounds,
                     "run_config": info.get("run_config", {}), "engine": info.get("engine", "inmemory"),
                     "num_nodes": info.get("num_nodes")})
    return runs


def _engine_of(folder: Path) -> str:
    """The engine a run folder was produced on (runs from before ``--engine`` existed: the in-process grid)."""
    meta = folder / "experiment.json"
    return json.loads(meta.read_text()).get("engine", "inmemory") if meta.exists() else "inmemory"


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _last_evals(rounds: Sequence[Mapping[str, Any]], n: int) -> float | None:
    """Mean test accuracy (%) of the last ``n`` evaluated rounds (less noisy than the last one alone)."""
    accs = [100 * r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    return statistics.fmean(accs[-n:]) if accs else None


def _method_order(ids: Sequence[str]) -> list[str]:
    order = list(METHODS)
    return sorted(set(ids), key=lambda m: (order.index(m) if m in order else len(order), m))


def aggregate(runs: Sequence[Mapping[str, Any]], text: bool = False) -> list[dict[str, Any]]:
    """One row per method id: means ± std over seeds of the summaries' numbers."""
    rows = []
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method_id"], []).append(r)
    for mid in _method_order(list(by_method)):
        rs = sorted(by_method[mid], key=lambda r: r["seed"])
        ss = [r["summary"] for r in rs]
        acc_m, acc_s = _mean_std([100 * s["final_accuracy"] for s in ss if s.get("final_accuracy") is not None])
        ppl = [math.exp(s["final_loss"]) for s in ss if s.get("final_loss") is not None and s["final_loss"] < 50]
        ppl_m, ppl_s = _mean_std(ppl)
        last3 = [_last_evals(r["rounds"], 3) for r in rs]
        last3_m, last3_s = _mean_std([x for x in last3 if x is not None])
        reset_up = [s.get("error_reset", {}).get("uplink_bytes", 0) for s in ss]
        reset_down = [s.get("error_reset", {}).get("downlink_bytes", 0) for s in ss]
        frac = [(s["uplink_bytes_total"] + u) / s["dense_fedavg_uplink_bytes_total"] if u else
                s.get("uplink_fraction_of_dense") for s, u in zip(ss, reset_up, strict=True)]
        mem = statistics.fmean(s["client_error_state_bytes"] for s in ss)
        ef = ss[0]["efsgd_error_state_bytes"]
        diverged = sum(1 for s in ss if s.get("final_loss") is None or not math.isfinite(s["final_loss"]))
        label = METHODS[mid].label if mid in METHODS else mid
        rows.append({
            "method_id": mid,
            "label": label,
            "seeds": [r["seed"] for r in rs],
            "rounds": ss[0]["rounds"],
            "final_accuracy_mean": acc_m,
            "final_accuracy_std": acc_s,
            "final_accuracy_per_seed": [100 * s["final_accuracy"] if s.get("final_accuracy") is not None else None
                                        for s in ss],
            "last3_accuracy_mean": last3_m,
            "last3_accuracy_std": last3_s,
            "best_accuracy_mean": _mean_std([100 * s["best_accuracy"] for s in ss
                                             if s.get("best_accuracy") is not None])[0],
            "perplexity_mean": ppl_m if text else None,
            "perplexity_std": ppl_s if text else None,
            "wall_seconds_mean": statistics.fmean(s.get("rounds_seconds_total") or s["wall_seconds"] for s in ss),
            "uplink_mb_mean": statistics.fmean(s["uplink_bytes_total"] + u for s, u in zip(ss, reset_up, strict=True))
            / 1e6,
            "downlink_mb_mean": statistics.fmean(s.get("downlink_bytes_total", 0) + d
                                                 for s, d in zip(ss, reset_down, strict=True)) / 1e6,
            "error_reset_uplink_mb_mean": statistics.fmean(reset_up) / 1e6,
            "dense_uplink_mb_mean": statistics.fmean(s["dense_fedavg_uplink_bytes_total"] for s in ss) / 1e6,
            "uplink_percent_of_dense": 100 * statistics.fmean(f for f in frac if f is not None),
            "error_memory_kb": mem / 1e3,
            "efsgd_error_memory_kb": ef / 1e3,
            "memory_saving_percent_vs_efsgd": (100 * (1 - mem / ef)) if mid != "sgd" else None,
            "diverged_runs": diverged,
            "note": METHODS[mid].note if mid in METHODS else "",
            "method_config": ss[0].get("method_config", {}),
        })
    ref = next((r for r in rows if r["method_id"] == "efsgd"), None)
    for r in rows:
        r["delta_vs_efsgd_points"] = (r["final_accuracy_mean"] - ref["final_accuracy_mean"]) if ref else None
        r["last3_delta_vs_efsgd_points"] = (r["last3_accuracy_mean"] - ref["last3_accuracy_mean"]) if ref else None
        if text and ref and r["perplexity_mean"] is not None:
            r["delta_perplexity_vs_efsgd"] = r["perplexity_mean"] - ref["perplexity_mean"]
    return rows


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def results_markdown(rows: Sequence[Mapping[str, Any]], title: str, setting: str, text: bool = False) -> str:
    """The paper's Table 3 layout, with uplink and memory columns."""
    head = ["method", "seeds", "final test acc. (%)"]
    if text:
        head += ["perplexity"]
    head += ["Δ acc. vs EFSGD", "last-3-eval acc. (%)", "Δ last-3 vs EFSGD", "best acc. (%)", "wall time / run (s)",
             "uplink MB", "uplink % of dense", "downlink MB",
             "error memory / client (KB)", "memory saving vs EFSGD"]
    lines = [f"# {title}", "", setting, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = len(r["seeds"])
        acc = f"{r['final_accuracy_mean']:.2f} ± {r['final_accuracy_std']:.2f}" if n > 1 else \
            _f(r["final_accuracy_mean"])
        cells = [r["label"], ",".join(map(str, r["seeds"])), acc]
        if text:
            cells.append(f"{_f(r['perplexity_mean'])} ± {_f(r['perplexity_std'])}" if n > 1 else
                         _f(r["perplexity_mean"]))
        d = r.get("delta_vs_efsgd_points")
        l3 = f"{r['last3_accuracy_mean']:.2f} ± {r['last3_accuracy_std']:.2f}" if n > 1 else \
            _f(r["last3_accuracy_mean"])
        is_ref = r["method_id"] == "efsgd"
        cells += [("–" if is_ref else _f(d, "+.2f")), l3,
                  ("–" if is_ref else _f(r.get("last3_delta_vs_efsgd_points"), "+.2f")), _f(r["best_accuracy_mean"]),
                  f"{r['wall_seconds_mean']:.0f}", f"{r['uplink_mb_mean']:.1f}",
                  f"{r['uplink_percent_of_dense']:.1f}", f"{r.get('downlink_mb_mean', 0.0):.1f}",
                  f"{r['error_memory_kb']:.1f}", _f(r["memory_saving_percent_vs_efsgd"], ".1f") + " %"]
        if r["memory_saving_percent_vs_efsgd"] is None:
            cells[-1] = "–"
        if r["diverged_runs"]:
            cells[0] += f" ({r['diverged_runs']} diverged)"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Wall time is the ServerApp's time for one run (mean over seeds) on the machine as it was loaded "
              "at that moment; on a shared machine it is not comparable between runs.", "",
              "Per-seed final accuracies (%):", ""]
    for r in rows:
        per = ", ".join(_f(a) for a in r["final_accuracy_per_seed"])
        lines.append(f"- {r['label']} (`{r['method_id']}`): {per}" + (f" — {r['note']}" if r["note"] else ""))
    return "\n".join(lines) + "\n"


def _setting_line(runs: Sequence[Mapping[str, Any]]) -> str:
    if not runs:
        return ""
    c = runs[0]["run_config"]
    s = runs[0]["summary"]
    keys = ["dataset", "partitioning", "dirichlet-alpha", "fraction-train", "local-steps", "local-epochs",
            "batch-size", "local-lr", "lr-decay-rounds", "lr-decay-factor", "server-lr", "num-server-rounds",
            "eval-every"]
    parts = [f"{k}={c[k]}" for k in keys if k in c]
    engines = sorted({r.get("engine", "inmemory") for r in runs})
    engine = ENGINE_LABELS[engines[0]] if len(engines) == 1 else "; ".join(
        f"{ENGINE_LABELS[e]}: " + ", ".join(r["name"] for r in runs if r.get("engine", "inmemory") == e)
        for e in engines)
    clients = s.get("num_partitions") or runs[0].get("num_nodes")
    return (f"Engine: {engine}. Setting: {clients} clients, model {s.get('model')} with "
            f"{s.get('num_params')} parameters; " + ", ".join(parts)
            + ". Final accuracy = centralised test accuracy after the last round.")


def write_report(out: Path, title: str | None = None, text: bool | None = None,
                 highlight: Sequence[str] = ()) -> list[dict[str, Any]]:
    """(Re)write ``results.md``, ``results.json`` and the plots from every finished run in ``out``."""
    from sim import plots

    runs = load_runs(out)
    if not runs:
        log.warning("no finished runs in %s; nothing to report", out)
        return []
    if text is None:
        text = runs[0]["summary"].get("dataset") == "shakespeare"
    rows = aggregate(runs, text=text)
    title = title or f"Results: {runs[0]['summary'].get('dataset')}"
    setting = _setting_line(runs)
    (out / "results.md").write_text(results_markdown(rows, title, setting, text=text))
    (out / "results.json").write_text(json.dumps({"setting": setting, "rows": rows,
                                                   "runs": [r["name"] for r in runs]}, indent=2))
    plots.plot_grid(runs, rows, out, text=text, highlight=highlight)
    log.info("wrote %s, %s and plots", out / "results.md", out / "results.json")
    return rows


# --------------------------------------------------------------------------------------------
# β / sketch-size study (paper's Tables 1–2)
# --------------------------------------------------------------------------------------------
BETAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
LADDER = (0.05, 0.1, 0.2, 0.4, 0.6)


def _study_run(task: TaskSpec, beta: float, ratio: float, seed: int, rounds: int, out: Path,
               extra: Mapping[str, Any]) -> Run:
    name = f"cs-b{beta:g}-w{ratio:g}-s{seed}"
    m = MethodRun(name, f"ConEF-CS β={beta:g} w={ratio:g}d",
                  {"method": "conef-cs", **_BLOCK, "sketch-ratio": ratio, "beta": beta})
    return Run(name, seed, run_config(task, m, seed, rounds, out, name, extra), task.num_nodes, name,
               {"beta": beta, "ratio": ratio})


#: keys that do not change a run's result: where it is written or read from (the same files in another
#: folder, e.g. on another machine) and resuming (a resumed run reproduces the uninterrupted one exactly)
_IGNORED_KEYS = ("output-dir", "run-name", "data-dir", "checkpoint-dir", "state-dir", "resume")


def find_equivalent(run: Run, dirs: Sequence[Path], engine: str = "inmemory") -> Path | None:
    """A finished run folder under ``dirs`` whose run config and engine equal ``run``'s (but for its name/folder)."""
    want = {k: v for k, v in run.config.items() if k not in _IGNORED_KEYS}
    for d in dirs:
        for meta in sorted(Path(d).glob("*/experiment.json")):
            if not (meta.parent / "summary.json").exists():
                continue
            info = json.loads(meta.read_text())
            have = {k: v for k, v in info.get("run_config", {}).items() if k not in _IGNORED_KEYS}
            if have == want and info.get("num_nodes") == run.num_nodes and info.get("engine", "inmemory") == engine \
                    and info.get("simulation", {}) == run.sim:
                return meta.parent
    return None


def _final_acc(folder: Path | None) -> float | None:
    if folder is None or not (folder / "summary.json").exists():
        return None
    acc = json.loads((folder / "summary.json").read_text()).get("final_accuracy")
    return None if acc is None else 100 * float(acc)


def beta_study(task: TaskSpec, out: Path, *, betas: Sequence[float] = BETAS, ladder: Sequence[float] = LADDER,
               seed: int = 0, rounds: int, tolerance: float = 1.0, jobs: int = 1, force: bool = False,
               extra: Mapping[str, Any] | None = None, reuse: Sequence[Path] = (),
               exhaustive: bool = False) -> dict[str, Any]:
    """For each β, the smallest sketch ratio on ``ladder`` whose final accuracy is within ``tolerance``
    points of EFSGD's (same seed, rounds and data split). Ratios are tried from the smallest up and the
    search for a β stops at its first success; with ``exhaustive`` every (β, ratio) pair is run at once
    (for machines with many cores: no waiting on the ladder). Finished runs with the same run config, in ``out`` or in
    the ``reuse`` folders (e.g. the main grid's), are reused instead of run again."""
    extra = dict(extra or {})
    ref_name = f"efsgd-s{seed}"
    ref = Run("efsgd", seed, run_config(task, METHODS["efsgd"], seed, rounds, out, ref_name, extra),
              task.num_nodes, ref_name)
    state = {b: 0 for b in betas}  # next ladder index per β
    result: dict[float, float | None] = {}
    tried: dict[float, list[dict[str, Any]]] = {b: [] for b in betas}
    ex = Executor(out, jobs)
    pending: dict[cf.Future[dict[str, Any]], Run] = {}
    waiting: list[Run] = []  # finished study runs waiting for the reference

    folders: dict[str, Path] = {}

    def submit(r: Run) -> None:
        folders[r.name] = r.folder(out)
        same = None if force else find_equivalent(r, [out, *reuse])
        if same is not None:
            folders[r.name] = same
            log.info("reuse %s for %s", same, r.name)
            f: cf.Future[dict[str, Any]] = cf.Future()
            f.set_result({})
            pending[f] = r
        else:
            log.info("start %s", r.name)
            pending[ex.submit(r)] = r

    def decide(r: Run) -> None:
        b, w = r.extra["beta"], r.extra["ratio"]
        acc, ref_acc = _final_acc(folders[r.name]), _final_acc(folders[ref_name])
        if ref_acc is None:
            raise RuntimeError(f"the EFSGD reference {ref_name} has no final accuracy")
        ok = acc is not None and acc >= ref_acc - tolerance
        tried[b].append({"ratio": w, "final_accuracy": acc, "within_tolerance": ok, "run": str(folders[r.name])})
        log.info("β=%g w=%gd: %.2f %% (EFSGD %.2f %%) -> %s", b, w, acc if acc is not None else float("nan"),
                 ref_acc, "within" if ok else "below")
        if exhaustive:
            return  # decided at the end, from every ratio's result
        if ok:
            result[b] = w
        elif state[b] + 1 < len(ladder):
            state[b] += 1
            submit(_study_run(task, b, ladder[state[b]], seed, rounds, out, extra))
        else:
            result[b] = None

    try:
        submit(ref)
        for b in betas:
            for w in ladder if exhaustive else ladder[:1]:
                submit(_study_run(task, b, w, seed, rounds, out, extra))
        while pending:
            finished, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                r = pending.pop(fut)
                try:
                    fut.result()
                except Exception as exc:
                    log.error("run %s failed: %s: %s", r.name, type(exc).__name__, exc)
                    if r is ref:
                        raise
                if r is ref:
                    for w in waiting:
                        decide(w)
                    waiting.clear()
                elif _final_acc(folders[ref_name]) is None:
                    waiting.append(r)
                else:
                    decide(r)
    finally:
        ex.close()
    if exhaustive:
        for b in betas:
            passing = [t["ratio"] for t in tried[b] if t["within_tolerance"]]
            result[b] = min(passing) if passing else None
    ref_acc = _final_acc(folders[ref_name])
    table = {"task": task.name, "seed": seed, "rounds": rounds, "tolerance_points": tolerance,
             "efsgd_final_accuracy": ref_acc, "ladder": list(ladder),
             "rows": [{"beta": b, "smallest_sketch_ratio": result.get(b), "tried": sorted(tried[b],
                       key=lambda t: t["ratio"])} for b in betas]}
    (out / "beta_study.json").write_text(json.dumps(table, indent=2))
    (out / "beta_study.md").write_text(beta_markdown(table))
    return table


def beta_markdown(table: Mapping[str, Any]) -> str:
    """The paper's Table 2 layout (β vs the smallest sketch size within the tolerance of EFSGD), then the
    final accuracy of every (β, sketch size) run as a matrix."""
    rows = table["rows"]
    ref = table["efsgd_final_accuracy"]
    lines = [f"# β vs smallest sketch size ({table['task']}, seed {table['seed']}, {table['rounds']} rounds)", "",
             f"Smallest count-sketch width w (fraction of the model size, v = 1) from the ladder "
             f"{', '.join(f'{w:g}' for w in table['ladder'])} whose final test accuracy is within "
             f"{table['tolerance_points']:g} point(s) of EFSGD ({_f(ref)} %). "
             f"Gradient compressor: random block, k = 0.1 d. \"–\" = none of the ladder.", "",
             "| β | " + " | ".join(f"{r['beta']:g}" for r in rows) + " |",
             "|---|" + "---|" * len(rows),
             "| smallest sketch size | " + " | ".join("–" if r["smallest_sketch_ratio"] is None
                                                     else f"{r['smallest_sketch_ratio']:g}" for r in rows) + " |"]
    ratios = sorted({t["ratio"] for r in rows for t in r["tried"]})
    if ratios and ref is not None:
        lines += ["", f"Final test accuracy (%) of every run, Δ vs EFSGD ({_f(ref)} %) in brackets; "
                  "memory saving = 1 − w:", "",
                  "| β \\ w | " + " | ".join(f"{w:g} ({100 * (1 - w):.0f} % saved)" for w in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for r in rows:
            acc = {t["ratio"]: t["final_accuracy"] for t in r["tried"]}
            cells = ["" if acc.get(w) is None else f"{acc[w]:.2f} ({acc[w] - ref:+.2f})" for w in ratios]
            lines.append(f"| {r['beta']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Runs tried (final accuracy, %):", ""]
    for r in rows:
        tried = ", ".join(f"w={t['ratio']:g}: {_f(t['final_accuracy'])}" for t in r["tried"])
        lines.append(f"- β = {r['beta']:g}: {tried or 'none'}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _csv(s: str, conv: Callable[[str], Any] = str) -> list[Any]:
    return [conv(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="mnist")
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per run)")
    p.add_argument("--study", choices=["grid", "beta"], default="grid")
    p.add_argument("--methods", type=str, default="", help=f"comma-separated method ids; valid: {', '.join(METHODS)}")
    p.add_argument("--only", type=str, default="", help="run only this method id (others' folders are kept)")
    p.add_argument("--seeds", type=str, default="", help="comma-separated seeds (default: the task's)")
    p.add_argument("--all-seeds", action="store_true", help="run every method on every seed")
    p.add_argument("--rounds", type=int, default=0, help="server rounds (default: the task's)")
    p.add_argument("--num-nodes", type=int, default=0,
                   help="clients (= partitions) instead of the task's; e.g. 10 with --set fraction-train=1.0 for "
                        "full participation")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config overrides")
    p.add_argument("--report-only", action="store_true", help="only (re)write tables and plots")
    p.add_argument("--betas", type=str, default="", help="β study: comma-separated β values")
    p.add_argument("--ladder", type=str, default="", help="β study: comma-separated sketch ratios")
    p.add_argument("--tolerance", type=float, default=1.0, help="β study: accuracy points below EFSGD allowed")
    p.add_argument("--exhaustive", action="store_true",
                   help="β study: run every (β, ratio) pair at once instead of climbing the ladder (many cores)")
    p.add_argument("--reuse", type=Path, action="append", default=[],
                   help="folder(s) of finished runs to reuse (copy in for a grid) when the run config is the same")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.add_argument("--engine", choices=ENGINES, default="inmemory",
                   help="inmemory: the in-process grid (default); flower: Flower's simulation engine (flwr run, Ray)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs} is out of range; allowed: >= 1")
    task = TASKS[args.task]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        extra = parse_set(args.set)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    rounds = args.rounds or task.rounds
    if args.num_nodes < 0:
        raise SystemExit(f"--num-nodes={args.num_nodes} is out of range; allowed: >= 1 (0 = the task's)")
    if args.num_nodes:
        task = dataclasses.replace(task, num_nodes=args.num_nodes)
    seeds = _csv(args.seeds, int) if args.seeds else list(task.seeds)
    if args.study == "beta":
        if args.engine != "inmemory":
            raise SystemExit(f"--study beta runs on the in-process grid only; drop --engine {args.engine}")
        betas = _csv(args.betas, float) if args.betas else list(BETAS)
        ladder = sorted(_csv(args.ladder, float)) if args.ladder else list(LADDER)
        table = beta_study(task, out, betas=betas, ladder=ladder, seed=seeds[0], rounds=rounds,
                           tolerance=args.tolerance, jobs=args.jobs, force=args.force, extra=extra,
                           reuse=args.reuse, exhaustive=args.exhaustive)
        print(beta_markdown(table))
        return 0
    methods = [args.only] if args.only else (_csv(args.methods) if args.methods else list(task.methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method id(s) {unknown}; valid: {', '.join(METHODS)}")
    if not args.report_only:
        runs = plan_grid(task, methods, seeds, rounds, out, extra, all_seeds=args.all_seeds)
        done = run_all(runs, out, jobs=args.jobs, force=args.force, reuse=args.reuse, engine=args.engine)
        failed = len([r for r in runs if not is_done(r, out)])
        if failed:
            log.error("%d run(s) did not finish", failed)
        log.info("%d runs done now", len(done))
    rows = write_report(out, title=f"Results: {task.name}", text=task.text, highlight=task.highlight)
    if rows:
        print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
