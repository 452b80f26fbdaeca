"""Count sketch: linearity, unbiasedness, reproducibility, exact recovery, dtypes, persistence."""

from __future__ import annotations

import pytest
import torch

from conef_fl.error_stores.sketch import CountSketch, SketchGeometry, unit_hashes
from conef_fl.measure import measure_transient


def _sketch(numel: int, ratio: float = 0.1, rows: int = 1, seed: int = 0, dtype: str = "float32", unit=None):
    return CountSketch(SketchGeometry.for_ratio(numel, ratio, rows, unit=unit), seed=seed, dtype=dtype)


@pytest.mark.parametrize("numel,rows,unit", [(10_000, 1, None), (10_007, 3, None), (123_457, 1, 64), (50_000, 1, 7)])
def test_linearity(numel: int, rows: int, unit) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
    a, b, c = (_sketch(numel, rows=rows, unit=unit) for _ in range(3))
    a.accumulate_(x)
    b.accumulate_(y)
    c.accumulate_(x + 2 * y)
    a.add_sketch_(b, alpha=2.0)
    torch.testing.assert_close(a.table, c.table, rtol=1e-5, atol=1e-4)


def test_sparse_and_index_kernels_agree() -> None:
    """fp32 (sparse-CSR kernels) and fp64 tables vs a per-coordinate reference built from unit_hashes."""
    numel, gm = 5_003, SketchGeometry(numel=5_003, rows=1, buckets=37, unit=16)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(2))
    sk = CountSketch(gm, seed=5)
    sk.accumulate_(x)
    h, s = unit_hashes(5, 0, gm)
    ref = torch.zeros(gm.buckets, gm.unit, dtype=torch.float64)
    for i in range(gm.num_units):
        seg = x[i * 16 : (i + 1) * 16].double()
        ref[int(h[i]), : seg.numel()] += float(s[i]) * seg
    torch.testing.assert_close(sk.table[0].double(), ref, rtol=1e-5, atol=1e-5)
    est = sk.decompress()
    ref_est = torch.stack([float(s[i]) * ref[int(h[i])] for i in range(gm.num_units)]).reshape(-1)[:numel]
    torch.testing.assert_close(est.double(), ref_est, rtol=1e-5, atol=1e-5)


def test_estimate_views_agree() -> None:
    numel = 20_011
    sk = _sketch(numel, rows=3)
    sk.accumulate_(torch.randn(numel))
    full = sk.decompress()
    torch.testing.assert_close(sk.estimate_at(torch.arange(numel)), full)
    torch.testing.assert_close(sk.estimate_block(1234, 5000), full[1234:6234])
    t = torch.zeros(300)
    sk.estimate_block_add_(t, numel - 300, alpha=2.0)
    torch.testing.assert_close(t, 2 * full[-300:])


@pytest.mark.parametrize("start,length", [(0, 5000), (1234, 7777), (19_000, 1011), (5, 3)])
def test_block_estimate_matches_full_estimate_one_row(start: int, length: int) -> None:
    numel = 20_011
    sk = _sketch(numel, unit=16)
    sk.estimate_scale = 0.5
    sk.accumulate_(torch.randn(numel))
    full = sk.decompress()
    t = torch.ones(length)
    sk.estimate_block_add_(t, start, alpha=-3.0)
    torch.testing.assert_close(t, 1 - 3 * full[start : start + length])


def test_exact_round_trip_without_collisions() -> None:
    numel = 1000
    sk = CountSketch(SketchGeometry(numel=numel, rows=1, buckets=numel, unit=1), seed=3)
    h, _ = unit_hashes(3, 0, sk.geometry)
    # coordinates alone in their bucket are recovered exactly
    lone = torch.bincount(h, minlength=numel)[h] == 1
    x = torch.randn(numel)
    sk.accumulate_(x)
    est = sk.decompress()
    assert lone.sum() > 300
    torch.testing.assert_close(est[lone], x[lone])
    # and a vector supported on one coordinate per bucket is recovered exactly everywhere it lives
    first = torch.zeros(numel, dtype=torch.bool)
    seen: set[int] = set()
    for i, b in enumerate(h.tolist()):
        if b not in seen:
            seen.add(b)
            first[i] = True
    y = torch.where(first, torch.randn(numel), torch.zeros(numel))
    sk.zero_().accumulate_(y)
    torch.testing.assert_close(sk.decompress()[first], y[first])


def test_unbiased_over_seeds() -> None:
    numel = 2000
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(numel)
    n = 400
    for seed in range(n):
        sk = _sketch(numel, ratio=0.2, seed=seed)
        sk.accumulate_(x)
        acc += sk.decompress()
    mean = acc / n
    # single-sketch relative error is ~ sqrt(d/w) ≈ 2.2; averaging n seeds divides it by sqrt(n) = 20
    rel = (mean - x).norm() / x.norm()
    assert rel < 0.2, rel
    single = _sketch(numel, ratio=0.2, seed=0)
    single.accumulate_(x)
    assert (single.decompress() - x).norm() / x.norm() > 1.0


