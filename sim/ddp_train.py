"""Data-parallel training of a real model with the ConEF DDP communication hook (issue #4).

Usage (2 processes on this machine, gloo on CPU, NCCL when CUDA is available)::

    torchrun --nproc_per_node=2 -m sim.ddp_train --method conef-cs --steps 200 \\
        --out /tmp/ddp_train_conef-cs.json   # --save to overwrite an existing (committed) file

``--method`` is a registry name (``sgd``, ``efsgd``, ``conef-cs``, ``ef-powersgd``,
``conef-powersgd``, ``ef-topk``, ``ef-sign``, ``rbsgd``, ...), ``ddp`` (plain DDP,
no hook) or ``liec`` (LIEC-SGD, :mod:`conef_fl.ddp.liec`: bidirectional compression,
immediate error compensation, parameters averaged every ``--average-every`` steps; the
uplink takes ``--compressor``/``--k-ratio``/``--value-dtype``/``--flat``, the downlink the
``--down-*`` options). The default task is MNIST (``../shared/data/mnist``) with the LeNet-like
CNN; ``--task shakespeare`` trains LEAF's character LSTM on Tiny Shakespeare.

Each rank trains on its own shard (strided indices of a per-epoch permutation that
every rank draws from the same seed). Rank 0 logs every ``--log-every`` steps and
writes the results JSON (per-step records and a final test evaluation; the keys are
documented in ``docs/ddp.md``). Without ``torchrun`` (no ``RANK`` in the environment)
it runs as a single process.

The NCCL path (``device = cuda:LOCAL_RANK``) ran on one H100 with one rank
(``--backend nccl``, see ``docs/ddp.md``); several GPUs have not been tried.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conef_fl.ddp import (
    COMPENSATIONS,
    DOWNLINK_FEEDBACKS,
    ConEFHookState,
    LIECHookState,
    dense_error_bytes,
    liec_average_,
    register_conef_hook,
    register_liec_hook,
)
from conef_fl.registry import available_methods
from conef_fl.seeding import derive_seed, make_generator
from conef_fl.tasks import build_model, count_parameters, evaluate, load_task_data
from sim.flower_runtime import free_port

SCHEMA = "conef-fl/ddp_train/1"
logger = logging.getLogger("sim.ddp_train")

#: Per-task defaults of the optimizer (SGD): learning rate and momentum.
TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "mnist": {"lr": 0.05, "momentum": 0.5},
    "shakespeare": {"lr": 0.8, "momentum": 0.0},
}
#: Method-config overrides that the command line can set (argparse dest -> MethodConfig field).
CONFIG_FLAGS = (
    "k_ratio",
    "sketch_ratio",
    "sketch_rows",
    "sketch_dtype",
    "beta",
    "rank",
    "value_dtype",
    "error_compressor",
    "compressor",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m sim.ddp_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="conef-cs", help="registry name, 'ddp' (no hook) or 'liec'")
    p.add_argument("--task", default="mnist", choices=sorted(TASK_DEFAULTS))
    p.add_argument("--data-dir", default=None, help="data folder (default ../shared/data)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=None, help="default per task (mnist 0.05, shakespeare 0.8)")
    p.add_argument("--momentum", type=float, default=None, help="default per task (mnist 0.5, shakespeare 0)")
    p.add_argument("--warmup-steps", type=int, default=10, help="plain all-reduce iterations first")
    p.add_argument("--error-reset-every", type=int, default=0, help="average the sketches every R steps")
    p.add_argument("--k-ratio", type=float, default=None)
    p.add_argument("--sketch-ratio", type=float, default=None)
    p.add_argument("--sketch-rows", type=int, default=None)
    p.add_argument("--sketch-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--rank", type=int, default=None, help="PowerSGD rank")
    p.add_argument("--value-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--error-compressor", default=None)
    p.add_argument("--compressor", default=None)
    p.add_argument("--flat", action="store_true", help="compress whole buckets (default: layer-wise)")
    liec = p.add_argument_group("--method liec")
    liec.add_argument("--average-every", type=int, default=32, help="H: steps between parameter averages")
    liec.add_argument("--compensation", default="immediate", choices=list(COMPENSATIONS))
    liec.add_argument("--up-feedback", default=None, help="worker error feedback (compensation=delayed only)")
    liec.add_argument("--down-compressor", default=None, help="downlink compressor (default random-block-k)")
    liec.add_argument("--down-k-ratio", type=float, default=None)
    liec.add_argument("--down-feedback", default=None, choices=list(DOWNLINK_FEEDBACKS), help="server error")
    liec.add_argument("--down-sketch-ratio", type=float, default=None)
    liec.add_argument("--down-beta", type=float, default=None)
    liec.add_argument("--down-value-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    liec.add_argument("--keep-server-error", action="store_true", help="do not reset the server error")
    liec.add_argument("--shared-downlink-seed", action="store_true", help="downlink uses the uplink's seed")
    liec.add_argument("--average-optimizer-state", action="store_true", help="also average momentum buffers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="subsample the training set")
    p.add_argument("--eval-max", type=int, default=10_000, help="test samples evaluated at the end")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--out", default=None, help="results JSON (default docs/results/ddp_train_<method>.json)")
    p.add_argument("--save", action="store_true", help="overwrite --out if it exists (e.g. a committed result)")
    args = p.parse_args(argv)
    if args.method not in ("ddp", "liec") and args.method not in available_methods():
        p.error(f"--method {args.method!r} is not valid; allowed: ddp, liec, {', '.join(available_methods())}")
    for name in ("steps", "batch_size", "log_every", "eval_max"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range; allowed: >= 1")
    for name in ("warmup_steps", "error_reset_every", "threads", "average_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range; allowed: >= 0")
    args.out = args.out or f"docs/results/ddp_train_{args.method}.json"
    if Path(args.out).exists() and not args.save:
        p.error(f"--out {args.out} exists; pass --save to overwrite it")
    return args


def init_distributed(backend: str) -> tuple[int, int, int, torch.device, str]:
    """Initialise the process group from torchrun's environment (or a 1-process group).

    Returns ``(rank, world_size, local_rank, device, backend)``; the device is
    ``cuda:LOCAL_RANK`` with NCCL, else CPU.
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which is not available; allowed here: gloo, auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = "env://"
    else:
        rank, world = 0, 1
        init_method = f"tcp://127.0.0.1:{free_port()}"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return rank, world, local_rank, device, backend


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if y.dim() == 2:  # text: (N, T, V) logits, (N, T) targets
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy(logits, y)


