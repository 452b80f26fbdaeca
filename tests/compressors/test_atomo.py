"""conef_fl.compressors.atomo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conef_fl.compressors import (
    ATOMO,
)
from conef_fl.compressors.atomo import atomo_probabilities

from .helpers import _z_scores, randn


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
