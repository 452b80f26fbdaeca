"""conef_fl.compressors.random_k."""

from __future__ import annotations

import math

import pytest
import torch

from conef_fl.compressors import (
    RandomK,
)
from conef_fl.compressors.random_k import sample_without_replacement


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
