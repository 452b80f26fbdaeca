"""Tests of the gradient compressors ``Q``, their registry and the bit packer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conef_fl.bitpack import CHUNK, pack_bits, packed_nbytes, unpack_bits
from conef_fl.compressors import (
    ATOMO,
    COMPRESSORS,
    QSGD,
    RBSGD,
    Compressor,
    Identity,
    Payload,
    PowerSGD,
    RandomBlockK,
    RandomK,
    ScaledSign,
    TopK,
    make_compressor,
    register_compressor,
)
from conef_fl.compressors.atomo import atomo_probabilities
from conef_fl.compressors.powersgd import matrix_view_shape
from conef_fl.compressors.random_k import sample_without_replacement
from conef_fl.compressors.topk import FAST_MIN_NUMEL, topk_indices, topk_select
from conef_fl.measure import measure_transient

NAMES = [
    "identity",
    "random-block-k",
    "random-k",
    "top-k",
    "scaled-sign",
    "powersgd",
    "qsgd",
    "rbsgd",
    "atomo",
]
RATIO_NAMES = {"random-block-k", "random-k", "top-k", "rbsgd"}
SELECTIVE_NAMES = ["identity", "random-block-k", "random-k", "rbsgd"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(name: str, **kwargs: object) -> Compressor:
    """A compressor with small-test defaults (ratio 0.25, rank 2, levels 4)."""
    defaults: dict[str, object] = {}
    if name in RATIO_NAMES:
        defaults["ratio"] = 0.25
    if name in ("powersgd", "atomo"):
        defaults["rank"] = 2
    if name == "qsgd":
        defaults["levels"] = 4
    if name in ("qsgd", "atomo"):
        defaults["generator"] = torch.Generator().manual_seed(1234)
    defaults.update(kwargs)
    return make_compressor(name, **defaults)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def array_bytes(p: Payload) -> int:
    return sum(a.numel() * a.element_size() for a in p.arrays.values())


# ----------------------------------------------------------------------------------------------
# bitpack
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 1001, CHUNK + 5])
def test_bitpack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out.to(torch.int64), values)


def test_bitpack_layout_matches_numpy_and_is_dense() -> None:
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.uint8)
    ref = np.packbits(bits.numpy(), bitorder="little")
    assert np.array_equal(pack_bits(bits, 1).numpy(), ref)
    # eight 6-bit values of all ones fill exactly six bytes of 0xFF
    assert pack_bits(torch.full((8,), 63, dtype=torch.int32), 6).tolist() == [255] * 6
    assert pack_bits(torch.tensor([True, False, True]), 1).tolist() == [0b101]


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bitpack_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_bitpack_bad_values_and_short_buffer() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="values"):
        pack_bits(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)  # needs 3 bytes


# ----------------------------------------------------------------------------------------------
# registry and argument validation
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# exact round trips
# ----------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("shape", [(12, 9), (8, 3, 2, 5)])
def test_powersgd_exact_on_rank_r(shape: tuple[int, ...]) -> None:
    n, m = matrix_view_shape(shape)
    low = randn(n, 2, seed=1) @ randn(2, m, seed=2)
    x = low.reshape(shape)
    q = PowerSGD(rank=2)
    y = q.decompress(q.compress(x, seed=3, key="w"))
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    # rank 1 on a rank-2 matrix is lossy: the test above could fail
    q1 = PowerSGD(rank=1)
    assert (q1.decompress(q1.compress(x, key="w")) - x).norm() > 1e-2 * x.norm()


def test_atomo_exact_with_full_budget() -> None:
    x = randn(20, 3, seed=4) @ randn(3, 15, seed=5)  # rank 3: every atom has p_i = 1
    q = ATOMO(rank=3, generator=torch.Generator().manual_seed(0))
    p = q.compress(x)
    assert p.arrays["s"].numel() == 3 and p.meta["dense"] is False
    torch.testing.assert_close(q.decompress(p), x, rtol=1e-4, atol=1e-4)
    small = randn(7, 6, seed=4)  # budget >= min(n, m): sent dense, exact
    q = ATOMO(rank=6)
    assert torch.equal(q.decompress(q.compress(small)), small)


def test_atomo_probabilities() -> None:
    sigma = torch.tensor([100.0, 3.0, 2.0, 1.0, 0.0])
    p = atomo_probabilities(sigma, 2)
    assert p[0] == 1.0 and p[4] == 0.0
    assert float(p.sum()) == pytest.approx(2.0)
    assert bool((p <= 1).all())
    torch.testing.assert_close(p[1:4] / p[1], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 3)
    assert atomo_probabilities(sigma, 10).tolist() == [1, 1, 1, 1, 0]


# ----------------------------------------------------------------------------------------------
# wire format and sizes
# ----------------------------------------------------------------------------------------------


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


def test_powersgd_views_and_dense_fallback() -> None:
    q = PowerSGD(rank=2)
    big = q.compress(randn(10_000))  # 1-D: 100 x 100 near-square view
    assert big.meta["dense"] is False and big.arrays["p"].shape == (100, 2)
    assert big.nbytes < big.dense_nbytes
    odd = q.compress(randn(1001))  # padded view 32 x 32
    assert odd.arrays["p"].shape == (32, 2) and q.decompress(odd).shape == (1001,)
    tiny = q.compress(randn(8))
    assert tiny.meta["dense"] is True and torch.equal(q.decompress(tiny), randn(8))
    assert q.compress(randn(1, 50)).meta["dense"] is True


# ----------------------------------------------------------------------------------------------
# properties of Q
# ----------------------------------------------------------------------------------------------


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


def test_topk_and_sign_errors() -> None:
    x = randn(40, 25, seed=3)
    q = TopK(ratio=0.1)
    y = q.decompress(q.compress(x))
    ref = torch.topk(x.abs().flatten(), 100).indices
    assert torch.equal(torch.nonzero(y.flatten()).squeeze(1), ref.sort().values)
    assert float((y - x).pow(2).sum()) <= (1 - 0.1) * float(x.pow(2).sum())
    s = ScaledSign()
    y = s.decompress(s.compress(x))
    torch.testing.assert_close(y, x.abs().mean() * torch.where(x >= 0, 1.0, -1.0))
    expected = x.pow(2).sum() - x.abs().sum() ** 2 / x.numel()
    torch.testing.assert_close((y - x).pow(2).sum(), expected, rtol=1e-4, atol=1e-4)


def test_topk_fast_path_is_exact() -> None:
    d = FAST_MIN_NUMEL + 77
    x = randn(d, seed=11)
    for k in (1, 300, 5000):
        assert torch.equal(topk_indices(x.abs(), k), torch.topk(x.abs(), k).indices.sort().values)
    # a sample that misses every large entry: the fallback keeps the result exact
    spiky = torch.zeros(d)
    spiky[1::1031] = torch.arange(1, len(range(1, d, 1031)) + 1, dtype=torch.float32)
    k = 100
    assert torch.equal(topk_indices(spiky, k), torch.topk(spiky, k).indices.sort().values)


def _z_scores(samples: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|mean - x| / standard error, per coordinate (0 where the samples do not vary)."""
    mean, std = samples.mean(0), samples.std(0)
    err = (mean - x).abs()
    se = std / math.sqrt(samples.shape[0])
    return torch.where(se > 0, err / se.clamp_min(1e-12), err * 1e6)


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_qsgd_unbiased(norm: str) -> None:
    x = randn(6, 5, seed=2)
    q = QSGD(levels=2, norm=norm, generator=torch.Generator().manual_seed(5))
    samples = torch.stack([q.decompress(q.compress(x)) for _ in range(2000)])
    assert float(_z_scores(samples, x).max()) < 5.5
    levels = samples * 2 / (x.norm() if norm == "l2" else x.abs().max())
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # on the grid