class ShardedBatches:
    """This rank's batches: strided indices of a per-epoch permutation shared by all ranks.

    Parameters
    ----------
    n:
        Training-set size.
    rank, world:
        This rank and the number of ranks.
    batch_size:
        Samples per batch on this rank.
    seed:
        Seed of the permutations (epoch ``e`` uses ``derive_seed(seed, "epoch", e)``).
    """

    def __init__(self, n: int, rank: int, world: int, batch_size: int, seed: int) -> None:
        if n // world < batch_size:
            raise ValueError(f"batch_size={batch_size} is out of range; allowed: <= {n // world} per rank")
        self.n, self.rank, self.world, self.batch_size, self.seed = n, rank, world, batch_size, seed
        self.epoch = -1
        self._shard = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def next(self) -> torch.Tensor:
        """Indices of the next batch (a new epoch starts when the shard is exhausted)."""
        if self._pos + self.batch_size > self._shard.numel():
            self.epoch += 1
            gen = make_generator(derive_seed(self.seed, "epoch", self.epoch))
            perm = torch.randperm(self.n, generator=gen)
            usable = (self.n // self.world) * self.world  # every rank gets the same number of samples
            self._shard = perm[:usable][self.rank :: self.world]
            self._pos = 0
        idx = self._shard[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


def params_identical(model: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (NaN included): max and min of the bits agree."""
    flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in model.parameters()])
    bits = flat.view(torch.int32).to(torch.int64)
    hi, lo = bits.clone(), bits.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the training; return the results dict on rank 0 (``None`` on the other ranks)."""
    rank, world, local_rank, device, backend = init_distributed(args.backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        return _train(args, rank, world, local_rank, device, backend, threads)
    finally:
        dist.destroy_process_group()


def _train(
    args: argparse.Namespace,
    rank: int,
    world: int,
    local_rank: int,
    device: torch.device,
    backend: str,
    threads: int,
) -> dict[str, Any] | None:
    defaults = TASK_DEFAULTS[args.task]
    lr = args.lr if args.lr is not None else defaults["lr"]
    momentum = args.momentum if args.momentum is not None else defaults["momentum"]
    task = load_task_data(args.task, args.data_dir, max_train=args.max_train, seed=args.seed)
    logger.info("%s", task.description)
    logger.info("%d ranks, backend %s, device %s, %d threads/rank", world, backend, device, threads)
    model = build_model(task, seed=args.seed).to(device)
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    state: ConEFHookState | LIECHookState | None = None
    liec: LIECHookState | None = None
    if args.method == "liec":
        state = liec = register_liec_hook(ddp, **liec_settings(args))
    elif args.method != "ddp":
        overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
        if args.flat:
            overrides["layerwise"] = False
        overrides.setdefault("seed", args.seed)
        state = register_conef_hook(
            ddp,
            args.method,
            warmup_steps=args.warmup_steps,
            error_reset_every=args.error_reset_every,
            **overrides,
        )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    batches = ShardedBatches(task.num_train, rank, world, args.batch_size, args.seed)
    d = count_parameters(model)
    dense_step_bytes = 4 * d
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for step in range(args.steps):
        idx = batches.next()
        x, y = task.x_train[idx].to(device), task.y_train[idx].to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _loss(ddp, x, y)
        loss.backward()
        opt.step()
        averaged = False
        if liec is not None:
            averaged = liec_average_(ddp, liec, optimizer=opt if args.average_optimizer_state else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        rec = {
            "step": step,
            "loss": float(loss.detach()),
            "time_s": elapsed,
            "bytes_sent": state.last_bytes_sent if state is not None else dense_step_bytes,
            "bytes_dense": state.last_bytes_dense if state is not None else dense_step_bytes,
            "error_state_bytes": state.error_state_bytes() if state is not None else 0,
        }
        if liec is not None:
            rec["bytes_down"] = liec.last_bytes_down
            rec["averaged"] = averaged
        if not math.isfinite(rec["loss"]):
            logger.warning("step %d: loss is %s", step, rec["loss"])
        records.append(rec)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            logger.info(
                "step %4d  loss %.4f  %.1f ms  sent %d B (%.1f%% of dense)  error state %d B",
                step, rec["loss"], 1e3 * elapsed, rec["bytes_sent"],
                100.0 * rec["bytes_sent"] / rec["bytes_dense"], rec["error_state_bytes"],
            )  # fmt: skip
    wall = time.perf_counter() - start
    identical_before_final_average = None
    if liec is not None:  # the ranks' models differ between averages: evaluate their average
        identical_before_final_average = params_identical(model)
        if not identical_before_final_average:
            liec_average_(ddp, liec, optimizer=opt if args.average_optimizer_state else None, force=True)
    identical = params_identical(model)
    if rank != 0:
        return None
    n_eval = min(args.eval_max, task.num_test)
    metrics = evaluate(model, task.x_test[:n_eval], task.y_test[:n_eval])
    warm = min(args.warmup_steps, args.steps) if state is not None else 0
    after = records[warm:] or records
    sent_total = sum(r["bytes_sent"] for r in records)
    dense_total = sum(r["bytes_dense"] for r in records)
    err = state.error_state_bytes() if state is not None else 0
    final = {
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "test_examples": n_eval,
        "perplexity": metrics.get("perplexity"),
        "final_train_loss": records[-1]["loss"],
        "median_step_time_s": statistics.median(r["time_s"] for r in records),
        "median_step_time_after_warmup_s": statistics.median(r["time_s"] for r in after),
        "bytes_sent_total": sent_total,
        "bytes_dense_total": dense_total,
        "bytes_ratio": sent_total / dense_total,
        "bytes_ratio_after_warmup": (sum(r["bytes_sent"] for r in after) / sum(r["bytes_dense"] for r in after)),
        "error_state_bytes": err,
        "dense_error_bytes": dense_error_bytes(model),
        "error_state_ratio": err / dense_error_bytes(model),
        "compressor_state_bytes": state.compressor_state_bytes() if state is not None else 0,
        "params_identical_across_ranks": identical,
        "wall_time_s": wall,
        "hook_stats": state.stats() if state is not None else None,
    }
    if liec is not None:
        final.update(liec_final(liec, records, after, identical_before_final_average))
        logger.info(
            "LIEC: downlink %.1f%% of dense; %d averages (%d B); server error %d B, worker error %d B",
            100 * final["bytes_down_ratio"], final["averages"], final["bytes_average_total"],
            final["server_error_state_bytes"], final["worker_error_state_bytes"],
        )  # fmt: skip
    logger.info(
        "done: test accuracy %.4f, loss %.4f; sent %.1f%% of dense (%.1f%% after warm-up); error state %d B "
        "(%.2f%% of 4d); identical params on all ranks: %s",
        final["test_accuracy"], final["test_loss"], 100 * final["bytes_ratio"],
        100 * final["bytes_ratio_after_warmup"], err, 100 * final["error_state_ratio"], identical,
    )  # fmt: skip
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "world_size": world,
        "backend": backend,
        "device": str(device),
        "threads_per_rank": threads,
        "task": args.task,
        "model": type(model).__name__,
        "num_params": d,
        "method": args.method,
        "config": (
            state.config.to_dict()
            if isinstance(state, ConEFHookState)
            else {"uplink": state.uplink.to_dict(), "downlink": state.downlink.to_dict()}
            if state is not None
            else None
        ),
        "warmup_steps": args.warmup_steps if state is not None else 0,
        "error_reset_every": args.error_reset_every,
        "optimizer": {"name": "SGD", "lr": lr, "momentum": momentum, "batch_size_per_rank": args.batch_size},
        "args": vars(args),
        "steps": records,
        "final": final,
    }


def liec_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`register_liec_hook` from the command line."""
    settings: dict[str, Any] = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.up_feedback is not None:
        settings["feedback"] = args.up_feedback
    if args.flat:
        settings["layerwise"] = False
    settings.setdefault("seed", args.seed)
    for flag in ("compressor", "k_ratio", "feedback", "sketch_ratio", "beta", "value_dtype"):
        value = getattr(args, f"down_{flag}")
        if value is not None:
            settings[f"down_{flag}"] = value
    settings.update(
        compensation=args.compensation,
        average_every=args.average_every,
        warmup_steps=args.warmup_steps,
        reset_server_error=not args.keep_server_error,
        shared_downlink_seed=args.shared_downlink_seed,
    )
    return settings


def liec_final(
    state: LIECHookState, records: list[dict[str, Any]], after: list[dict[str, Any]], identical_before: bool | None
) -> dict[str, Any]:
    """The LIEC-specific final keys: downlink and averaging bytes, worker and server error state."""
    dense_total = sum(r["bytes_dense"] for r in records)
    down_total = sum(r["bytes_down"] for r in records)
    return {
        "bytes_down_total": down_total,
        "bytes_down_ratio": down_total / dense_total,
        "bytes_down_ratio_after_warmup": sum(r["bytes_down"] for r in after) / sum(r["bytes_dense"] for r in after),
        "bytes_average_total": state.bytes_average_total,
        "bytes_up_with_average_ratio": (sum(r["bytes_sent"] for r in records) + state.bytes_average_total)
        / dense_total,
        "averages": state.averages,
        "worker_error_state_bytes": state.worker_error_state_bytes(),
        "server_error_state_bytes": state.server_error_state_bytes(),
        "params_identical_before_final_average": identical_before,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, and write the JSON on rank 0."""
    args = parse_args(argv)
    results = train(args)
    if results is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
