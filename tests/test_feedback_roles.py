"""``ErrorFeedback.step`` equals its roles one at a time: ``compensate_`` → ``Q`` → ``absorb_``.

The DDP PowerSGD path communicates between the two memory roles, so it relies on this.
"""

from __future__ import annotations

import pytest
import torch

from conef_fl.compressors.base import SelectiveCompressor
from conef_fl.feedback import ConEF, ErrorFeedback, make_feedback
from conef_fl.registry import available_methods, method_config

SHAPE = (24, 40)
STEPS = 5


def _updates(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(STEPS)]


def _by_roles(fb: ErrorFeedback, u: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    p = fb.compensate_(u)
    payload = fb.compressor.compress(p.view(fb.shape), seed=seed, key=fb.key)
    fb.compressor.decompress_add_(payload, p, alpha=-1.0)  # p := p − Δ
    fb.absorb_(p)
    return dict(payload.arrays)


def _fused(fb: ErrorFeedback) -> bool:
    """ConEF's selective fast path never forms p: its sketch update sums C(u) and C(−Δ) apart."""
    store = fb.stores().get("e")
    return (
        isinstance(fb, ConEF) and store is not None and store.linear and isinstance(fb.compressor, SelectiveCompressor)
    )


@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize("method", available_methods())
def test_step_equals_compensate_compress_absorb(method: str, consume: bool) -> None:
    cfg = method_config(method, k_ratio=0.2, rank=2)
    fused, roles = (make_feedback(cfg, SHAPE, "w") for _ in range(2))
    exact = not _fused(fused)
    for t, u in enumerate(_updates()):
        u_before = u.clone()
        a = dict(fused.step(u.clone() if consume else u, seed=t, consume=consume).arrays)
        b = _by_roles(roles, u, seed=t)
        assert torch.equal(u, u_before)  # consume=False leaves the update alone
        assert a.keys() == b.keys()
        for name in a:
            if exact or not a[name].is_floating_point():
                assert torch.equal(a[name], b[name]), f"{method}: step {t}: {name}"
            else:  # the same sums in another order: float32 rounding
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    assert fused.steps == roles.steps == STEPS
    for store in fused.stores():
        x, y = fused.stores()[store].decompress(), roles.stores()[store].decompress()
        if exact:
            assert torch.equal(x, y), f"{method}: error store {store}"
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_compensate_only_reads_the_error_and_consume_reuses_the_buffer() -> None:
    fb = make_feedback(method_config("efsgd", k_ratio=0.2), SHAPE, "w")
    fb.step(_updates()[0], seed=0)
    before = fb.error.e.clone()
    u = _updates(1)[0].reshape(-1)
    p = fb.compensate_(u, consume=True)
    assert p.data_ptr() == u.data_ptr()
    torch.testing.assert_close(p, _updates(1)[0].reshape(-1) + before, rtol=0, atol=0)
    assert torch.equal(fb.error.e, before) and fb.steps == 1
    fb.absorb_(torch.zeros(fb.numel))
    assert not fb.error.e.any() and fb.steps == 2


def test_roles_reject_wrong_sizes() -> None:
    fb = make_feedback(method_config("conef-cs"), SHAPE, "w")
    with pytest.raises(ValueError, match="elements, expected 960"):
        fb.compensate_(torch.zeros(5))
    with pytest.raises(ValueError, match="residual for 'w' has 5 elements, expected 960"):
        fb.absorb_(torch.zeros(5))
    with pytest.raises(ValueError, match="floating dtype"):
        fb.compensate_(torch.zeros(SHAPE, dtype=torch.int32))