def test_rbsgd_unbiased_over_shared_seeds() -> None:
    x = randn(40, seed=6)
    q = RBSGD(ratio=0.25)
    samples = torch.stack([q.decompress(q.compress(x, seed=s, key="b")) for s in range(2000)])
    assert float(_z_scores(samples, x).max()) < 5.5
    torch.testing.assert_close(samples.mean(0), x, rtol=0, atol=0.25)


def test_atomo_unbiased() -> None:
    x = randn(6, 5, seed=8)
    q = ATOMO(rank=2, generator=torch.Generator().manual_seed(9))
    counts, samples = [], []
    for _ in range(2000):
        p = q.compress(x)
        counts.append(p.arrays["s"].numel())
        samples.append(q.decompress(p))
    assert float(_z_scores(torch.stack(samples), x).max()) < 5.5
    assert np.mean(counts) == pytest.approx(2.0, abs=0.15)


# ----------------------------------------------------------------------------------------------
# all-reduce (aggregation in compressed space)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# shared seeds, private generators, no global RNG
# ----------------------------------------------------------------------------------------------


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


def test_block_wraps_around() -> None:
    q = RandomBlockK(ratio=0.5)
    starts = {q.select(11, s).start for s in range(60)}
    assert len(starts) > 5
    sel = q.select(11, next(s for s in range(60) if q.select(11, s).start > 6))
    idx = sel.index_tensor()
    assert idx.numel() == 6 and len(set(idx.tolist())) == 6 and 0 in idx.tolist()


@pytest.mark.parametrize(("d", "ratio"), [(10, 0.3), (1000, 0.01), (1000, 0.5), (1000, 0.7), (997, 0.99)])
def test_random_k_indices_distinct_sorted(d: int, ratio: float) -> None:
    q = RandomK(ratio=ratio)
    for seed in range(5):
        idx = q.select(d, seed).indices
        assert idx is not None and idx.numel() == round(ratio * d)
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < d


