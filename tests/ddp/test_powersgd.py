"""``conef_fl.ddp.powersgd``: the ConEF hook's PowerSGD path (gloo, 2 processes) against the core's PowerSGD.

Exact parity: a rank-1 PowerSGD of an exactly rank-1 gradient equals plain DDP, as in
PyTorch's ``test_ddp_hook_parity_powerSGD``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from conef_fl.compressors.powersgd import PowerSGD, matrix_view_shape, uses_dense
from conef_fl.ddp import expected_bytes_per_step, register_conef_hook
from conef_fl.ddp.powersgd import expected_nbytes, matrix_shape

from .harness import STEPS, conef_run, make_model, restore, run_world
from .test_conef import CONEF_IDENTITY

_R2 = {"rank": 2}
SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "plain_rank1": lambda r: conef_run(r, None, kind="rank1"),
    "ef_rank1": lambda r: conef_run(r, "ef-powersgd", kind="rank1", rank=1),
    "conef_rank1": lambda r: conef_run(r, "conef-powersgd", kind="rank1", rank=1),
    "none_rank1": lambda r: conef_run(r, "ef-powersgd", kind="rank1", rank=1, feedback="none"),
    "ef": lambda r: conef_run(r, "ef-powersgd", **_R2),
    "conef_identity": lambda r: conef_run(r, CONEF_IDENTITY.replace(compressor="powersgd"), **_R2),
    "conef": lambda r: conef_run(r, "conef-powersgd", **_R2),
    "conef_flat": lambda r: conef_run(r, "conef-powersgd", layerwise=False, **_R2),
    "bf16": lambda r: conef_run(r, "ef-powersgd", value_dtype="bfloat16", **_R2),
    "reset": lambda r: conef_run(r, "conef-powersgd", error_reset_every=2, steps=4, **_R2),
    "nonfinite": lambda r: conef_run(r, "conef-powersgd", poison_step=2, **_R2),
    # both ranks see rank 0's data: the mean of the Δ_i is one rank's Δ, the core's PowerSGD
    "same_data": lambda r: conef_run(0, "ef-powersgd", feedback="none", steps=1, **_R2),
    "restore": lambda r: restore(
        r, lambda d, s: register_conef_hook(d, "conef-powersgd", warmup_steps=1, state=s, **_R2)
    ),
}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    """Every scenario's results, one dict per rank."""
    return run_world(__name__)


@pytest.mark.parametrize("name", ["ef_rank1", "conef_rank1", "none_rank1"])
def test_rank1_on_rank1_gradient_matches_plain(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        for got, ref in zip(res[name]["params"], res["plain_rank1"]["params"], strict=True):
            torch.testing.assert_close(got, ref)
        assert res[name]["stats"]["last_bytes_sent"] == 4 * ((8 + 16) * 1 + 8)


def test_conef_with_identity_store_is_efsgd_step_for_step(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        for step, (a, b) in enumerate(zip(res["conef_identity"]["params"], res["ef"]["params"], strict=True)):
            assert torch.equal(a, b), f"step {step}"


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in ("plain_rank1", "restore")])
def test_all_ranks_hold_identical_parameters(runs: list[dict[str, Any]], name: str) -> None:
    for step, (a, b) in enumerate(zip(runs[0][name]["params"], runs[1][name]["params"], strict=True)):
        assert torch.equal(a, b), f"{name}: ranks differ after step {step + 1}"
        assert bool(torch.isfinite(a).all())
    assert all(res[name]["global_rng_unchanged"] for res in runs)


def test_the_hook_applies_the_cores_powersgd(runs: list[dict[str, Any]]) -> None:
    res = runs[0]["same_data"]
    state = res["state"]
    q = PowerSGD(rank=2)
    off = 0
    for name, param in make_model().named_parameters():
        shape, n = tuple(param.shape), param.numel()
        local, applied = res["local"][0][off : off + n].view(shape), res["grads"][0][off : off + n].view(shape)
        off += n
        expected = local if len(shape) < 2 else q.decompress(q.compress(local, seed=state.step_seed, key=name))
        torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-6)
    assert not torch.equal(res["grads"][0], res["local"][0])  # it did compress


def test_pickled_state_continues_exactly(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        assert torch.equal(res["restore"]["restored"], res["restore"]["uninterrupted"])
        assert res["restore"]["stats_restored"]["segments_created"] == res["restore"]["segments_created_before"]
        assert res["restore"]["stats"]["compressor_state_bytes"] > 0  # the warm-start Qs travelled too


def _psgd_bytes(shapes: list[tuple[int, ...]], rank: int, elem: int) -> int:
    total = 0
    for s in shapes:
        if len(s) < 2 or uses_dense(s, rank):
            total += math.prod(s)
        else:
            n, m = matrix_view_shape(s)
            total += (n + m) * min(rank, n, m)
    return total * elem


@pytest.mark.parametrize(("name", "elem"), [("conef", 4), ("ef", 4), ("bf16", 2)])
def test_bytes_are_n_plus_m_times_r(runs: list[dict[str, Any]], name: str, elem: int) -> None:
    res = runs[0][name]
    expected = _psgd_bytes(res["shapes"], 2, elem)
    assert res["sent"] == [expected] * STEPS
    assert expected_bytes_per_step(res["state"]) == expected


@pytest.mark.parametrize("name", ["conef", "conef_flat"])
def test_conef_error_state_is_a_tenth_of_dense(runs: list[dict[str, Any]], name: str) -> None:
    stats = runs[0][name]["stats"]
    d = sum(runs[0][name]["sizes"])
    assert 0 < stats["error_state_bytes"] <= 0.1 * 4 * d * 1.001 + 4 * stats["segments"]


def test_error_reset_averages_the_sketches(runs: list[dict[str, Any]]) -> None:
    t0, t1 = runs[0]["reset"]["tables"], runs[1]["reset"]["tables"]
    for step in (1, 3):
        assert all(torch.equal(a, b) for a, b in zip(t0[step], t1[step], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(t0[0], t1[0], strict=True))


def test_nonfinite_gradient_on_one_rank_keeps_ranks_in_step(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        params = res["nonfinite"]["params"]
        assert torch.equal(params[1], params[2]) and not torch.equal(params[2], params[3])
    assert runs[0]["nonfinite"]["stats"]["nonfinite_segments"] > 0
    assert runs[1]["nonfinite"]["stats"]["nonfinite_segments"] == 0


@pytest.mark.parametrize(
    ("shape", "layerwise", "expected"),
    [
        ((32, 144), True, (32, 144, 2)),
        ((32,), True, None),
        ((32,), False, (6, 6, 2)),
        ((4, 1, 3, 3), True, (4, 9, 2)),
        ((8, 2), True, None),
    ],
)
def test_matrix_shape_and_bytes_follow_the_core(
    shape: tuple[int, ...], layerwise: bool, expected: tuple[int, int, int] | None
) -> None:
    assert matrix_shape(shape, 2, layerwise) == expected
    q = PowerSGD(rank=2)
    dense = 4 * math.prod(shape)
    assert expected_nbytes(q, shape, layerwise) == (dense if expected is None else q.expected_nbytes(shape))
