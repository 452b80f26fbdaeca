"""conef_fl.compressors.topk."""

from __future__ import annotations

import pytest
import torch

from conef_fl.compressors import (
    ScaledSign,
    TopK,
)
from conef_fl.compressors.topk import FAST_MIN_NUMEL, topk_indices, topk_select

from .helpers import _reference_topk, randn


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
