"""conef_fl.compressors.random_block."""

from __future__ import annotations

import torch

from conef_fl.compressors import (
    RBSGD,
    RandomBlockK,
)

from .helpers import _z_scores, randn


def test_rbsgd_unbiased_over_shared_seeds() -> None:
    x = randn(40, seed=6)
    q = RBSGD(ratio=0.25)
    samples = torch.stack([q.decompress(q.compress(x, seed=s, key="b")) for s in range(2000)])
    assert float(_z_scores(samples, x).max()) < 5.5
    torch.testing.assert_close(samples.mean(0), x, rtol=0, atol=0.25)


def test_block_wraps_around() -> None:
    q = RandomBlockK(ratio=0.5)
    starts = {q.select(11, s).start for s in range(60)}
    assert len(starts) > 5
    sel = q.select(11, next(s for s in range(60) if q.select(11, s).start > 6))
    idx = sel.index_tensor()
    assert idx.numel() == 6 and len(set(idx.tolist())) == 6 and 0 in idx.tolist()
