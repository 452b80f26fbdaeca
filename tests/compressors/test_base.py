"""The compressor contract every Q keeps (compressors.base and the registry).

Sizes, dtypes, contraction, seeding and aggregation, checked over all compressors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conef_fl.compressors import (
    ATOMO,
    COMPRESSORS,
    QSGD,
    RBSGD,
    Compressor,
    Payload,
    PowerSGD,
    RandomBlockK,
    RandomK,
    ScaledSign,
    TopK,
    make_compressor,
    register_compressor,
)
from conef_fl.measure import measure_transient

from .helpers import DEVICES, NAMES, SELECTIVE_NAMES, array_bytes, make, randn


def test_registry_names() -> None:
    assert set(COMPRESSORS) == set(NAMES)
    for name, cls in COMPRESSORS.items():
        assert cls.name == name
        assert isinstance(make(name), cls)


def test_make_compressor_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="random-block-k"):
        make_compressor("no-such-compressor")


def test_register_compressor_conflict() -> None:
    register_compressor("top-k", TopK)  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        register_compressor("top-k", RandomK)
    with pytest.raises(ValueError):
        register_compressor("thing", int)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("random-block-k", {"ratio": 0}, "ratio"),
        ("random-block-k", {"ratio": 1.5}, "ratio"),
        ("random-k", {"ratio": -0.1}, "ratio"),
        ("top-k", {"ratio": 0.0}, "ratio"),
        ("rbsgd", {"ratio": 2}, "ratio"),
        ("qsgd", {"levels": 0}, "levels"),
        ("qsgd", {"levels": 128}, "levels"),
        ("qsgd", {"norm": "l1"}, "norm"),
        ("powersgd", {"rank": 0}, "rank"),
        ("atomo", {"rank": 0}, "rank"),
        ("top-k", {"value_dtype": "int8"}, "value_dtype"),
        ("identity", {"value_dtype": "float64"}, "value_dtype"),
        ("powersgd", {"value_dtype": "half"}, "value_dtype"),
        ("qsgd", {"generator": 3}, "generator"),
    ],
)
def test_bad_arguments(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_compressor(name, **kwargs)


def test_class_flags() -> None:
    flags = {n: (c.all_reducible, c.unbiased, c.contractive, c.stateful) for n, c in COMPRESSORS.items()}
    assert flags == {
        "identity": (True, True, True, False),
        "random-block-k": (True, False, True, False),
        "random-k": (True, False, True, False),
        "top-k": (False, False, True, False),
        "scaled-sign": (False, False, True, False),
        "powersgd": (False, False, True, True),
        "qsgd": (False, True, False, False),
        "rbsgd": (True, True, False, False),
        "atomo": (False, True, False, False),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("identity", {}),
        ("random-block-k", {"ratio": 1.0}),
        ("random-k", {"ratio": 1.0}),
        ("rbsgd", {"ratio": 1.0}),
        ("top-k", {"ratio": 1.0}),
    ],
)
def test_lossless_round_trip(name: str, kwargs: dict, dtype: torch.dtype) -> None:
    x = randn(5, 3, 4, dtype=dtype)
    q = make(name, **kwargs)
    y = q.decompress(q.compress(x, seed=7, key="w"))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, x.to(torch.float32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(37,), (10, 12), (6, 3, 3, 3), (2000,), (0,), (1, 1)])
def test_nbytes_exact_and_expected(name: str, shape: tuple[int, ...]) -> None:
    q = make(name)
    x = randn(*shape, seed=5)
    p = q.compress(x, seed=2, key="k")
    assert p.nbytes == array_bytes(p)
    assert p.kind == name and p.shape == shape
    assert all(isinstance(v, int | float | str | bool) for v in p.meta.values())
    if name == "atomo":
        assert p.nbytes <= q.expected_nbytes(shape)
    else:
        assert p.nbytes == q.expected_nbytes(shape)
    y = q.decompress(p)
    assert y.shape == shape and y.dtype == torch.float32


def test_wire_dtypes() -> None:
    x = randn(16, 20)
    p = TopK(ratio=0.1).compress(x)
    assert p.arrays["indices"].dtype == torch.int32 and p.arrays["values"].dtype == torch.float32
    assert p.nbytes == 32 * (4 + 4)
    p = TopK(ratio=0.1, value_dtype="float16").compress(x)
    assert p.arrays["values"].dtype == torch.float16 and p.nbytes == 32 * (4 + 2)
    for name in ("identity", "random-block-k", "random-k", "rbsgd"):
        assert make(name, value_dtype="float16").compress(x).arrays["values"].dtype == torch.float16
        assert make(name, value_dtype="bfloat16").compress(x).arrays["values"].dtype == torch.bfloat16
    p = RandomBlockK(ratio=0.1).compress(x)
    assert set(p.arrays) == {"values"} and p.nbytes == 32 * 4  # no indices on the wire
    p = ScaledSign().compress(x)
    assert p.arrays["signs"].dtype == torch.uint8 and p.arrays["signs"].numel() == 320 // 8
    assert p.arrays["scale"].dtype == torch.float32 and p.nbytes == 40 + 4
    p = QSGD(levels=4).compress(x)  # 1 sign bit + 3 level bits (levels 0..4)
    assert p.arrays["codes"].dtype == torch.uint8 and p.nbytes == 320 * 4 // 8 + 4
    p = QSGD(levels=1).compress(x)
    assert p.nbytes == 320 * 2 // 8 + 4
    p = PowerSGD(rank=3, value_dtype="float16").compress(x)
    assert p.arrays["p"].shape == (16, 3) and p.arrays["q"].shape == (20, 3)
    assert p.arrays["p"].dtype == torch.float16 and p.nbytes == (16 + 20) * 3 * 2
    p = ATOMO(rank=2, value_dtype="float16").compress(x)
    assert p.arrays["u"].dtype == torch.float16 and p.arrays["s"].dtype == torch.float32


@pytest.mark.parametrize("name", [n for n in NAMES if COMPRESSORS[n].contractive])
def test_contractive(name: str) -> None:
    q = make(name)
    for seed in range(5):
        x = randn(24, 30, seed=seed)
        y = q.decompress(q.compress(x, seed=seed, key="w"))
        assert float((y - x).pow(2).sum()) < float(x.pow(2).sum())


@pytest.mark.parametrize("name", ["random-block-k", "random-k"])
def test_selective_contraction_factor(name: str) -> None:
    q = make(name, ratio=0.2)
    x = randn(50, seed=9)
    ratios = []
    for seed in range(400):
        y = q.decompress(q.compress(x, seed=seed, key="w"))
        ratios.append(float((y - x).pow(2).sum() / x.pow(2).sum()))
        assert torch.count_nonzero(y) == 10
    assert np.mean(ratios) == pytest.approx(1 - 10 / 50, abs=0.03)


@pytest.mark.parametrize("name", SELECTIVE_NAMES)
def test_aggregate_matches_weighted_average(name: str) -> None:
    q = make(name)
    xs = [randn(9, 7, seed=s) for s in range(3)]
    weights = [1.0, 2.0, 5.0]
    payloads = [q.compress(x, seed=42, key="layer") for x in xs]
    agg = q.aggregate(payloads, weights)
    assert agg.nbytes == payloads[0].nbytes
    ref = sum(w * q.decompress(p) for w, p in zip(weights, payloads, strict=True)) / sum(weights)
    torch.testing.assert_close(q.decompress(agg), ref)


@pytest.mark.parametrize("name", ["random-block-k", "random-k", "rbsgd"])
def test_aggregate_rejects_mismatch(name: str) -> None:
    q = make(name)
    x = randn(9, 7)
    a = q.compress(x, seed=1, key="layer")
    with pytest.raises(ValueError, match="seed"):
        q.aggregate([a, q.compress(x, seed=2, key="layer")], [1, 1])
    with pytest.raises(ValueError):
        q.aggregate([a, q.compress(randn(9, 8), seed=1, key="layer")], [1, 1])
    with pytest.raises(ValueError):
        q.aggregate([a], [1, 1])
    with pytest.raises(ValueError):
        q.aggregate([a], [-1])


def test_aggregate_not_all_reducible() -> None:
    q = TopK(ratio=0.5)
    p = q.compress(randn(10))
    with pytest.raises(NotImplementedError):
        q.aggregate([p, p], [1, 1])


@pytest.mark.parametrize("cls", [RandomBlockK, RandomK, RBSGD])
def test_selection_reproducible_and_key_dependent(cls: type) -> None:
    x = randn(1000, seed=1)
    a, b = cls(ratio=0.05), cls(ratio=0.05)

    def support(q: Compressor, seed: int, key: str) -> torch.Tensor:
        return torch.nonzero(q.decompress(q.compress(x, seed=seed, key=key))).squeeze(1)

    assert torch.equal(support(a, 3, "w"), support(b, 3, "w"))
    assert not torch.equal(support(a, 3, "w"), support(a, 3, "v"))
    assert not torch.equal(support(a, 3, "w"), support(a, 4, "w"))
    tseed = a.tensor_seed(3, "w")
    sel = a.select(1000, tseed)
    assert torch.equal(sel.index_tensor().sort().values, support(b, 3, "w"))


@pytest.mark.parametrize("name", NAMES)
def test_no_global_rng_and_input_untouched(name: str) -> None:
    q = make(name)
    x = randn(12, 10, seed=4)
    x0 = x.clone()
    state = torch.get_rng_state()
    p = q.compress(x, seed=5, key="a")
    q.decompress(p)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("cls", [QSGD, ATOMO])
def test_private_generator_reproducible(cls: type) -> None:
    x = randn(12, 10, seed=4)
    torch.manual_seed(1)
    a = cls(seed=17).compress(x)
    torch.manual_seed(2)
    b = cls(seed=17).compress(x)
    c = cls(seed=18).compress(x)

    def same(p1: Payload, p2: Payload) -> bool:
        return all(
            p1.arrays[k].shape == p2.arrays[k].shape and torch.equal(p1.arrays[k], p2.arrays[k]) for k in p1.arrays
        )

    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_decompress_add_matches_decompress(name: str) -> None:
    q = make(name)
    x = randn(6, 4, 5, seed=3)
    p = q.compress(x, seed=1, key="c")
    base = randn(6, 4, 5, seed=99)
    target = base.clone()
    out = q.decompress_add_(p, target.view(-1), alpha=-0.5)
    assert out.data_ptr() == target.data_ptr()
    torch.testing.assert_close(target, base - 0.5 * q.decompress(p))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31),
    key=st.text(max_size=5),
)
def test_any_shape_and_dtype(name: str, shape: tuple, dtype: torch.dtype, seed: int, key: str) -> None:
    q = make(name)
    x = randn(*shape, seed=seed % 1000, dtype=dtype)
    x0 = x.clone()
    p = q.compress(x, seed=seed, key=key)
    assert torch.equal(x, x0)
    y = q.decompress(p)
    assert y.shape == x.shape and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    assert p.nbytes == array_bytes(p)
    assert p.nbytes <= q.expected_nbytes(shape) if name == "atomo" else p.nbytes == q.expected_nbytes(shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_device_placement(name: str, device: str) -> None:
    q = make(name)
    x = randn(8, 9, seed=1).to(device)
    p = q.compress(x, seed=1, key="d")
    assert all(a.device.type == device for a in p.arrays.values())
    y = q.decompress(p)
    assert y.device.type == device
    cpu = make(name).decompress(p.to("cpu"))  # the receiver may sit on another device
    torch.testing.assert_close(cpu, y.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,kwargs", [("top-k", {"ratio": 0.01}), ("scaled-sign", {}), ("random-k", {"ratio": 0.01})]
)
def test_large_compress_and_decompress_add_allocate_little(name: str, kwargs: dict) -> None:
    """Beyond its payload a compressor allocates at most 2 % of the vector's 4·d bytes (measured)."""
    d = 4_000_000
    q = make_compressor(name, **kwargs)
    x, target = torch.randn(d, generator=torch.Generator().manual_seed(1)), torch.zeros(d)
    q.compress(x, seed=1, key="w")
    payload, m = measure_transient(lambda: q.compress(x, seed=2, key="w"))
    assert m.peak_bytes - payload.nbytes <= 0.02 * 4 * d, (name, m)
    _, m = measure_transient(lambda: q.decompress_add_(payload, target, alpha=-1.0))
    assert m.peak_bytes <= 0.02 * 4 * d, (name, m)


