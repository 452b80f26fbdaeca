"""conef_fl.compressors.qsgd."""

from __future__ import annotations

import pytest
import torch

from conef_fl.compressors import (
    QSGD,
)

from .helpers import _z_scores, randn


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_qsgd_unbiased(norm: str) -> None:
    x = randn(6, 5, seed=2)
    q = QSGD(levels=2, norm=norm, generator=torch.Generator().manual_seed(5))
    samples = torch.stack([q.decompress(q.compress(x)) for _ in range(2000)])
    assert float(_z_scores(samples, x).max()) < 5.5
    levels = samples * 2 / (x.norm() if norm == "l2" else x.abs().max())
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # on the grid