def test_reproducible_and_seed_dependent() -> None:
    x = torch.randn(30_000)
    a, b, c = _sketch(30_000, seed=7), _sketch(30_000, seed=7), _sketch(30_000, seed=8)
    for s in (a, b, c):
        s.accumulate_(x)
    assert torch.equal(a.table, b.table)
    assert not torch.equal(a.table, c.table)
    with pytest.raises(ValueError, match="incompatible"):
        a.add_sketch_(c)


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    sk = _sketch(10_000)
    sk.accumulate_(torch.ones(10_000))
    sk.decompress()
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_tables(dtype: str) -> None:
    numel = 40_000
    x = torch.randn(numel)
    lo, ref = _sketch(numel, dtype=dtype), _sketch(numel)
    lo.accumulate_(x)
    ref.accumulate_(x)
    assert lo.table.dtype == getattr(torch, dtype)
    assert lo.nbytes == ref.nbytes // 2
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    assert ((lo.decompress() - ref.decompress()).norm() / ref.decompress().norm()) < tol


def test_sparse_updates_match_dense() -> None:
    numel = 9_999
    idx = torch.tensor([0, 17, 4000, 9998])
    vals = torch.tensor([1.0, -2.0, 3.5, 4.0])
    z = torch.zeros(numel)
    z[idx] = vals
    a, b, c = _sketch(numel, rows=3), _sketch(numel, rows=3), _sketch(numel, rows=3)
    a.accumulate_(z)
    b.accumulate_sparse_(idx, vals)
    c.accumulate_block_(z[4000:9999], 4000)
    c.accumulate_block_(z[:4000], 0)
    torch.testing.assert_close(a.table, b.table)
    torch.testing.assert_close(a.table, c.table)


def test_feedback_subtraction_is_exact_for_one_row() -> None:
    """S − c·CS(ê) computed in closed form equals sketching the decompressed estimate."""
    numel = 10_001  # a tail unit
    sk = _sketch(numel, ratio=0.1, unit=8)
    sk.accumulate_(torch.randn(numel))
    est = sk.decompress()
    ref = CountSketch(sk.geometry, seed=sk.seed)
    ref.table.copy_(sk.table)
    ref.accumulate_(est, alpha=-0.1)
    assert sk.subtract_estimate_feedback_(0.1)
    torch.testing.assert_close(sk.table, ref.table, rtol=1e-4, atol=1e-4)
    assert not _sketch(1000, rows=3).subtract_estimate_feedback_(0.1)


