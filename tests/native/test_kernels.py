"""The compiled kernels (``conef_fl.native``) against the pure-torch fallback: bit-identical results.

Every test runs the same operations twice, once with the kernels forced off and once on, from the
same state, and demands equal bits (``torch.equal`` on the tables and vectors). Skipped where the
kernels are not built (``python -m conef_fl.native build``); the fallback alone is covered by the
rest of the suite, which ``CONEF_NATIVE=0 ./test.sh`` runs without the kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conef_fl import native
from conef_fl.compressors.sign import ScaledSign
from conef_fl.error_stores import sketch as sketch_mod
from conef_fl.error_stores.base import NonFiniteError
from conef_fl.error_stores.sketch import CountSketch, SketchGeometry
from conef_fl.feedback import make_feedback
from conef_fl.registry import method_config

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")


@pytest.fixture(autouse=True, params=["small", "large"])
def _every_kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' size-dependent choices, at test sizes: float32/float64 tables too, CSR-order recovery."""
    if request.param == "small":
        monkeypatch.setattr(sketch_mod, "NATIVE_WIDE_MIN_NUMEL", 0)
    else:  # the policy's default cut, scaled down: some vectors below it, some above
        monkeypatch.setattr(sketch_mod, "NATIVE_WIDE_MIN_NUMEL", 22_000)

DTYPES = ("float32", "float16", "bfloat16", "float64")


def _vec(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # magnitudes over several decades: sums of units in a bucket round differently in other orders
    return (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)).to(dtype)


