"""``conef_fl.ddp.liec``: the LIEC-SGD hook on CPU (gloo, 2 processes): lossless parity, averaging, bytes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from conef_fl.compressors.base import k_for_ratio
from conef_fl.config import MethodConfig
from conef_fl.ddp import (
    LIECHookState,
    default_downlink,
    default_uplink,
    liec_average_,
    liec_hook,
    register_conef_hook,
    register_liec_hook,
)

from .harness import STEPS, WORLD, loss, make_model, restore, run_world, train


def _liec(rank: int, /, *, poison_step: int = -1, **settings: Any) -> dict[str, Any]:
    """:func:`train` with the LIEC hook; records the bytes both ways, the server error and the averages."""

    def record(state: LIECHookState, ddp: Any, step: int) -> dict[str, Any]:
        return {
            "sent": state.last_bytes_sent,
            "down": state.last_bytes_down,
            "down_actual": sum(s.last_down_nbytes for s in state.segments.values()),
            "server": [t.clone() for t in state.server_error_tensors()],
            "averaged": liec_average_(ddp, state),
        }

    return train(rank, lambda ddp: register_liec_hook(ddp, **settings), record, poison_step=poison_step)


def _hook(rank: int, method: str, /) -> dict[str, Any]:
    """:func:`train` with the ConEF hook, no warm-up; for ``efsgd`` also the error after step 0."""

    def record(state: Any, ddp: Any, step: int) -> dict[str, Any]:
        if method != "efsgd" or step:
            return {}
        names = [n for n, _ in ddp.module.named_parameters()]
        return {"errors0": torch.cat([state.segments[(n,)].feedback.error.e for n in names]).clone()}

    return train(rank, lambda ddp: register_conef_hook(ddp, method, warmup_steps=0), record)


def _restore(rank: int, /, **settings: Any) -> dict[str, Any]:
    """Checkpoint between two averages, when the ranks' parameters differ: the new DDP model is built
    with ``init_sync=False`` (DDP would otherwise broadcast rank 0's)."""
    return restore(
        rank,
        lambda d, s: register_liec_hook(d, state=s, **settings),
        lambda d, s, o: liec_average_(d, s, optimizer=o),
        init_sync=False,
    )


def _forgotten_average(rank: int, /) -> dict[str, Any]:
    """Skip ``liec_average_`` when it is due: the next backward must raise on every rank."""
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    register_liec_hook(ddp, average_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss("net", ddp, rank, 0).backward()
    opt.step()
    try:
        loss("net", ddp, rank, 1).backward()
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"error": None}


_LOSSLESS_UP = {"k_ratio": 1.0}
SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "plain": lambda r: train(r, None),
    # lossless both ways: plain data-parallel SGD
    "liec_lossless": lambda r: _liec(r, downlink="sgd", average_every=2, **_LOSSLESS_UP),
    "liec_lossless_server_ef": lambda r: _liec(r, down_compressor="identity", average_every=4, **_LOSSLESS_UP),
    # lossless downlink only
    "ef_hook": lambda r: _hook(r, "efsgd"),
    "conef_hook": lambda r: _hook(r, "conef-cs"),
    "liec_down_lossless": lambda r: _liec(r, downlink="sgd", average_every=4),
    "liec_shared_seed": lambda r: _liec(r, shared_downlink_seed=True, average_every=4),
    "liec_down_lossless_h1": lambda r: _liec(r, downlink="sgd", average_every=1),
    "delayed_efsgd": lambda r: _liec(r, compensation="delayed", uplink="efsgd", downlink="sgd"),
    "delayed_conef": lambda r: _liec(r, compensation="delayed", uplink="conef-cs", downlink="sgd"),
    # lossy both ways
    "liec": lambda r: _liec(r, average_every=3),
    "liec_topk": lambda r: _liec(r, down_compressor="top-k", down_k_ratio=0.05, average_every=3),
    "liec_sign": lambda r: _liec(r, down_compressor="scaled-sign", average_every=3),
    "liec_fp16": lambda r: _liec(r, value_dtype="float16", down_value_dtype="float16", average_every=3),
    "liec_server_sketch": lambda r: _liec(r, downlink="conef-cs", average_every=3),
    "liec_flat": lambda r: _liec(r, layerwise=False, average_every=3),
    "liec_warmup": lambda r: _liec(r, warmup_steps=2, average_every=3),
    "liec_keep_server_error": lambda r: _liec(r, average_every=3, reset_server_error=False),
    "delayed_lossy": lambda r: _liec(r, compensation="delayed", uplink="efsgd", average_every=0),
    "nonfinite": lambda r: _liec(r, average_every=4, poison_step=2),
    "restore": lambda r: _restore(r, average_every=2),
    "forgotten_average": _forgotten_average,
}
_LIEC_SCENARIOS = [n for n in SCENARIOS if n.startswith(("liec", "delayed", "nonfinite"))]


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    """Every scenario's results, one dict per rank."""
    return run_world(__name__)


