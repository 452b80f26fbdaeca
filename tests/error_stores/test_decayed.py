"""The decayed dense error (stale-error control): its factor, its update, and that it ages like the sketch."""

from __future__ import annotations

import statistics

import pytest
import torch

from conef_fl.error_stores.decayed import DecayedError, sketch_aging_factor
from conef_fl.feedback import make_error_store, make_feedback
from conef_fl.registry import method_config


def test_factor_values() -> None:
    assert sketch_aging_factor(0.5, 0.1, 0.1) == pytest.approx(0.55)
    assert sketch_aging_factor(0.5, 0.1, 0.4) == pytest.approx(0.925)
    assert sketch_aging_factor(0.9, 0.1, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("beta,k,w", [(1.0, 0.1, 0.1), (0.5, 0.0, 0.1), (0.5, 0.1, 1.5), (0.0, 1.0, 0.01)])
def test_factor_rejects_out_of_range(beta: float, k: float, w: float) -> None:
    with pytest.raises(ValueError, match="out of range|allowed"):
        sketch_aging_factor(beta, k, w)


def test_accumulate_ages_then_adds() -> None:
    store = DecayedError(4, factor=0.5)
    store.accumulate_(torch.tensor([2.0, 4.0, -2.0, 0.0]))
    store.accumulate_(torch.ones(4), alpha=2.0)
    assert torch.equal(store.decompress(), torch.tensor([3.0, 4.0, 1.0, 2.0]))
    store.accumulate_block_(torch.tensor([1.0]), 0)  # partial accumulations do not age
    assert store.decompress()[0].item() == 4.0


def test_state_round_trip_checks_factor() -> None:
    a = DecayedError(3, factor=0.5)
    a.accumulate_(torch.tensor([1.0, 2.0, 3.0]))
    b = DecayedError(3, factor=0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.decompress(), a.decompress())
    with pytest.raises(ValueError, match="factor"):
        DecayedError(3, factor=0.9).load_state_dict(a.state_dict())


def test_factory_uses_sketch_settings_and_refuses_dense_q() -> None:
    cfg = method_config("decayed-efsgd", compressor="random-block-k", k_ratio=0.1, sketch_ratio=0.1, beta=0.5)
    store = make_error_store(cfg, 100)
    assert isinstance(store, DecayedError) and store.factor == pytest.approx(0.55)
    with pytest.raises(ValueError, match="scaled-sign"):
        make_error_store(cfg.replace(compressor="scaled-sign"), 100)


def _mean_retention(method: str, sketch_ratio: float, d: int = 20_000, trials: int = 20) -> float:
    """Mean per-step retention <S_t+1, S_0> / <S_t, S_0> of the stored state after one update, zero updates after."""
    cfg = method_config(method, compressor="random-block-k", k_ratio=0.1, sketch_ratio=sketch_ratio, beta=0.5)
    ratios = []
    for trial in range(trials):
        fb = make_feedback(cfg, (d,), key=f"w{trial}")
        fb.step(torch.randn(d, generator=torch.Generator().manual_seed(trial)), seed=1000 * trial)
        state = fb.stores()["e"].persistent_tensors()[0]
        s0 = state.float().reshape(-1).clone()
        prev = s0 @ s0
        for t in range(1, 4):
            fb.step(torch.zeros(d), seed=1000 * trial + t)
            cur = state.float().reshape(-1) @ s0
            ratios.append(float(cur / prev))
            prev = cur
    return statistics.fmean(ratios)


@pytest.mark.parametrize("sketch_ratio", [0.1, 0.4])
def test_control_ages_like_the_sketch(sketch_ratio: float) -> None:
    """Expected retention 1 − (1−β)k/w: 0.5 (w = 0.1 d) and 0.875 (w = 0.4 d), for the sketch and the control."""
    expected = 1 - 0.5 * 0.1 / sketch_ratio
    sketch = _mean_retention("conef-cs", sketch_ratio)
    control = _mean_retention("decayed-efsgd", sketch_ratio)
    dense = _mean_retention("partial-efsgd", sketch_ratio)
    assert sketch == pytest.approx(expected, abs=0.05)
    assert control == pytest.approx(expected, abs=0.05)
    assert dense == pytest.approx(0.95, abs=0.02)  # no ageing: only sent coordinates lose (1−β)
