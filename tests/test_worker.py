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


# --------------------------------------------------------------------------- the grouped fast path
def _resnet_like_shapes() -> dict[str, tuple[int, ...]]:
    """Small tensors of every kind (unit 1, unit > 1, tails) around two large ones."""
    shapes: dict[str, tuple[int, ...]] = {"conv1": (64, 3, 7, 7), "bn1.w": (64,), "bn1.b": (64,),
                                          "conv2": (64, 64, 3, 3), "down": (256, 128, 1, 1), "odd": (7, 5),
                                          "one": (1,), "fc.w": (1000, 512), "fc.b": (1000,), "t": (3001,)}
    return shapes


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_grouped_step_is_bit_identical_to_per_tensor_steps(value_dtype: str) -> None:
    shapes = _resnet_like_shapes()
    cfg = method_config("conef-cs", compressor="random-block-k", k_ratio=0.1, beta=0.9, value_dtype=value_dtype)
    fast, slow = CompressionWorker(cfg, shapes), CompressionWorker(cfg, shapes)
    assert fast.group is not None and "fc.w" not in fast.group.keys and len(fast.group.keys) == len(shapes) - 1
    slow.group = None
    gen = torch.Generator().manual_seed(11)
    for seed in range(1, 9):  # several block positions: edges, wrap-around, tails
        ups = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        keep = {k: v.clone() for k, v in ups.items()}
        b = slow.step({k: v.clone() for k, v in ups.items()}, seed=seed, consume=True)
        a = fast.step(ups, seed=seed, consume=True)
        assert list(a) == list(shapes)
        for k in shapes:
            assert a[k].meta == b[k].meta and a[k].shape == b[k].shape
            assert torch.equal(a[k].arrays["values"], b[k].arrays["values"]), k
        assert all(torch.equal(x, y) for x, y in zip(fast.persistent_tensors(), slow.persistent_tensors(), strict=True))
        assert all(torch.equal(ups[k], keep[k]) for k in fast.group.keys)  # grouped buffers are not modified
    assert all(fast.feedback[k].steps == slow.feedback[k].steps == 8 for k in shapes)


def test_grouped_step_refuses_bad_updates_before_touching_state() -> None:
    shapes = _resnet_like_shapes()
    cfg = method_config("conef-cs", compressor="random-block-k")
    w, ref = CompressionWorker(cfg, shapes), CompressionWorker(cfg, shapes)
    assert w.group is not None
    ref.group = None
    first = {k: torch.randn(s) for k, s in shapes.items()}
    w.step({k: v.clone() for k, v in first.items()}, seed=0, consume=True)
    ref.step(first, seed=0, consume=True)
    before = [t.clone() for t in w.persistent_tensors()]
    for bad_key, bad in (("fc.w", float("nan")), ("bn1.b", float("inf")), ("one", float("-inf"))):
        ups = {k: torch.randn(s) for k, s in shapes.items()}
        ups[bad_key].view(-1)[-1] = bad
        with pytest.raises(NonFiniteError, match=bad_key):
            w.step(ups, seed=1, consume=True)
    with pytest.raises(ValueError, match="shape"):
        w.step({k: torch.randn(s) if k != "odd" else torch.randn(5, 7) for k, s in shapes.items()}, seed=1,
               consume=True)
    assert all(torch.equal(a, b) for a, b in zip(before, w.persistent_tensors(), strict=True))
    assert all(f.steps == 1 for f in w.feedback.values())
    # an update in another dtype: every tensor takes the per-tensor path, with the same results
    ups = {k: torch.randn(s) for k, s in shapes.items()}
    ups["bn1.w"] = ups["bn1.w"].double()
    a = w.step({k: v.clone() for k, v in ups.items()}, seed=2, consume=True)
    b = ref.step(ups, seed=2, consume=True)
    assert all(torch.equal(a[k].arrays["values"], b[k].arrays["values"]) for k in shapes)
    assert all(torch.equal(x, y) for x, y in zip(w.persistent_tensors(), ref.persistent_tensors(), strict=True))


def test_grouped_only_where_it_applies() -> None:
    shapes = _resnet_like_shapes()
    cases = (("efsgd", {}), ("conef-cs", {"compressor": "random-k"}), ("conef-cs", {"sketch_dtype": "float16"}),
             ("conef-cs", {"compressor": "rbsgd"}), ("conef-cs", {"sketch_rows": 3}))
    for name, extra in cases:
        assert CompressionWorker(method_config(name, **extra), shapes).group is None, (name, extra)
    flat = method_config("conef-cs", compressor="random-block-k", layerwise=False)
    assert CompressionWorker(flat, shapes).group is None