@pytest.mark.parametrize("name", SELECTIVE_NAMES)
def test_sum_into_is_a_running_weighted_sum_added_in_place(name: str) -> None:
    q = make(name)
    xs = [randn(9, 7, seed=s) for s in range(4)]
    weights = [1.0, 2.0, 5.0, 0.5]
    acc = None
    for w, x in zip(weights, xs, strict=True):
        p = q.compress(x, seed=42, key="layer")
        out = q.sum_into_(acc, p, w)
        assert acc is None or out is acc
        acc = out
    assert acc is not None and acc.nbytes <= 4 * 9 * 7
    ref = sum(w * q.decompress(q.compress(x, seed=42, key="layer")) for w, x in zip(weights, xs, strict=True))
    torch.testing.assert_close(q.decompress(acc), ref)
    if name != "identity":  # identity's payload does not depend on the seed
        with pytest.raises(ValueError, match="seed"):
            q.sum_into_(acc, q.compress(xs[0], seed=43, key="layer"), 1.0)
    with pytest.raises(ValueError, match="shape"):
        q.sum_into_(acc, q.compress(randn(9, 8), seed=42, key="layer"), 1.0)


def test_sum_into_needs_an_all_reducible_compressor() -> None:
    q = TopK(ratio=0.5)
    with pytest.raises(NotImplementedError):
        q.sum_into_(None, q.compress(randn(10)), 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_norm_sq_is_the_squared_norm_of_the_decompressed_payload(name: str) -> None:
    q = make(name)
    p = q.compress(randn(33, 21, seed=3), seed=5, key="w")
    ref = float(torch.linalg.vector_norm(q.decompress(p).double())) ** 2
    assert q.norm_sq(p) == pytest.approx(ref, rel=1e-9)