# ------------------------------------------------------------------------------------------------
# Lossless directions.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["liec_lossless", "liec_lossless_server_ef"])
def test_lossless_both_ways_is_plain_data_parallel_sgd_exactly(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        for step, (got, ref) in enumerate(zip(res[name]["params"], res["plain"]["params"], strict=True)):
            assert torch.equal(got, ref), f"{name}: step {step} differs from plain all-reduce"
        assert res[name]["stats"]["server_error_state_bytes"] >= 0
    # with a lossless downlink the server error never holds anything
    assert all(all(not t.any() for t in ts) for ts in runs[0]["liec_lossless_server_ef"]["server"])


@pytest.mark.parametrize(("liec", "hook"), [("delayed_efsgd", "ef_hook"), ("delayed_conef", "conef_hook")])
def test_delayed_compensation_with_lossless_downlink_is_the_unidirectional_hook(
    runs: list[dict[str, Any]], liec: str, hook: str
) -> None:
    for res in runs:
        for step, (a, b) in enumerate(zip(res[liec]["params"], res[hook]["params"], strict=True)):
            assert torch.equal(a, b), f"step {step}: {liec} != {hook}"
        assert not torch.equal(res[hook]["params"][-1], res["plain"]["params"][-1])  # it did compress
    assert runs[0][liec]["stats"]["worker_error_state_bytes"] == runs[0][hook]["stats"]["error_state_bytes"]


def test_immediate_first_step_is_ef_output_plus_ef_error(runs: list[dict[str, Any]]) -> None:
    # Same seed derivation as the EF hook: at step 0 (no memory yet) both send the same block
    # Δ_i = Q(g_i); LIEC's gradient is the EF hook's Δ plus EF's new error g_i − Δ_i.
    for res in runs:
        liec = res["liec_down_lossless"]["grads"][0]
        ef = res["ef_hook"]["grads"][0]
        err = res["ef_hook"]["errors0"][0]
        assert torch.equal(liec, ef + err)
        assert not torch.equal(liec, ef)


def test_immediate_compensation_applies_the_mean_local_gradient(runs: list[dict[str, Any]]) -> None:
    # Σ_i (Δ̃ + g_i − Δ_i) = Σ_i g_i when the downlink is lossless: the uplink loses nothing.
    name = "liec_down_lossless"
    for step in range(STEPS):
        applied = sum(res[name]["grads"][step] for res in runs) / WORLD
        local = sum(res[name]["local"][step] for res in runs) / WORLD
        torch.testing.assert_close(applied, local, rtol=1e-5, atol=1e-7)
    # ... while the EF hook delays what it did not send
    step0_ef = sum(res["ef_hook"]["grads"][0] for res in runs) / WORLD
    assert not torch.allclose(step0_ef, sum(res["ef_hook"]["local"][0] for res in runs) / WORLD)


def test_shared_downlink_seed_sends_the_uplink_block_losslessly(runs: list[dict[str, Any]]) -> None:
    # random-block-k down with the uplink's seed and ratio picks the uplink's block, which holds
    # all of v: the same run as an identity downlink, at k values, with a server error of zero
    for res in runs:
        r = res["liec_shared_seed"]
        for step, (a, b) in enumerate(zip(r["params"], res["liec_down_lossless"]["params"], strict=True)):
            assert torch.equal(a, b), f"step {step}"
        assert all(not t.any() for ts in r["server"] for t in ts)
        assert r["down"] == r["sent"] == [_k_bytes(r["sizes"], 0.1, 4)] * STEPS


def test_immediate_lossless_downlink_averaged_every_step_is_sgd(runs: list[dict[str, Any]]) -> None:
    # H = 1: x ← mean_i (x − η(Δ̃ + δ_i)) = x − η·mean_i g_i, whatever the uplink dropped.
    for res in runs:
        for got, ref in zip(res["liec_down_lossless_h1"]["params"], res["plain"]["params"], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert not torch.equal(res["liec_down_lossless_h1"]["grads"][0], res["plain"]["grads"][0])


# ------------------------------------------------------------------------------------------------
# Periodic averaging.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["liec", "liec_topk", "liec_sign", "liec_fp16", "liec_server_sketch", "liec_flat", "liec_keep_server_error"],
)
def test_ranks_agree_after_each_average_and_differ_in_between(runs: list[dict[str, Any]], name: str) -> None:
    a, b = runs[0][name], runs[1][name]
    assert a["averaged"] == [False, False, True] * 2 == b["averaged"]
    for step in range(STEPS):
        same = torch.equal(a["params"][step], b["params"][step])
        assert same == a["averaged"][step], f"{name}: step {step}: identical={same}"
    assert a["stats"]["averages"] == 2
    assert all(bool(torch.isfinite(p).all()) for p in a["params"])


def test_warmup_steps_are_dense_and_do_not_count_towards_averaging(runs: list[dict[str, Any]]) -> None:
    a, b = runs[0]["liec_warmup"], runs[1]["liec_warmup"]
    for step in range(2):
        assert torch.equal(a["params"][step], runs[0]["plain"]["params"][step])
        assert torch.equal(a["params"][step], b["params"][step])
    assert a["averaged"] == [False, False, False, False, True, False]
    assert a["sent"][:2] == a["down"][:2] == [4 * sum(a["sizes"])] * 2


@pytest.mark.parametrize("name", ["liec", "liec_server_sketch", "liec_topk"])
def test_replicated_server_error_is_identical_on_every_rank(runs: list[dict[str, Any]], name: str) -> None:
    s0, s1 = runs[0][name]["server"], runs[1][name]["server"]
    for step in range(STEPS):
        for x, y in zip(s0[step], s1[step], strict=True):
            assert torch.equal(x, y), f"{name}: server errors differ at step {step}"
    assert any(t.any() for t in s0[1])  # the lossy downlink left an error


def test_server_error_is_reset_at_averages_unless_kept(runs: list[dict[str, Any]]) -> None:
    # the error recorded at step 3 grew from zero after the average at step 2 ...
    reset, kept = runs[0]["liec"]["server"], runs[0]["liec_keep_server_error"]["server"]
    for step in range(3):  # identical runs up to the first average
        assert all(torch.equal(x, y) for x, y in zip(reset[step], kept[step], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(reset[3], kept[3], strict=True))
    # ... while the kept one went on from where it was
    assert runs[0]["liec_keep_server_error"]["stats"]["averages"] == 2


def test_delayed_compensation_keeps_ranks_identical(runs: list[dict[str, Any]]) -> None:
    for a, b in zip(runs[0]["delayed_lossy"]["params"], runs[1]["delayed_lossy"]["params"], strict=True):
        assert torch.equal(a, b)
    assert runs[0]["delayed_lossy"]["stats"]["averages"] == 0


@pytest.mark.parametrize("name", _LIEC_SCENARIOS)
def test_global_rng_untouched(runs: list[dict[str, Any]], name: str) -> None:
    assert all(res[name]["global_rng_unchanged"] for res in runs)


def test_forgotten_average_raises_on_every_rank(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        assert res["forgotten_average"]["error"] is not None
        assert "liec_average_" in res["forgotten_average"]["error"]


def test_nonfinite_gradient_on_one_rank_is_skipped_by_all(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        r = res["nonfinite"]
        assert not bool(torch.isfinite(r["grads"][2]).all())
        assert torch.equal(r["params"][1], r["params"][2])
        assert not torch.equal(r["params"][2], r["params"][3])
        for x, y in zip(r["server"][1], r["server"][2], strict=True):  # server error untouched
            assert torch.equal(x, y)
    assert runs[0]["nonfinite"]["stats"]["nonfinite_segments"] > 0
    assert runs[1]["nonfinite"]["stats"]["nonfinite_segments"] == 0


# ------------------------------------------------------------------------------------------------
# Bytes and memory.
# ------------------------------------------------------------------------------------------------


def _k_bytes(sizes: list[int], ratio: float, per_value: int) -> int:
    return sum(k_for_ratio(n, ratio) for n in sizes) * per_value


@pytest.mark.parametrize(
    ("name", "up", "down"),
    [
        ("liec", lambda s: _k_bytes(s, 0.1, 4), lambda s: _k_bytes(s, 0.1, 4)),
        ("liec_topk", lambda s: _k_bytes(s, 0.1, 4), lambda s: _k_bytes(s, 0.05, 8)),
        ("liec_sign", lambda s: _k_bytes(s, 0.1, 4), lambda s: sum(-(-n // 8) + 4 for n in s)),
        ("liec_fp16", lambda s: _k_bytes(s, 0.1, 2), lambda s: _k_bytes(s, 0.1, 2)),
        ("liec_lossless", lambda s: 4 * sum(s), lambda s: 4 * sum(s)),
    ],
)
def test_bytes_both_ways_equal_the_payload_sizes(
    runs: list[dict[str, Any]], name: str, up: Callable[[list[int]], int], down: Callable[[list[int]], int]
) -> None:
    for res in runs:
        r = res[name]
        sizes = r["sizes"]
        assert r["sent"] == [up(sizes)] * STEPS
        assert r["down"] == [down(sizes)] * STEPS
        assert r["down_actual"] == r["down"]  # counted in the hook == payloads the server produced
        st = r["stats"]
        assert st["last_bytes_dense"] == 4 * sum(sizes)
        assert st["bytes_sent_total"] == STEPS * up(sizes)
        assert st["bytes_down_total"] == STEPS * down(sizes)
        assert st["bytes_average_total"] == st["averages"] * 4 * sum(sizes)


def test_flat_mode_sends_k_values_of_the_bucket(runs: list[dict[str, Any]]) -> None:
    r = runs[0]["liec_flat"]
    d = sum(r["sizes"])
    assert r["sent"][-1] == r["down"][-1] == k_for_ratio(d, 0.1) * 4
    assert r["stats"]["segments"] == 1


def test_error_state_bytes(runs: list[dict[str, Any]]) -> None:
    d = sum(runs[0]["liec"]["sizes"])
    dense = runs[0]["liec"]["stats"]
    assert dense["worker_error_state_bytes"] == 0  # immediate compensation keeps no worker error
    assert dense["server_error_state_bytes"] == 4 * d  # the paper's dense server error
    sketch = runs[0]["liec_server_sketch"]["stats"]
    assert sketch["worker_error_state_bytes"] == 0
    assert 0 < sketch["server_error_state_bytes"] <= 0.1 * 4 * d * 1.001 + 4 * sketch["segments"]
    assert runs[0]["liec_lossless"]["stats"]["error_state_bytes"] == 0  # downlink "sgd": no server memory
    delayed = runs[0]["delayed_efsgd"]["stats"]
    assert delayed["worker_error_state_bytes"] == 4 * d


# ------------------------------------------------------------------------------------------------
# Pickling and settings (no process group needed for most).
# ------------------------------------------------------------------------------------------------


def test_pickled_state_continues_exactly(runs: list[dict[str, Any]]) -> None:
    assert not torch.equal(runs[0]["restore"]["checkpoint"], runs[1]["restore"]["checkpoint"])  # mid-period
    for res in runs:
        assert torch.equal(res["restore"]["restored"], res["restore"]["uninterrupted"])
        assert res["restore"]["stats_restored"]["averages"] == res["restore"]["stats"]["averages"] == 3
        assert res["restore"]["stats_restored"]["segments_created"] == res["restore"]["stats"]["segments_created"]


def test_settings_split_between_uplink_and_downlink() -> None:
    s = LIECHookState.from_settings(
        k_ratio=0.05, layerwise=False, seed=3, down_compressor="top-k", down_k_ratio=0.02, down_feedback="conef"
    )
    assert s.uplink == default_uplink(k_ratio=0.05, layerwise=False, seed=3)
    assert s.downlink == default_downlink(compressor="top-k", k_ratio=0.02, feedback="conef", layerwise=False, seed=3)
    assert LIECHookState.from_settings(downlink="sgd").downlink.compressor == "identity"
    assert LIECHookState(None, MethodConfig(feedback="none")).compensation == "immediate"
    assert callable(liec_hook)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"uplink": "efsgd"}, r"uplink feedback='efsgd' .*twice"),
        ({"compressor": "top-k"}, r"uplink compressor='top-k' .*all-reducible"),
        ({"down_compressor": "qsgd"}, r"downlink compressor='qsgd'"),
        ({"downlink": "iconef-v1"}, r"downlink feedback='iconef-v1'"),
        ({"compensation": "later"}, r"compensation='later' .*immediate, delayed"),
        ({"average_every": 0}, r"average_every=0 .*>= 1"),
        ({"average_every": -1, "compensation": "delayed"}, r"average_every=-1 .*>= 0"),
        ({"warmup_steps": 1.5}, r"warmup_steps=1.5"),
        ({"reset_server_error": 1}, r"reset_server_error=1 must be a bool"),
        ({"shared_downlink_seed": "yes"}, r"shared_downlink_seed='yes' must be a bool"),
        ({"downlink": MethodConfig(feedback="efsgd", layerwise=False)}, r"layerwise"),
        ({"k_ratio": 1.5}, r"k_ratio=1.5 .*\(0, 1\]"),
        ({"down_nope": 1}, r"unknown method setting 'nope'"),
        ({"uplink": 3}, r"uplink must be a registry name"),
    ],
)
def test_bad_settings_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LIECHookState.from_settings(**kwargs)


def test_delayed_compensation_accepts_worker_memory() -> None:
    s = LIECHookState.from_settings(compensation="delayed", uplink="conef-cs", average_every=0)
    assert s.uplink.feedback == "conef" and s.average_every == 0
    assert math.isclose(s.uplink.sketch_ratio, 0.1)


def test_register_rejects_non_ddp_model_and_bad_state() -> None:
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_liec_hook(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LIECHookState"):
        liec_average_(nn.Linear(2, 2), object())  # type: ignore[arg-type]
