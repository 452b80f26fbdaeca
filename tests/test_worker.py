"""conef_fl.worker: the compression worker's state and its refusals."""

from __future__ import annotations

import pytest
import torch

from conef_fl.error_stores.base import NonFiniteError
from conef_fl.registry import method_config
from conef_fl.worker import CompressionWorker


# --------------------------------------------------------------------------- persistence, config
def test_worker_state_round_trip_and_layerwise_vs_flat() -> None:
    shapes = {"a": (10, 20), "b": (20,), "c": (3, 4, 5)}
    cfg = method_config("conef-cs")
    w1, w2 = CompressionWorker(cfg, shapes), CompressionWorker(cfg, shapes)
    ups = [{k: torch.randn(s) for k, s in shapes.items()} for _ in range(4)]
    for t, u in enumerate(ups[:2]):
        w1.step(u, seed=t)
    state = w1.state_dict()
    w2.load_state_dict(state)
    for t, u in enumerate(ups[2:], start=2):
        a, b = w1.step(u, seed=t), w2.step(u, seed=t)
        for k in shapes:
            assert torch.equal(a[k].arrays["values"], b[k].arrays["values"])
    flat = CompressionWorker(cfg.replace(layerwise=False), shapes)
    out = flat.step(ups[0], seed=0)
    assert list(out) == ["__flat__"] and out["__flat__"].numel == 200 + 20 + 60
    other = CompressionWorker(cfg.replace(beta=0.25), shapes)
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(state)


def test_worker_rejects_bad_updates_before_touching_state() -> None:
    shapes = {"a": (10, 20), "b": (20,)}
    w = CompressionWorker(method_config("conef-cs"), shapes)
    w.step({k: torch.randn(s) for k, s in shapes.items()}, seed=0)
    before = [t.clone() for t in w.persistent_tensors()]
    bad_b = torch.randn(20)
    bad_b[0] = float("nan")
    with pytest.raises(NonFiniteError, match="'b'"):
        w.step({"a": torch.randn(10, 20), "b": bad_b}, seed=1)
    with pytest.raises(ValueError, match="missing"):
        w.step({"a": torch.randn(10, 20)}, seed=1)
    with pytest.raises(ValueError, match="shape"):
        w.step({"a": torch.randn(10, 21), "b": torch.randn(20)}, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(before, w.persistent_tensors(), strict=True))
