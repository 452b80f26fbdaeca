"""conef_fl.feedback: the EFSGD and ConEF update rules, their invariants and memory."""

from __future__ import annotations

import math

import pytest
import torch

from conef_fl.config import MethodConfig
from conef_fl.error_stores.base import DenseError, NonFiniteError
from conef_fl.error_stores.quantizer import code_bits
from conef_fl.error_stores.sketch import CountSketch
from conef_fl.feedback import ConEF, make_feedback
from conef_fl.measure import measure_transient, persistent_bytes
from conef_fl.registry import available_methods, method_config

SHAPE = (64, 150)


D = math.prod(SHAPE)


def _updates(n: int, seed: int = 0, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _run(fb, updates):
    sent = torch.zeros(fb.numel)
    for t, u in enumerate(updates):
        p = fb.step(u, seed=t)
        fb.compressor.decompress_add_(p, sent)
    return sent


@pytest.mark.parametrize("compressor", ["random-block-k", "random-k", "top-k", "scaled-sign", "powersgd"])
def test_efsgd_conserves_mass(compressor: str) -> None:
    fb = make_feedback(method_config("efsgd", compressor=compressor), SHAPE, "w")
    us = _updates(25)
    sent = _run(fb, us)
    total = torch.stack(us).sum(0).reshape(-1)
    torch.testing.assert_close(sent + fb.error.e, total, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"compressor": "random-k"},
        {"compressor": "top-k"},
        {"compressor": "scaled-sign", "beta": 0.5},
        {"compressor": "top-k", "sketch_rows": 3},
        {"compressor": "random-block-k", "sketch_rows": 3, "beta": 0.0},
        {"compressor": "random-k", "beta": 0.0, "sketch_dtype": "float32"},
    ],
)
def test_conef_sketch_invariant(overrides: dict) -> None:
    """S_T == CS(Σ_t (u_t − Δ_t)): the mass-conserving sketch update (ALGORITHMS.md)."""
    fb = make_feedback(method_config("conef-cs", **overrides), SHAPE, "w")
    assert isinstance(fb.store, CountSketch)
    us = _updates(30, seed=1)
    sent = _run(fb, us)
    ref = CountSketch(fb.store.geometry, seed=fb.store.seed)
    ref.accumulate_(torch.stack(us).sum(0).reshape(-1) - sent)
    # "up to float rounding": rounding scales with the largest values the steps handled (with top-k,
    # beta = 0.5 and unit = 1 this small sketch grows to ~1e16 in 30 steps, under any hash)
    atol = 1e-4 * max(1.0, float(ref.table.abs().max()) * 1e-3)
    torch.testing.assert_close(fb.store.table, ref.table, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("compressor", ["random-block-k", "top-k", "scaled-sign", "random-k"])
def test_conef_with_identity_store_equals_efsgd(compressor: str) -> None:
    cfg = method_config("efsgd", compressor=compressor)
    ef = make_feedback(cfg, SHAPE, "w")
    con = ConEF(SHAPE, make_compressor_like(cfg), cfg, "w", store=DenseError(D), beta=0.0)
    for t, u in enumerate(_updates(20, seed=2)):
        a = ef.step(u, seed=t)
        b = con.step(u, seed=t)
        for k in a.arrays:
            torch.testing.assert_close(a.arrays[k], b.arrays[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ef.error.e, con.store.e, rtol=1e-5, atol=1e-5)


def test_partial_efsgd_keeps_a_dense_error_and_feeds_back_part_of_it() -> None:
    """``partial-efsgd``: dense fp32 error (4 bytes/entry), p = u + (1−β)·e, e ← e + u − Δ; β = 0 is EFSGD."""
    us = _updates(12, seed=4)
    ef = make_feedback(method_config("efsgd", compressor="random-block-k"), SHAPE, "w")
    p0 = make_feedback(method_config("partial-efsgd", compressor="random-block-k", beta=0.0), SHAPE, "w")
    torch.testing.assert_close(_run(ef, us), _run(p0, us), rtol=1e-5, atol=1e-6)
    half = make_feedback(method_config("partial-efsgd", compressor="random-block-k", beta=0.5), SHAPE, "w")
    assert isinstance(half.store, DenseError) and half.nbytes == 4 * D
    sent = _run(half, us)
    torch.testing.assert_close(half.store.e.reshape(-1), torch.stack(us).sum(0).reshape(-1) - sent,
                               rtol=1e-5, atol=1e-5)  # mass conserved: e = Σu − Σ sent
    assert not torch.allclose(sent, _run(make_feedback(method_config("efsgd", compressor="random-block-k"),
                                                       SHAPE, "w"), us))


def make_compressor_like(cfg: MethodConfig):
    from conef_fl.feedback import make_compressor_for

    return make_compressor_for(cfg)


@pytest.mark.parametrize("method", ["efsgd", "conef-cs", "conef-q", "iconef-v1", "iconef-v2", "hefsgd", "sgd"])
def test_identity_q_is_sgd(method: str) -> None:
    cfg = method_config(method).replace(compressor="identity")
    fb = make_feedback(cfg, SHAPE, "w")
    for t, u in enumerate(_updates(5, seed=3)):
        p = fb.step(u, seed=t)
        torch.testing.assert_close(fb.compressor.decompress(p), u, rtol=1e-6, atol=1e-6)


def test_long_run_error_estimate_stays_bounded() -> None:
    """Hundreds of steps at w = 0.1d, v = 1, β = 0.9: the sketch estimate does not blow up."""
    d = 20_000
    cfg = method_config("conef-cs", sketch_ratio=0.1, sketch_rows=1, beta=0.9, k_ratio=0.1)
    fb = make_feedback(cfg, (d,), "w")
    g = torch.Generator().manual_seed(4)
    norms = []
    for t in range(400):
        u = torch.randn(d, generator=g) * 0.01
        fb.step(u, seed=t)
        if t % 50 == 49:
            norms.append(float(fb.store.decompress().norm()))
    # the update norm is 0.01*sqrt(d) ≈ 1.4; EFSGD's error norm is O(sqrt(d/k)) updates;
    # a diverging sketch grows geometrically — demand that late norms stay within 3× of early ones
    assert max(norms[-3:]) < 3 * max(norms[:3]), norms
    assert all(math.isfinite(n) for n in norms)


def test_literal_paper_update_would_diverge_but_ours_does_not() -> None:
    """Guard the design choice: β·S + CS(p − Δ) grows, the mass-conserving update does not."""
    d, beta = 20_000, 0.9
    cfg = method_config("conef-cs", sketch_ratio=0.1, beta=beta)
    fb = make_feedback(cfg, (d,), "w")
    lit = CountSketch(fb.store.geometry, seed=fb.store.seed)
    q = fb.compressor
    g = torch.Generator().manual_seed(5)
    for t in range(200):
        u = torch.randn(d, generator=g) * 0.01
        fb.step(u, seed=t)
        p = u + (1 - beta) * lit.decompress()
        delta = q.decompress(q.compress(p, seed=t, key="w"))
        lit.scale_(beta)
        lit.accumulate_(p - delta)
    lit_norm = float(lit.decompress().norm())
    ours = float(fb.store.decompress().norm())
    assert math.isfinite(ours) and ours < 100 * 0.01 * math.sqrt(d)
    assert (not math.isfinite(lit_norm)) or lit_norm > 1e3 * ours, (lit_norm, ours)


def test_nan_update_refused_and_state_untouched() -> None:
    fb = make_feedback(method_config("conef-cs"), SHAPE, "w")
    fb.step(torch.randn(SHAPE), seed=0)
    before = fb.store.table.clone()
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = torch.randn(SHAPE)
        u[3, 7] = bad
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            fb.step(u, seed=1)
        assert torch.equal(fb.store.table, before)
    with pytest.raises(ValueError, match="elements"):
        fb.step(torch.randn(10), seed=1)
    with pytest.raises(ValueError, match="dtype"):
        fb.step(torch.ones(SHAPE, dtype=torch.int32), seed=1)


def test_consume_false_never_modifies_update() -> None:
    for method, comp in [("conef-cs", "top-k"), ("conef-q", "random-block-k"), ("iconef-v1", "top-k")]:
        fb = make_feedback(method_config(method, compressor=comp), SHAPE, "w")
        u = torch.randn(SHAPE)
        keep = u.clone()
        fb.step(u, seed=0)
        fb.step(u, seed=1)
        assert torch.equal(u, keep)


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("rows,dtype,limit", [(1, "float32", 0.1), (3, "float32", 0.1), (1, "float16", 0.05)])
def test_conef_sketch_persistent_bytes(rows: int, dtype: str, limit: float) -> None:
    d = 200_000
    fb = make_feedback(method_config("conef-cs", sketch_rows=rows, sketch_dtype=dtype), (d,), "w")
    for t in range(3):
        fb.step(torch.randn(d), seed=t)
    kept = persistent_bytes(fb.persistent_tensors())
    assert kept == fb.nbytes
    assert kept <= limit * 4 * d + 64
    assert all(t.numel() < d for t in fb.persistent_tensors())


def test_every_method_declares_its_memory_truthfully() -> None:
    d = 30_000
    efsgd_bytes = 4 * d
    expected_max = {
        "sgd": 0, "qsgd": 0, "rbsgd": 0, "atomo": 0, "efsgd": efsgd_bytes, "ef-topk": efsgd_bytes,
        "ef-sign": efsgd_bytes, "ef-powersgd": efsgd_bytes, "conef-cs": 0.1 * efsgd_bytes + 64,
        "conef-powersgd": 0.1 * efsgd_bytes + 64,
        "conef-q": d * code_bits(16) / 8 + 16, "iconef-v1": 2 * (d * code_bits(16) / 8 + 16),
        "iconef-v2": d * code_bits(16) / 8 + 16 + 0.1 * 4 * d, "hefsgd": 0.05 * d * 8 + 16,
        "partial-efsgd": efsgd_bytes, "decayed-efsgd": efsgd_bytes,
    }
    assert set(expected_max) == set(available_methods())
    for name in available_methods():
        fb = make_feedback(method_config(name), (d,), "w")
        fb.step(torch.randn(d), seed=0)
        fb.step(torch.randn(d), seed=1)
        kept_state = fb.nbytes
        assert kept_state <= expected_max[name], (name, kept_state)
        tensors = [t for s in fb.stores().values() for t in s.persistent_tensors()]
        if name == "iconef-v2":
            tensors += list(fb.e_payload.arrays.values())
        assert persistent_bytes(tensors) == kept_state, name


# --------------------------------------------------------------------------- transient (measured)
def test_conef_selective_step_transient_is_only_the_payload() -> None:
    """Beyond the payload it returns, a ConEF step with random-block-k allocates O(k) at most."""
    d = 4_000_000
    fb = make_feedback(method_config("conef-cs", k_ratio=0.01), (d,), "w")
    u = torch.randn(d)
    fb.step(u, seed=0)
    payload, m = measure_transient(lambda: fb.step(u, seed=1))
    assert m.method == "profiler"
    assert m.peak_bytes > 0  # the measurement sees allocations at all
    # payload (k floats) + one k-sized scratch + hashes; nothing of size d
    assert m.peak_bytes <= 2 * payload.nbytes + 0.02 * 4 * d, m


def test_efsgd_transient_measurement_sees_a_dense_copy() -> None:
    """The measurement is real: forcing a copy of the update shows up as ≥ 4d bytes."""
    d = 400_000
    fb = make_feedback(method_config("conef-cs", compressor="top-k"), (d,), "w")
    u = torch.randn(d)
    _, m = measure_transient(lambda: fb.step(u, seed=1, consume=False))
    assert m.peak_bytes >= 4 * d