def _both(fn, *state):
    """``fn(*copies)`` with the kernels off and on (deep copies of ``state``); both results."""
    out = []
    for enabled in (False, True):
        copies = copy.deepcopy(state)
        with native.use_native(enabled):
            out.append((fn(*copies), copies))
    return out


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max |diff| {float((a.double() - b.double()).abs().max())}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("numel", [20_011, 24_000])  # with and without a tail unit
def test_sketch_operations_are_bit_identical(dtype: str, rows: int, numel: int) -> None:
    geom = SketchGeometry.for_ratio(numel, 0.1, rows, unit=40)
    sk = CountSketch(geom, seed=7, dtype=dtype)
    cdt = torch.float64 if dtype == "float64" else torch.float32
    sk.accumulate_(_vec(numel, 1, cdt))  # a non-zero starting table
    x, y = _vec(numel, 2, cdt), _vec(numel, 3, cdt)
    block = _vec(3_001, 4, cdt)

    def ops(s: CountSketch, t: torch.Tensor) -> torch.Tensor:
        with s.reuse_hashes():
            s.accumulate_(x, alpha=0.3)
            s.accumulate_block_(block, 1_017, alpha=-0.7)  # partial units at both edges
            s.accumulate_block_(block[:2_000], 0)
            s.estimate_add_(t, alpha=0.1)
            s.estimate_block_add_(t[5_013:9_000], 5_013, alpha=-0.4)
            s.feedback_accumulate_(x, 0.1) if rows == 1 else s.accumulate_(x)
        return t

    (t0, (s0, _)), (t1, (s1, _)) = _both(ops, sk, y)
    _assert_same(s0.table, s1.table)
    _assert_same(t0, t1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_feedback_update_equals_the_two_calls(dtype: str) -> None:
    numel = 30_007  # a tail unit: its bucket's factor differs on the tail's columns
    sk = CountSketch(SketchGeometry.for_ratio(numel, 0.1, 1, unit=64), seed=3, dtype=dtype, estimate_scale=0.5)
    cdt = torch.float64 if dtype == "float64" else torch.float32
    sk.accumulate_(_vec(numel, 5, cdt))
    x = _vec(numel, 6, cdt)
    ref = copy.deepcopy(sk)
    with native.use_native(False):
        assert ref.subtract_estimate_feedback_(0.1)
        ref.accumulate_(x)
    with native.use_native(True):
        assert sk.feedback_accumulate_(x, 0.1)
    _assert_same(ref.table, sk.table)


@pytest.mark.parametrize("q", ["top-k", "scaled-sign", "random-block-k", "random-k"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_conef_steps_are_bit_identical(q: str, dtype: str) -> None:
    kw = {"k_ratio": 0.05} if q != "scaled-sign" else {}
    cfg = method_config("conef-cs", compressor=q, beta=0.9, sketch_ratio=0.1, sketch_dtype=dtype, **kw)
    fb = make_feedback(cfg, (300, 101), key="w")
    results = []
    for enabled in (False, True):
        f = copy.deepcopy(fb)
        payloads = []
        with native.use_native(enabled):
            for step in range(3):
                u = _vec(300 * 101, 10 + step).view(300, 101)
                payloads.append(f.step(u, seed=step, consume=step % 2 == 0))
        results.append((f, payloads))
    (f0, p0), (f1, p1) = results
    _assert_same(f0.store.table, f1.store.table)
    for a, b in zip(p0, p1, strict=True):
        assert a.arrays.keys() == b.arrays.keys()
        for k in a.arrays:
            _assert_same(a.arrays[k], b.arrays[k])


@pytest.mark.parametrize(("shape", "unit", "scale"), [((64,), None, 1.0), ((1000,), 3, 0.5), ((7, 9, 13), 5, 1.0),
                                                      ((4096,), None, 0.7)])
def test_small_sign_step_in_one_call_is_bit_identical(shape: tuple[int, ...], unit: int | None, scale: float) -> None:
    extra = {"sketch_unit": unit} if unit else {}  # 1000 = 333·3 + 1 and 819 = 163·5 + 4: tail units
    cfg = method_config("conef-cs", compressor="scaled-sign", beta=0.3, sketch_ratio=0.1, estimate_scale=scale,
                        **extra)
    numel = torch.Size(shape).numel()
    fb = make_feedback(cfg, shape, key="w")
    results = []
    for enabled in (False, True):
        f = copy.deepcopy(fb)
        payloads = []
        with native.use_native(enabled):
            for step in range(4):
                u = _vec(numel, 20 + step).view(shape)
                payloads.append(f.step(u, seed=step, consume=step % 2 == 0) if step < 2
                                else f.step_checked(u, seed=step, consume=step % 2 == 0))
        results.append((f, payloads))
    (f0, p0), (f1, p1) = results
    _assert_same(f0.store.table, f1.store.table)
    with native.use_native(True):  # the one-call path is the one taken
        assert f1.store.sign_step_(_vec(numel, 30), 0.7) is not None
    for a, b in zip(p0, p1, strict=True):
        assert (a.kind, a.shape, a.arrays.keys()) == (b.kind, b.shape, b.arrays.keys())
        for k in a.arrays:
            _assert_same(a.arrays[k], b.arrays[k])


@pytest.mark.parametrize("where", [0, 999])  # in a full unit, in the tail unit
def test_small_sign_step_refuses_non_finite_with_the_table_untouched(where: int) -> None:
    cfg = method_config("conef-cs", compressor="scaled-sign", sketch_ratio=0.1, sketch_unit=3)
    fb = make_feedback(cfg, (1000,), key="w")
    with native.use_native(True):
        fb.step(_vec(1000, 1), seed=0)
        before = fb.store.table.clone()
        u = _vec(1000, 2)
        u[where] = float("nan")
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            fb.step_checked(u, seed=1)  # a caller that skipped the check is still refused
        assert torch.equal(fb.store.table, before) and fb.steps == 1


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("where", [12_345, 20_005])  # in a full unit, in the tail unit
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_update_refused_state_unchanged(bad: float, where: int, enabled: bool) -> None:
    cfg = method_config("conef-cs", compressor="scaled-sign", beta=0.9, sketch_ratio=0.1, sketch_unit=40)
    fb = make_feedback(cfg, (20_011,), key="w")
    with native.use_native(enabled):
        fb.step(_vec(20_011, 1), seed=0)
        before = fb.store.table.clone()
        for consume in (False, True):
            u = _vec(20_011, 2)
            u[where] = bad
            with pytest.raises(NonFiniteError, match="NaN or Inf"):
                fb.step(u, seed=1, consume=consume)
            assert torch.equal(fb.store.table.view(torch.uint8), before.view(torch.uint8))
        assert fb.steps == 1
        big = torch.full((20_011,), 3e38)  # finite, though its float32 sum overflows: accepted
        fb.step(big, seed=2)
    assert fb.steps == 2


@pytest.mark.parametrize("d", [8, 13, 20_003])
def test_sign_decode_add_is_bit_identical(d: int) -> None:
    q = ScaledSign()
    payload = q.compress(_vec(d, 11))
    (a, _), (b, _) = _both(lambda t: q.decompress_add_(payload, t, alpha=-0.37), _vec(d, 12))
    _assert_same(a, b)


@pytest.mark.parametrize("d", [1, 8, 13, 20_003, 70_001])
def test_sign_packing_is_bit_identical(d: int) -> None:
    x = _vec(d, 13)
    x[::7] = 0.0
    x[3::11] = -0.0  # packed as +, like torch.ge(x, 0)
    x[5::13] = float("nan")  # packed as -
    q = ScaledSign()
    (a, _), (b, _) = _both(lambda v: q.compress(v), x)
    _assert_same(a.arrays["signs"], b.arrays["signs"])
    assert torch.equal(a.arrays["scale"].view(torch.int32), b.arrays["scale"].view(torch.int32))  # NaN here


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("unit", [64, 57, 3])  # units of whole bytes, and units that start mid-byte
def test_fused_sign_residual_update_equals_decode_then_update(dtype: str, unit: int) -> None:
    numel = 30_007  # a tail unit: its values are corrected too
    sk = CountSketch(SketchGeometry.for_ratio(numel, 0.1, 1, unit=unit), seed=3, dtype=dtype)
    sk.accumulate_(_vec(numel, 5))
    p = _vec(numel, 6)
    payload = ScaledSign().compress(p)
    s = -float(payload.arrays["scale"])
    ref, r = copy.deepcopy(sk), p.clone()
    with native.use_native(False):
        ScaledSign().decompress_add_(payload, r, alpha=-1.0)
        assert ref.feedback_accumulate_(r, 0.1)
        assert not sk.feedback_accumulate_signs_(p, 0.1, payload.arrays["signs"], s)  # no kernels: nothing done
    before = p.clone()
    with native.use_native(True):
        assert sk.feedback_accumulate_signs_(p, 0.1, payload.arrays["signs"], s)
    _assert_same(ref.table, sk.table)
    _assert_same(p, before)  # read only


def test_kernels_refuse_bad_indices() -> None:
    with native.use_native(True):
        ops = native.ops()
    table = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sketch_gather_add_(torch.zeros(2, 3), table, torch.tensor([0, 4], dtype=torch.int32),
                               torch.ones(2), 1.0)
    crow = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.sketch_scatter_(table, torch.zeros(2, 3), crow, torch.tensor([0, 2], dtype=torch.int32),
                            torch.ones(2), 1.0, None, None, 0, 1.0, 0, 1.0, None, 0.0)


def test_switch_and_the_kernels_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = native.ops

    class Counting:
        def __getattr__(self, name: str):
            calls.append(name)
            return getattr(real(), name)

    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.ops() is None  # the switch turns them off ...
    with native.use_native(True):
        assert native.ops() is not None  # ... and tests can force them on
    monkeypatch.delenv(native.ENV_SWITCH)
    monkeypatch.setattr(native, "ops", lambda: Counting())
    cfg = method_config("conef-cs", compressor="scaled-sign", beta=0.9, sketch_ratio=0.1, sketch_dtype="float16")
    make_feedback(cfg, (20_000,), key="w").step(_vec(20_000, 1), seed=0)
    assert {"sketch_scatter_", "sign_pack_"} <= set(calls)
    assert {"sketch_gather_add_", "sketch_gather_add_csr_"} & set(calls)