def test_random_k_roughly_uniform() -> None:
    counts = torch.zeros(20)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[sample_without_replacement(20, 5, g)] += 1
    freq = counts / 2000
    assert float((freq - 0.25).abs().max()) < 0.05  # about 5 standard errors


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
            p1.arrays[k].shape == p2.arrays[k].shape and torch.equal(p1.arrays[k], p2.arrays[k])
            for k in p1.arrays
        )

    assert same(a, b)
    assert not same(a, c)


# ----------------------------------------------------------------------------------------------
# decompress_add_, PowerSGD state, shapes/dtypes/devices
# ----------------------------------------------------------------------------------------------


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


def test_powersgd_warm_start_state() -> None:
    u, _ = torch.linalg.qr(randn(30, 30, seed=1))
    v, _ = torch.linalg.qr(randn(20, 20, seed=2))
    spectrum = torch.tensor([10.0, 5.0, 2.0] + [0.05] * 17)
    x = (u[:, :20] * spectrum) @ v.t()
    q = PowerSGD(rank=3)
    errors = [float((q.decompress(q.compress(x, key="w")) - x).norm()) for _ in range(6)]
    assert errors[-1] < 0.9 * errors[0]  # warm start converges towards the best rank-3 fit
    assert set(q.state_dict()) == {"w"} and q.state_dict()["w"].shape == (20, 3)
    fresh = PowerSGD(rank=3)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.compress(x, key="w").arrays["p"], q.compress(x, key="w").arrays["p"])
    with pytest.raises(ValueError):
        fresh.load_state_dict({"w": torch.zeros(20, 4)})
    with pytest.raises(ValueError):
        fresh.load_state_dict({"w": torch.zeros(20)})
    with pytest.raises(ValueError):
        ScaledSign().load_state_dict({"w": torch.zeros(2)})


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


def test_identity_payload_does_not_alias_input() -> None:
    x = randn(10)
    p = Identity().compress(x)
    x.add_(1.0)
    assert not torch.equal(p.arrays["values"], x)


# ----------------------------------------------------------------------------------------------
# large-tensor paths: exact results with bounded memory (issue #13)
# ----------------------------------------------------------------------------------------------


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of k largest |x|, ties towards lower indices (a stable sort)."""
    order = torch.sort(x.abs().double(), descending=True, stable=True).indices[:k]
    return order.sort().values


@pytest.mark.parametrize(
    "case",
    ["gaussian", "ties", "all-equal", "spiky", "negative", "fp16-wire", "heavy-tail"],
)
def test_topk_streaming_selection_is_exact(case: str) -> None:
    d = FAST_MIN_NUMEL * 2 + 13
    g = torch.Generator().manual_seed(5)
    x = torch.randn(d, generator=g)
    k, dtype = 2_000, torch.float32
    if case == "ties":  # the k-th largest value repeats many times
        x = torch.randint(0, 50, (d,), generator=g).float()
    elif case == "all-equal":  # the sample says nothing: the radix select streams over the input
        x = torch.full((d,), -2.5)
    elif case == "spiky":  # a strided sample misses every large entry
        x = torch.zeros(d)
        x[1::1031] = torch.arange(1, len(range(1, d, 1031)) + 1, dtype=torch.float32)
        k = 100
    elif case == "negative":
        x = -x.abs()
    elif case == "fp16-wire":
        dtype = torch.float16
    elif case == "heavy-tail":
        x = torch.randn(d, generator=g) ** 5
    idx, vals = topk_select(x, k, dtype)
    ref = _reference_topk(x, k)
    assert idx.dtype == torch.int32 and vals.dtype == dtype
    assert torch.equal(idx.long(), ref), case
    assert torch.equal(vals, x[ref].to(dtype))
    assert idx.untyped_storage().nbytes() == 4 * k  # the payload's storage is exactly its bytes


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


@pytest.mark.parametrize("d,k", [(1_000_003, 20_000), (50_000, 20_000), (9_000, 4_097)])
def test_random_k_blocked_sampler(d: int, k: int) -> None:
    g = torch.Generator().manual_seed(2)
    a = sample_without_replacement(d, k, g)
    assert a.numel() == k and bool((a[1:] > a[:-1]).all()) and int(a[0]) >= 0 and int(a[-1]) < d
    assert a.dtype == torch.int32  # large k: half the bytes of int64
    b = sample_without_replacement(d, k, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_random_k_blocked_sampler_is_uniform() -> None:
    """Every coordinate is picked with probability k/d, across block boundaries too."""
    d, k, n = 10_000, 4_500, 400
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(d)
    sizes = []
    for _ in range(n):
        idx = sample_without_replacement(d, k, g).long()
        counts[idx] += 1
        sizes.append(idx.numel())
    assert set(sizes) == {k}
    freq = counts / n
    se = math.sqrt(k / d * (1 - k / d) / n)
    assert abs(float(freq.mean()) - k / d) < 1e-6
    assert float(freq.std()) < 1.15 * se  # no excess spread: no coordinate is favoured
    block_means = freq.view(10, -1).mean(1)  # 10 equal ranges
    assert float((block_means - k / d).abs().max()) < 5 * se / math.sqrt(d / 10)
