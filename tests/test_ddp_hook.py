"""Tests of the DDP communication hook on CPU: gloo, 2 processes, a free port found at run time.

All distributed scenarios run in **one** pair of processes (``_worker``), which saves
each rank's results to a file; the test functions below check them. The processes are
always joined, or terminated after a timeout, even when a scenario fails.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conef_fl.compressors.base import k_for_ratio
from conef_fl.compressors.powersgd import matrix_view_shape, uses_dense
from conef_fl.config import MethodConfig
from conef_fl.ddp_hook import ConEFHookState, conef_hook, expected_bytes_per_step, register_conef_hook
from conef_fl.registry import method_config

WORLD = 2
STEPS = 6
JOIN_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------------
# Models and data shared by the worker and the checks.
# ------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    """Conv + two linear layers on 1x8x8 inputs (5,010 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(144, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


class _Wide(nn.Module):
    """An MLP whose rebuilt DDP layout has two buckets (the first closes past 1 MiB; 619K parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 4800)
        self.fc2 = nn.Linear(4800, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _make(kind: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "net":
            return _Net()
        if kind == "wide":
            return _Wide()
        if kind == "rank1":
            return nn.Linear(16, 8)
    raise ValueError(kind)


def _loss(kind: str, model: nn.Module, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    if kind == "rank1":
        # One sample x_r = (rank + 1) * x0 and a linear loss: every rank's weight gradient is
        # c x_rᵀ, and so is their average: exactly rank 1.
        x0 = torch.randn(1, 16, generator=torch.Generator().manual_seed(7))
        c = torch.randn(1, 8, generator=torch.Generator().manual_seed(8))
        return (model(x0 * (rank + 1)) * c).sum()
    x = torch.randn(8, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


# ------------------------------------------------------------------------------------------------
# Scenarios (run on every rank, in the same order).
# ------------------------------------------------------------------------------------------------


def _train(
    rank: int,
    method: str | MethodConfig | None,
    /,
    *,
    kind: str = "net",
    steps: int = STEPS,
    lr: float = 0.1,
    warmup_steps: int = 0,
    error_reset_every: int = 0,
    poison_step: int = -1,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``steps`` steps; at ``poison_step`` rank 0's loss is multiplied by Inf."""
    model = _make(kind)
    ddp = DDP(model)
    state = None
    if method is not None:
        state = register_conef_hook(
            ddp, method, warmup_steps=warmup_steps, error_reset_every=error_reset_every, **overrides
        )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params, sent, dense, tables = [], [], [], []
    rng_before = torch.random.get_rng_state()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(kind, ddp, rank, step)
        if step == poison_step and rank == 0:
            loss = loss * float("inf")
        loss.backward()
        if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):  # as GradScaler skips
            opt.step()
        params.append(_flat(model))
        if state is not None:
            sent.append(state.last_bytes_sent)
            dense.append(state.last_bytes_dense)
            if error_reset_every:
                tables.append([t.clone() for t in state.error_tensors()])
    out: dict[str, Any] = {
        "params": params,
        "sent": sent,
        "dense": dense,
        "tables": tables,
        "global_rng_unchanged": torch.equal(rng_before, torch.random.get_rng_state()),
        "shapes": [tuple(p.shape) for p in model.parameters()],
    }
    if state is not None:
        out["stats"] = state.stats()
        out["last_bucket_bytes"] = dict(state.last_bucket_bytes)
        out["expected_bytes"] = expected_bytes_per_step(state) if state.segments else None
        out["segment_sizes"] = [s.numel for s in state.segments.values()]
        out["reset_table_bytes"] = sum(t.numel() * t.element_size() for t in state.error_tensors())
    return out


def _restore(rank: int, method: str, /, *, kind: str = "net", **overrides: Any) -> dict[str, Any]:
    """Train 3 + 4 steps uninterrupted, and 3 steps + pickle + a new DDP model + 4 steps."""
    model = _make(kind)
    ddp = DDP(model)
    state = register_conef_hook(ddp, method, warmup_steps=1, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(m: nn.Module, d: nn.Module, o: torch.optim.Optimizer, i: int) -> None:
        o.zero_grad(set_to_none=True)
        _loss(kind, d, rank, i).backward()
        o.step()

    for i in range(3):
        step(model, ddp, opt, i)
    blob = pickle.dumps(state)
    ckpt_model = copy.deepcopy(model.state_dict())
    ckpt_opt = copy.deepcopy(opt.state_dict())
    for i in range(3, 7):
        step(model, ddp, opt, i)
    uninterrupted = _flat(model)

    model2 = _make(kind)
    model2.load_state_dict(ckpt_model)
    ddp2 = DDP(model2)
    state2 = pickle.loads(blob)
    register_conef_hook(ddp2, state=state2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt_opt)
    for i in range(3, 7):
        step(model2, ddp2, opt2, i)
    return {
        "uninterrupted": uninterrupted,
        "restored": _flat(model2),
        "segments_created_after_restore": state2.segments_created,
        "segments_created_before": pickle.loads(blob).segments_created,
    }


_PSGD = {"rank": 2}
#: ConEF whose error store is the identity (dense), fully fed back: EFSGD by another road.
_CONEF_IDENTITY = MethodConfig(feedback="conef", error_compressor="identity", beta=0.0)
_SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "plain": lambda r: _train(r, None),
    "sgd": lambda r: _train(r, "sgd"),
    "efsgd_k1": lambda r: _train(r, "efsgd", k_ratio=1.0),
    "randk_k1": lambda r: _train(r, "efsgd", compressor="random-k", k_ratio=1.0),
    "none_k1_flat": lambda r: _train(r, "rbsgd", k_ratio=1.0, layerwise=False),
    "conef_k1": lambda r: _train(r, "conef-cs", k_ratio=1.0),
    "efsgd": lambda r: _train(r, "efsgd"),
    "conef_identity": lambda r: _train(r, _CONEF_IDENTITY),
    "ef_psgd": lambda r: _train(r, "ef-powersgd", **_PSGD),
    "conef_psgd_identity": lambda r: _train(r, _CONEF_IDENTITY.replace(compressor="powersgd"), **_PSGD),
    "plain_rank1": lambda r: _train(r, None, kind="rank1"),
    "ef_psgd_rank1": lambda r: _train(r, "ef-powersgd", kind="rank1", rank=1),
    "conef_psgd_rank1": lambda r: _train(r, "conef-powersgd", kind="rank1", rank=1),
    "psgd_none_rank1": lambda r: _train(r, "ef-powersgd", kind="rank1", rank=1, feedback="none"),
    "conef": lambda r: _train(r, "conef-cs"),
    "conef_flat": lambda r: _train(r, "conef-cs", layerwise=False),
    "conef_randk": lambda r: _train(r, "conef-cs", compressor="random-k"),
    "conef_fp16": lambda r: _train(r, "conef-cs", value_dtype="float16"),
    "conef_bf16_sketch": lambda r: _train(r, "conef-cs", sketch_dtype="bfloat16"),
    "conef_rows3": lambda r: _train(r, "conef-cs", sketch_rows=3),
    "conef_q": lambda r: _train(r, "conef-q"),
    "hefsgd": lambda r: _train(r, "hefsgd"),
    "iconef_v1": lambda r: _train(r, "iconef-v1"),
    "rbsgd": lambda r: _train(r, "rbsgd"),
    "conef_psgd": lambda r: _train(r, "conef-powersgd", **_PSGD),
    "conef_psgd_flat": lambda r: _train(r, "conef-powersgd", layerwise=False, **_PSGD),
    "psgd_bf16": lambda r: _train(r, "ef-powersgd", value_dtype="bfloat16", **_PSGD),
    "ef_topk": lambda r: _train(r, "ef-topk"),
    "conef_topk": lambda r: _train(r, "conef-cs", compressor="top-k"),
    "ef_sign": lambda r: _train(r, "ef-sign"),
    "sgd_fp16": lambda r: _train(r, "sgd", value_dtype="float16"),
    "warmup": lambda r: _train(r, "conef-cs", warmup_steps=3),
    "reset": lambda r: _train(r, "conef-cs", error_reset_every=2, steps=4),
    "reset_psgd": lambda r: _train(r, "conef-powersgd", error_reset_every=2, steps=4, **_PSGD),
    "rebuild_flat": lambda r: _train(r, "conef-cs", layerwise=False, kind="wide", steps=3),
    "nonfinite_conef": lambda r: _train(r, "conef-cs", poison_step=2),
    "nonfinite_psgd": lambda r: _train(r, "conef-powersgd", poison_step=2, **_PSGD),
    "nonfinite_topk": lambda r: _train(r, "ef-topk", poison_step=2),
    "restore_conef": lambda r: _restore(r, "conef-cs"),
    "restore_conef_flat": lambda r: _restore(r, "conef-cs", layerwise=False, kind="wide"),
    "restore_psgd": lambda r: _restore(r, "conef-powersgd", rank=2),
}
#: Scenarios whose parameters must be identical on every rank (every method).
_METHOD_SCENARIOS = [n for n in _SCENARIOS if not n.startswith(("plain", "restore"))]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
        for name, fn in _SCENARIOS.items():
            results[name] = fn(rank)
    except BaseException:  # reported by the parent
        results["__error__"] = traceback.format_exc()
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario's results, one dict per rank."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, _free_port_once(), str(out))) for r in range(WORLD)]
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
    results = []
    for r in range(WORLD):
        path = out / f"rank{r}.pt"
        if not path.exists():
            pytest.fail(f"rank {r} wrote no results (exit code {procs[r].exitcode})")
        res = torch.load(path, weights_only=False)
        if "__error__" in res:
            pytest.fail(f"rank {r} failed:\n{res['__error__']}")
        results.append(res)
    return results


_PORT: list[int] = []


def _free_port_once() -> int:
    if not _PORT:
        _PORT.append(_free_port())
    return _PORT[0]


# ------------------------------------------------------------------------------------------------
# Checks.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "efsgd_k1", "randk_k1", "none_k1_flat"])
def test_lossless_compression_equals_plain_allreduce_exactly(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        for step, (got, ref) in enumerate(zip(res[name]["params"], res["plain"]["params"], strict=True)):
            assert torch.equal(got, ref), f"{name}: step {step} differs from plain all-reduce"


def test_conef_sketch_with_k_equal_d_matches_plain(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        for got, ref in zip(res["conef_k1"]["params"], res["plain"]["params"], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["ef_psgd_rank1", "conef_psgd_rank1", "psgd_none_rank1"])
def test_powersgd_rank1_on_rank1_gradient_matches_plain(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        for got, ref in zip(res[name]["params"], res["plain_rank1"]["params"], strict=True):
            torch.testing.assert_close(got, ref)
        assert res[name]["stats"]["last_bytes_sent"] == 4 * ((8 + 16) * 1 + 8)


@pytest.mark.parametrize(
    ("conef", "efsgd"), [("conef_identity", "efsgd"), ("conef_psgd_identity", "ef_psgd")]
)
def test_conef_with_identity_store_is_efsgd_step_for_step(
    runs: list[dict[str, Any]], conef: str, efsgd: str
) -> None:
    for res in runs:
        for step, (a, b) in enumerate(zip(res[conef]["params"], res[efsgd]["params"], strict=True)):
            assert torch.equal(a, b), f"step {step}: {conef} != {efsgd}"
        assert not torch.equal(res[efsgd]["params"][-1], res["plain"]["params"][-1])  # it did compress


@pytest.mark.parametrize("name", _METHOD_SCENARIOS)
def test_all_ranks_hold_identical_parameters(runs: list[dict[str, Any]], name: str) -> None:
    first = runs[0][name]["params"]
    for res in runs[1:]:
        for step, (a, b) in enumerate(zip(first, res[name]["params"], strict=True)):
            assert torch.equal(a, b), f"{name}: ranks differ after step {step + 1}"
    assert all(bool(torch.isfinite(p).all()) for p in first)
    assert all(res[name]["global_rng_unchanged"] for res in runs)


@pytest.mark.parametrize("name", ["restore_conef", "restore_conef_flat", "restore_psgd"])
def test_pickled_state_continues_exactly(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        assert torch.equal(res[name]["restored"], res[name]["uninterrupted"])
        # the saved error state was reused, not re-created
        assert res[name]["segments_created_after_restore"] == res[name]["segments_created_before"]


def _block_bytes(sizes: list[int], ratio: float, elem: int) -> int:
    return sum(k_for_ratio(n, ratio) for n in sizes) * elem


@pytest.mark.parametrize(
    ("name", "elem"), [("conef", 4), ("conef_fp16", 2), ("conef_randk", 4), ("efsgd", 4)]
)
def test_bytes_equal_k_values_per_segment(runs: list[dict[str, Any]], name: str, elem: int) -> None:
    res = runs[0][name]
    sizes = [math.prod(s) for s in res["shapes"]]
    expected = _block_bytes(sizes, 0.1, elem)
    assert res["sent"] == [expected] * STEPS
    assert res["dense"] == [4 * sum(sizes)] * STEPS
    assert res["expected_bytes"] == expected
    assert expected <= 0.1 * 4 * sum(sizes) + elem * len(sizes)


def test_flat_mode_sends_k_values_per_bucket(runs: list[dict[str, Any]]) -> None:
    res = runs[0]["conef_flat"]
    ((index, (sent, dense)),) = res["last_bucket_bytes"].items()
    assert sent == k_for_ratio(dense // 4, 0.1) * 4


def _psgd_bytes(shapes: list[tuple[int, ...]], rank: int, elem: int) -> int:
    total = 0
    for s in shapes:
        if len(s) < 2 or uses_dense(s, rank):
            total += math.prod(s)
        else:
            n, m = matrix_view_shape(s)
            total += (n + m) * min(rank, n, m)
    return total * elem


@pytest.mark.parametrize(("name", "elem"), [("conef_psgd", 4), ("ef_psgd", 4), ("psgd_bf16", 2)])
def test_powersgd_bytes_are_n_plus_m_times_r(runs: list[dict[str, Any]], name: str, elem: int) -> None:
    res = runs[0][name]
    expected = _psgd_bytes(res["shapes"], 2, elem)
    assert res["sent"] == [expected] * STEPS
    assert res["expected_bytes"] == expected


def test_sgd_fp16_sends_half_the_bytes(runs: list[dict[str, Any]]) -> None:
    res = runs[0]["sgd_fp16"]
    assert res["sent"] == [d // 2 for d in res["dense"]]


def test_gather_compressors_count_their_payload(runs: list[dict[str, Any]]) -> None:
    sizes = [math.prod(s) for s in runs[0]["ef_topk"]["shapes"]]
    topk = runs[0]["ef_topk"]
    assert topk["sent"][-1] == topk["expected_bytes"] == sum(k_for_ratio(n, 0.1) * 8 for n in sizes)
    sign = runs[0]["ef_sign"]
    assert sign["sent"][-1] == sum(-(-n // 8) + 4 for n in sizes)


def test_warmup_steps_send_dense_and_equal_plain(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        w = res["warmup"]
        assert w["sent"][:3] == w["dense"][:3]
        assert all(s < d for s, d in zip(w["sent"][3:], w["dense"][3:], strict=True))
        for step in range(3):
            assert torch.equal(w["params"][step], res["plain"]["params"][step])
        assert w["stats"]["dense_steps"] == 3 and w["stats"]["compressed_steps"] == STEPS - 3


@pytest.mark.parametrize("name", ["conef", "conef_flat", "conef_psgd", "rebuild_flat"])
def test_conef_error_state_is_a_tenth_of_dense(runs: list[dict[str, Any]], name: str) -> None:
    res = runs[0][name]
    d = sum(math.prod(s) for s in res["shapes"])
    segments = res["stats"]["segments"]
    error_bytes = res["stats"]["error_state_bytes"]
    assert 0 < error_bytes <= 0.1 * 4 * d * 1.001 + 4 * segments
    assert runs[0]["efsgd"]["stats"]["error_state_bytes"] == 4 * sum(
        math.prod(s) for s in runs[0]["efsgd"]["shapes"]
    )


@pytest.mark.parametrize("name", ["reset", "reset_psgd"])
def test_error_reset_averages_the_sketches(runs: list[dict[str, Any]], name: str) -> None:
    t0, t1 = runs[0][name]["tables"], runs[1][name]["tables"]
    for step in (1, 3):  # reset after compressed steps 2 and 4
        for a, b in zip(t0[step], t1[step], strict=True):
            assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(t0[0], t1[0], strict=True))  # not shared in between
    assert runs[0][name]["stats"]["bytes_reset_total"] == 2 * runs[0][name]["reset_table_bytes"]


def test_flat_mode_survives_the_bucket_rebuild(runs: list[dict[str, Any]]) -> None:
    res = runs[0]["rebuild_flat"]
    # iteration 0 used DDP's initial single bucket; the rebuilt layout has two buckets
    assert len(res["last_bucket_bytes"]) == 2
    assert res["stats"]["segments"] == 2
    assert res["stats"]["segments_created"] == 3
    d = sum(math.prod(s) for s in res["shapes"])
    assert sum(res["segment_sizes"]) == d
    assert sorted(res["segment_sizes"]) == sorted(
        dense // 4 for _, dense in res["last_bucket_bytes"].values()
    )


@pytest.mark.parametrize("name", ["nonfinite_conef", "nonfinite_psgd", "nonfinite_topk"])
def test_nonfinite_gradient_on_one_rank_keeps_ranks_in_step(runs: list[dict[str, Any]], name: str) -> None:
    # the poisoned step is skipped on every rank (all received a non-finite average), then training goes on
    for res in runs:
        params = res[name]["params"]
        assert torch.equal(params[1], params[2])
        assert not torch.equal(params[2], params[3])
    assert runs[0][name]["stats"]["nonfinite_segments"] > 0
    assert runs[1][name]["stats"]["nonfinite_segments"] == 0


# ------------------------------------------------------------------------------------------------
# Single-process checks (no process group needed).
# ------------------------------------------------------------------------------------------------


def test_state_pickles_without_process_group() -> None:
    state = ConEFHookState.from_method("conef-cs", warmup_steps=3, k_ratio=0.2)
    state.process_group = object()  # type: ignore[assignment]  # a process group never travels
    state.rng.manual_seed(5)
    draw = torch.randint(0, 100, (3,), generator=copy.deepcopy(state.rng))
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None
    assert clone.config == state.config and clone.warmup_steps == 3
    assert torch.equal(torch.randint(0, 100, (3,), generator=clone.rng), draw)
    fresh = ConEFHookState.from_method("conef-cs", warmup_steps=3, k_ratio=0.2)
    fresh.load_state_dict(clone.state_dict())
    with pytest.raises(ValueError, match="config"):
        ConEFHookState.from_method("efsgd").load_state_dict(clone.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, r"warmup_steps=-1 .*>= 0"),
        ({"error_reset_every": 1.5}, r"error_reset_every=1.5 .*>= 0"),
        ({"method": "qsgd"}, r"compressor='qsgd' .*allowed: .*random-block-k"),
        ({"method": "atomo"}, r"compressor='atomo'"),
        ({"method": "nope"}, r"unknown method 'nope'"),
        ({"k_ratio": 1.5}, r"k_ratio=1.5 .*\(0, 1\]"),
        (
            {"method": MethodConfig(feedback="iconef-v1", compressor="powersgd")},
            r"feedback='iconef-v1' .*powersgd",
        ),
        ({"method": "conef-q", "error_reset_every": 4}, r"error_reset_every=4 .*linear"),
        ({"method": "sgd", "error_reset_every": 4}, r"error_reset_every=4 .*linear"),
    ],
)
def test_bad_config_raises_value_error(kwargs: dict[str, Any], match: str) -> None:
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "conef-cs")
    with pytest.raises(ValueError, match=match):
        ConEFHookState.from_method(method, **kwargs)


def test_register_rejects_non_ddp_model_and_bad_state() -> None:
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_conef_hook(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MethodConfig"):
        ConEFHookState(None, {"feedback": "conef"})  # type: ignore[arg-type]
    assert ConEFHookState(None, MethodConfig()).config == method_config("conef-cs")
    assert callable(conef_hook)