def test_state_dict_round_trip_and_validation() -> None:
    sk = _sketch(5000, seed=2)
    sk.accumulate_(torch.randn(5000))
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sk.state_dict().items()}
    other = _sketch(5000, seed=2)
    other.load_state_dict(state)
    assert torch.equal(other.table, sk.table)
    with pytest.raises(ValueError, match="seed"):
        _sketch(5000, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="dtype"):
        _sketch(5000, seed=2, dtype="float16").load_state_dict(state)
    bad = dict(state, table=state["table"][:, :-1])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)
    nan = dict(state, table=torch.full_like(state["table"], float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        other.load_state_dict(nan)
    assert torch.equal(other.table, sk.table)  # unchanged by the failed loads


@pytest.mark.parametrize(
    "kwargs,match",
    [({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"rows": 0}, "rows"), ({"unit": 0}, "unit")],
)
def test_bad_geometry(kwargs: dict, match: str) -> None:
    args = {"numel": 100, "ratio": 0.1, "rows": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        SketchGeometry.for_ratio(**args)


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="int8"):
        _sketch(100, dtype="int8")


# --------------------------------------------------------------------------- hash scheme perm-v1
def _reference_table(x: torch.Tensor, gm: SketchGeometry, seed: int, row: int = 0) -> torch.Tensor:
    h, s = unit_hashes(seed, row, gm)
    ref = torch.zeros(gm.buckets, gm.unit, dtype=torch.float64)
    for i in range(gm.num_units):
        seg = x[i * gm.unit : (i + 1) * gm.unit].double()
        ref[int(h[i]), : seg.numel()] += float(s[i]) * seg
    return ref


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_every_table_dtype_matches_the_reference(dtype: str) -> None:
    """Sparse kernels (fp32/fp64), bucket-block scratch (fp16/bf16) and the estimate, against a loop."""
    gm = SketchGeometry(numel=5_003, rows=1, buckets=37, unit=16)  # a tail unit of 11
    x = torch.randn(5_003, generator=torch.Generator().manual_seed(2))
    sk = CountSketch(gm, seed=5, dtype=dtype)
    sk.accumulate_(x)
    ref = _reference_table(x, gm, 5)
    tol = {"float32": 1e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(sk.table[0].double(), ref, rtol=tol, atol=tol * 4)
    h, s = unit_hashes(5, 0, gm)
    table = sk.table[0].double()
    ref_est = torch.stack([float(s[i]) * table[int(h[i])] for i in range(gm.num_units)]).reshape(-1)[:5_003]
    torch.testing.assert_close(sk.decompress().double(), ref_est, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sk.estimate_at(torch.arange(5_003)).double(), ref_est, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_tables_round_once(dtype: str) -> None:
    """A 16-bit table is the float32 result rounded once (sums accumulate in float32)."""
    gm = SketchGeometry.for_ratio(300_007, 0.1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300_007, generator=g) * 3, torch.randn(300_007, generator=g)
    lo, ref = CountSketch(gm, seed=9, dtype=dtype), CountSketch(gm, seed=9)
    lo.accumulate_(x)
    ref.accumulate_(x)
    assert torch.equal(lo.table, ref.table.to(lo.table.dtype))
    ref.table.copy_(lo.table.float())  # the next update starts from the rounded table
    lo.accumulate_(y)
    ref.accumulate_(y)
    assert torch.equal(lo.table, ref.table.to(lo.table.dtype))
    assert torch.equal(lo.decompress(), _decompress_of(lo))


def _decompress_of(sk: CountSketch) -> torch.Tensor:
    """The estimate of a 16-bit table computed through a float32 copy of it."""
    f = CountSketch(sk.geometry, seed=sk.seed)
    f.table.copy_(sk.table.float())
    return f.decompress()


def test_buckets_are_balanced_and_signs_fair() -> None:
    gm = SketchGeometry.for_ratio(1_000_003, 0.1)
    h, s = unit_hashes(11, 0, gm)
    full = gm.full_units
    assert torch.equal(torch.bincount(h[:full], minlength=gm.buckets), torch.tensor(gm.bucket_loads()))
    assert max(gm.bucket_loads()) - min(gm.bucket_loads()) <= 1
    assert abs(float(s.mean())) < 0.05
    other, _ = unit_hashes(12, 0, gm)
    assert not torch.equal(h, other)


def test_hash_scheme_is_pinned() -> None:
    """The hashes are part of the saved state's meaning: a change of torch's generators must fail here."""
    gm = SketchGeometry(numel=40, rows=1, buckets=4, unit=3)  # 13 full units and a tail of 1
    h, s = unit_hashes(123, 0, gm)
    assert h.tolist() == PINNED_BUCKETS and s.tolist() == PINNED_SIGNS


def test_state_of_another_hash_scheme_is_refused() -> None:
    sk = _sketch(5000, seed=2)
    state = dict(sk.state_dict())
    for bad in (None, "carter-wegman"):
        other = {k: v for k, v in state.items() if k != "hash"} if bad is None else dict(state, hash=bad)
        with pytest.raises(ValueError, match="hash scheme"):
            _sketch(5000, seed=2).load_state_dict(other)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sketch_operations_allocate_little(dtype: str) -> None:
    """Update, decompress and the feedback scaling stay below 2 % of 4·d at the benchmark's d (measured).

    (The hash structures are O(n) = O(10^4) integers whatever d: relatively larger at small d.)
    """
    d = 10_000_000
    sk = CountSketch(SketchGeometry.for_ratio(d, 0.1), seed=1, dtype=dtype)
    x, target = torch.randn(d), torch.zeros(d)
    sk.accumulate_(x)
    for fn in (lambda: sk.accumulate_(x), lambda: sk.estimate_add_(target),
               lambda: sk.subtract_estimate_feedback_(0.1), lambda: sk.estimate_block_add_(target[:1_000_000], 123)):
        _, m = measure_transient(fn)
        assert m.peak_bytes <= 0.02 * 4 * d, m


#: unit_hashes(123, 0, SketchGeometry(numel=40, rows=1, buckets=4, unit=3)) under scheme perm-v1.
PINNED_BUCKETS = [3, 2, 3, 2, 1, 3, 0, 2, 0, 1, 1, 0, 3, 0]
PINNED_SIGNS = [-1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0]


def test_the_hash_cache_changes_nothing_but_time() -> None:
    """Cached and rebuilt hash structures give bit-identical tables and estimates; the budget is validated."""
    from conef_fl.error_stores import sketch as S

    d = 50_003
    x = torch.randn(d, generator=torch.Generator().manual_seed(4))
    results = []
    try:
        for budget in (0, 1 << 26):
            S.set_hash_cache_bytes(budget)
            sk = _sketch(d, seed=21, unit=7)
            sk.accumulate_(x)
            sk.accumulate_block_(x[100:5000], 100, alpha=-0.5)
            est = sk.estimate_block(33, 20_000)
            results.append((sk.table.clone(), est, sk.estimate_at(torch.arange(0, d, 17))))
            before = S.hash_cache_info()
            _sketch(d, seed=21, unit=7).accumulate_(x)  # same seed and geometry: served from the cache
            after = S.hash_cache_info()
            if budget:
                assert after["hits"] > before["hits"] and 0 < after["bytes"] <= budget
            else:
                assert after["entries"] == 0 and after["bytes"] == 0
    finally:
        S.set_hash_cache_bytes(S.HASH_CACHE_BYTES)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_bytes"):
        S.set_hash_cache_bytes(-1)
