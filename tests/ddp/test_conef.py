"""``conef_fl.ddp.conef``: the ConEF hook on CPU (gloo, 2 processes), all-reduce and all-gather paths.

PowerSGD's path has its own module (``test_powersgd.py``). Lossless configurations must
equal plain DDP bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from conef_fl.compressors.base import k_for_ratio
from conef_fl.config import MethodConfig
from conef_fl.ddp import ConEFHookState, conef_hook, expected_bytes_per_step, register_conef_hook
from conef_fl.registry import method_config

from .harness import STEPS, conef_run, restore, run_world

#: ConEF whose error store is the identity (dense), fully fed back: EFSGD by another road.
CONEF_IDENTITY = MethodConfig(feedback="conef", error_compressor="identity", beta=0.0)


def _restore(rank: int, method: str, /, *, kind: str = "net", **overrides: Any) -> dict[str, Any]:
    return restore(rank, lambda d, s: register_conef_hook(d, method, warmup_steps=1, state=s, **overrides), kind=kind)


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "plain": lambda r: conef_run(r, None),
    "sgd": lambda r: conef_run(r, "sgd"),
    "efsgd_k1": lambda r: conef_run(r, "efsgd", k_ratio=1.0),
    "randk_k1": lambda r: conef_run(r, "efsgd", compressor="random-k", k_ratio=1.0),
    "none_k1_flat": lambda r: conef_run(r, "rbsgd", k_ratio=1.0, layerwise=False),
    # β pinned: the fused sketch update C(u) − C(Δ) leaves rounding noise, fed back (1 − β)-fold
    "conef_k1": lambda r: conef_run(r, "conef-cs", k_ratio=1.0, beta=0.9),
    "efsgd": lambda r: conef_run(r, "efsgd"),
    "conef_identity": lambda r: conef_run(r, CONEF_IDENTITY),
    "conef": lambda r: conef_run(r, "conef-cs"),
    "conef_flat": lambda r: conef_run(r, "conef-cs", layerwise=False),
    "conef_randk": lambda r: conef_run(r, "conef-cs", compressor="random-k"),
    "conef_fp16": lambda r: conef_run(r, "conef-cs", value_dtype="float16"),
    "conef_bf16_sketch": lambda r: conef_run(r, "conef-cs", sketch_dtype="bfloat16"),
    "conef_rows3": lambda r: conef_run(r, "conef-cs", sketch_rows=3),
    "conef_q": lambda r: conef_run(r, "conef-q"),
    "hefsgd": lambda r: conef_run(r, "hefsgd"),
    "iconef_v1": lambda r: conef_run(r, "iconef-v1"),
    "rbsgd": lambda r: conef_run(r, "rbsgd"),
    "ef_topk": lambda r: conef_run(r, "ef-topk"),
    "conef_topk": lambda r: conef_run(r, "conef-cs", compressor="top-k"),
    "ef_sign": lambda r: conef_run(r, "ef-sign"),
    "sgd_fp16": lambda r: conef_run(r, "sgd", value_dtype="float16"),
    "warmup": lambda r: conef_run(r, "conef-cs", warmup_steps=3),
    "reset": lambda r: conef_run(r, "conef-cs", error_reset_every=2, steps=4),
    "rebuild_flat": lambda r: conef_run(r, "conef-cs", layerwise=False, kind="wide", steps=3),
    "nonfinite_conef": lambda r: conef_run(r, "conef-cs", poison_step=2),
    "nonfinite_topk": lambda r: conef_run(r, "ef-topk", poison_step=2),
    "restore_conef": lambda r: _restore(r, "conef-cs"),
    "restore_conef_flat": lambda r: _restore(r, "conef-cs", layerwise=False, kind="wide"),
}
_METHODS = [n for n in SCENARIOS if not n.startswith(("plain", "restore"))]


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    """Every scenario's results, one dict per rank."""
    return run_world(__name__)


