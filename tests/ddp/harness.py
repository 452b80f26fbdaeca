"""The one multi-process harness of the DDP tests, and the small models its scenarios train.

:func:`run_world` spawns ``world`` gloo processes on a free port found at run time. Each
runs every scenario of a table (``name -> fn(rank) -> dict``, module-level so that the
children can import it) in order, and saves its results; the parent collects them, and
always stops every process, also when one fails or hangs.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import pickle
import tempfile
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conef_fl.ddp import register_conef_hook
from sim.flower_runtime import free_port

WORLD = 2
STEPS = 6
JOIN_TIMEOUT_S = 300


def _rank_main(rank: int, world: int, port: int, out_dir: str, module: str, table: str) -> None:
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        scenarios = getattr(importlib.import_module(module), table)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        for name, fn in scenarios.items():
            results[name] = fn(rank)
    except BaseException:  # reported by the parent
        results["__error__"] = traceback.format_exc()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(module: str, table: str = "SCENARIOS", world: int = WORLD) -> list[dict[str, Any]]:
    """Run ``module.table`` on ``world`` ranks; one results dict per rank (``pytest.fail`` on any error)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="conef-ddp-") as out:
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, out, module, table)) for r in range(world)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(JOIN_TIMEOUT_S)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for r, p in enumerate(procs):
            path = Path(out) / f"rank{r}.pt"
            if not path.exists():
                pytest.fail(f"rank {r} wrote no results (exit code {p.exitcode})")
            res = torch.load(path, weights_only=False)
            if "__error__" in res:
                pytest.fail(f"rank {r} failed:\n{res['__error__']}")
            results.append(res)
    return results


# ------------------------------------------------------------------------------------------------
# Models, data and training loops of the scenarios.
# ------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """Conv + two linear layers on 1x8x8 inputs (5,010 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(144, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def make_model(kind: str = "net") -> nn.Module:
    """``net`` (:class:`Net`), ``wide`` (an MLP of 619K parameters whose rebuilt DDP layout has two
    buckets), or ``rank1`` (a linear layer whose gradients are exactly rank 1), from seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "net":
            return Net()
        if kind == "wide":
            return nn.Sequential(
                nn.Flatten(), nn.Linear(64, 4800), nn.ReLU(), nn.Linear(4800, 64), nn.ReLU(), nn.Linear(64, 10)
            )
        if kind == "rank1":
            return nn.Linear(16, 8)
    raise ValueError(f"kind={kind!r}; allowed: net, wide, rank1")


def loss(kind: str, model: nn.Module, rank: int, step: int) -> torch.Tensor:
    """The loss of ``rank``'s batch at ``step`` (``rank1``: one sample ``(rank + 1) x0`` and a linear loss,
    so every rank's weight gradient is ``c x_rᵀ``, and so is their average: exactly rank 1)."""
    if kind == "rank1":
        x0 = torch.randn(1, 16, generator=torch.Generator().manual_seed(7))
        c = torch.randn(1, 8, generator=torch.Generator().manual_seed(8))
        return (model(x0 * (rank + 1)) * c).sum()
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated into one flat copy."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def train(
    rank: int,
    register: Callable[[DDP], Any] | None,
    record: Callable[[Any, DDP, int], dict[str, Any]] | None = None,
    *,
    kind: str = "net",
    steps: int = STEPS,
    lr: float = 0.1,
    poison_step: int = -1,
) -> dict[str, Any]:
    """Train ``steps`` SGD steps with the hook ``register(ddp)`` installs (None: plain DDP).

    Per step: ``params``, ``grads`` (what the optimizer saw), ``local`` (this rank's gradient
    without communication) and ``record(state, ddp, step)``'s entries. At ``poison_step``
    rank 0's loss is multiplied by Inf; a non-finite step is skipped, as ``GradScaler`` does.
    """
    model = make_model(kind)
    ddp = DDP(model)
    state = register(ddp) if register is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rng_before = torch.random.get_rng_state()
    out: dict[str, Any] = {"params": [], "grads": [], "local": []}
    for step in range(steps):
        out["local"].append(flat(torch.autograd.grad(loss(kind, model, rank, step), list(model.parameters()))))
        opt.zero_grad(set_to_none=True)
        value = loss(kind, ddp, rank, step)
        if step == poison_step and rank == 0:
            value = value * float("inf")
        value.backward()
        grads = [p.grad for p in model.parameters()]
        out["grads"].append(flat(grads))
        if all(bool(torch.isfinite(g).all()) for g in grads):
            opt.step()
        for key, v in (record(state, ddp, step) if record is not None else {}).items():
            out.setdefault(key, []).append(v)
        out["params"].append(flat(model.parameters()))
    out["global_rng_unchanged"] = torch.equal(rng_before, torch.random.get_rng_state())
    out["shapes"] = [tuple(p.shape) for p in model.parameters()]
    out["sizes"] = [p.numel() for p in model.parameters()]
    if state is not None:
        out["stats"] = state.stats()
        out["state"] = state
    return out


def restore(
    rank: int,
    register: Callable[[DDP, Any], Any],
    after_step: Callable[[DDP, Any, torch.optim.Optimizer], object] | None = None,
    *,
    kind: str = "net",
    init_sync: bool = True,
) -> dict[str, Any]:
    """Train 3 + 4 steps uninterrupted, and 3 steps + pickle + a new DDP model + 4 steps.

    ``register(ddp, state)`` installs the hook (a new state when ``state`` is None);
    ``after_step`` runs after each optimizer step (LIEC's average).
    """

    def run(ddp: DDP, state: Any, opt: torch.optim.Optimizer, steps: range) -> None:
        for i in steps:
            opt.zero_grad(set_to_none=True)
            loss(kind, ddp, rank, i).backward()
            opt.step()
            if after_step is not None:
                after_step(ddp, state, opt)

    model = make_model(kind)
    ddp = DDP(model)
    state = register(ddp, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run(ddp, state, opt, range(3))
    blob = pickle.dumps(state)
    ckpt_model, ckpt_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(ddp, state, opt, range(3, 7))
    model2 = make_model(kind)
    model2.load_state_dict(ckpt_model)
    ddp2 = DDP(model2, init_sync=init_sync)
    state2 = register(ddp2, pickle.loads(blob))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt_opt)
    run(ddp2, state2, opt2, range(3, 7))
    return {
        "checkpoint": flat(ckpt_model.values()),
        "uninterrupted": flat(model.parameters()),
        "restored": flat(model2.parameters()),
        "stats": state.stats(),
        "stats_restored": state2.stats(),
        "segments_created_before": pickle.loads(blob).segments_created,
    }


def conef_run(
    rank: int,
    method: str | Any | None,
    /,
    *,
    kind: str = "net",
    steps: int = STEPS,
    poison_step: int = -1,
    warmup_steps: int = 0,
    error_reset_every: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """:func:`train` with the ConEF hook for ``method`` (None: plain DDP); records the bytes per step
    (``sent``, ``dense``) and, with error reset, the error ``tables``."""

    def register(ddp: DDP) -> Any:
        return register_conef_hook(
            ddp, method, warmup_steps=warmup_steps, error_reset_every=error_reset_every, **overrides
        )

    def record(state: Any, ddp: DDP, step: int) -> dict[str, Any]:
        out = {"sent": state.last_bytes_sent, "dense": state.last_bytes_dense}
        if error_reset_every:
            out["tables"] = [t.clone() for t in state.error_tensors()]
        return out

    hooked = method is not None
    return train(rank, register if hooked else None, record if hooked else None, kind=kind, steps=steps,
                 poison_step=poison_step)  # fmt: skip