@pytest.mark.parametrize("name", ["sgd", "efsgd_k1", "randk_k1", "none_k1_flat"])
def test_lossless_compression_equals_plain_allreduce_exactly(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        for step, (got, ref) in enumerate(zip(res[name]["params"], res["plain"]["params"], strict=True)):
            assert torch.equal(got, ref), f"{name}: step {step} differs from plain all-reduce"


def test_conef_sketch_with_k_equal_d_matches_plain(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        for got, ref in zip(res["conef_k1"]["params"], res["plain"]["params"], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_conef_with_identity_store_is_efsgd_step_for_step(runs: list[dict[str, Any]]) -> None:
    # the same sums in another order: ConEF's fused selective step forms u − Δ on the selection
    # and then adds it to the store, EFSGD forms (e + u) − Δ (PowerSGD's path is exact: test_powersgd)
    for res in runs:
        for step, (a, b) in enumerate(zip(res["conef_identity"]["params"], res["efsgd"]["params"], strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        assert not torch.equal(res["efsgd"]["params"][-1], res["plain"]["params"][-1])  # it did compress


@pytest.mark.parametrize("name", _METHODS)
def test_all_ranks_hold_identical_parameters(runs: list[dict[str, Any]], name: str) -> None:
    first = runs[0][name]["params"]
    for res in runs[1:]:
        for step, (a, b) in enumerate(zip(first, res[name]["params"], strict=True)):
            assert torch.equal(a, b), f"{name}: ranks differ after step {step + 1}"
    assert all(bool(torch.isfinite(p).all()) for p in first)
    assert all(res[name]["global_rng_unchanged"] for res in runs)


@pytest.mark.parametrize("name", ["restore_conef", "restore_conef_flat"])
def test_pickled_state_continues_exactly(runs: list[dict[str, Any]], name: str) -> None:
    for res in runs:
        assert torch.equal(res[name]["restored"], res[name]["uninterrupted"])
        # the saved error state was reused, not re-created
        assert res[name]["stats_restored"]["segments_created"] == res[name]["segments_created_before"]


def _block_bytes(sizes: list[int], ratio: float, elem: int) -> int:
    return sum(k_for_ratio(n, ratio) for n in sizes) * elem


@pytest.mark.parametrize(("name", "elem"), [("conef", 4), ("conef_fp16", 2), ("conef_randk", 4), ("efsgd", 4)])
def test_bytes_equal_k_values_per_segment(runs: list[dict[str, Any]], name: str, elem: int) -> None:
    res = runs[0][name]
    expected = _block_bytes(res["sizes"], 0.1, elem)
    assert res["sent"] == [expected] * STEPS
    assert res["dense"] == [4 * sum(res["sizes"])] * STEPS
    assert expected_bytes_per_step(res["state"]) == expected
    assert expected <= 0.1 * 4 * sum(res["sizes"]) + elem * len(res["sizes"])


def test_flat_mode_sends_k_values_per_bucket(runs: list[dict[str, Any]]) -> None:
    ((sent, dense),) = runs[0]["conef_flat"]["state"].last_bucket_bytes.values()
    assert sent == k_for_ratio(dense // 4, 0.1) * 4


def test_sgd_fp16_sends_half_the_bytes(runs: list[dict[str, Any]]) -> None:
    res = runs[0]["sgd_fp16"]
    assert res["sent"] == [d // 2 for d in res["dense"]]


def test_gather_compressors_count_their_payload(runs: list[dict[str, Any]]) -> None:
    topk, sign = runs[0]["ef_topk"], runs[0]["ef_sign"]
    expected = sum(k_for_ratio(n, 0.1) * 8 for n in topk["sizes"])
    assert topk["sent"][-1] == expected_bytes_per_step(topk["state"]) == expected
    assert sign["sent"][-1] == sum(-(-n // 8) + 4 for n in sign["sizes"])


def test_warmup_steps_send_dense_and_equal_plain(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        w = res["warmup"]
        assert w["sent"][:3] == w["dense"][:3]
        assert all(s < d for s, d in zip(w["sent"][3:], w["dense"][3:], strict=True))
        for step in range(3):
            assert torch.equal(w["params"][step], res["plain"]["params"][step])
        assert w["stats"]["dense_steps"] == 3 and w["stats"]["compressed_steps"] == STEPS - 3


@pytest.mark.parametrize("name", ["conef", "conef_flat", "rebuild_flat"])
def test_conef_error_state_is_a_tenth_of_dense(runs: list[dict[str, Any]], name: str) -> None:
    res = runs[0][name]
    d = sum(res["sizes"])
    error_bytes = res["stats"]["error_state_bytes"]
    assert 0 < error_bytes <= 0.1 * 4 * d * 1.001 + 4 * res["stats"]["segments"]
    assert runs[0]["efsgd"]["stats"]["error_state_bytes"] == 4 * sum(runs[0]["efsgd"]["sizes"])


def test_error_reset_averages_the_sketches(runs: list[dict[str, Any]]) -> None:
    t0, t1 = runs[0]["reset"]["tables"], runs[1]["reset"]["tables"]
    for step in (1, 3):  # reset after compressed steps 2 and 4
        for a, b in zip(t0[step], t1[step], strict=True):
            assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(t0[0], t1[0], strict=True))  # not shared in between
    table_bytes = sum(t.numel() * t.element_size() for t in t0[-1])
    assert runs[0]["reset"]["stats"]["bytes_reset_total"] == 2 * table_bytes


def test_flat_mode_survives_the_bucket_rebuild(runs: list[dict[str, Any]]) -> None:
    res = runs[0]["rebuild_flat"]
    state = res["state"]
    # iteration 0 used DDP's initial single bucket; the rebuilt layout has two buckets
    assert len(state.last_bucket_bytes) == 2
    assert res["stats"]["segments"] == 2 and res["stats"]["segments_created"] == 3
    sizes = [s.numel for s in state.segments.values()]
    assert sum(sizes) == sum(res["sizes"])
    assert sorted(sizes) == sorted(dense // 4 for _, dense in state.last_bucket_bytes.values())


@pytest.mark.parametrize("name", ["nonfinite_conef", "nonfinite_topk"])
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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, r"warmup_steps=-1 .*>= 0"),
        ({"error_reset_every": 1.5}, r"error_reset_every=1.5 .*>= 0"),
        ({"method": "qsgd"}, r"compressor='qsgd' .*allowed: .*random-block-k.*powersgd.*top-k"),
        ({"method": "atomo"}, r"compressor='atomo'"),
        ({"method": "nope"}, r"unknown method 'nope'"),
        ({"k_ratio": 1.5}, r"k_ratio=1.5 .*\(0, 1\]"),
        ({"method": MethodConfig(feedback="iconef-v1", compressor="powersgd")}, r"feedback='iconef-v1' .*powersgd"),
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


def test_expected_bytes_needs_a_compressed_step() -> None:
    with pytest.raises(ValueError, match="no segments yet"):
        expected_bytes_per_step(ConEFHookState.from_method("conef-cs"))
