"""conef_fl.error_stores.quantizer: the quantized error store."""

from __future__ import annotations

import math

import torch

from conef_fl.error_stores.quantizer import QuantizedError, code_bits


def test_quantizer_store_is_packed_and_unbiased() -> None:
    d = 5000
    x = torch.randn(d, generator=torch.Generator().manual_seed(6))
    q = QuantizedError(d, levels=16, seed=1)
    assert q.packed.dtype == torch.uint8
    assert q.nbytes == math.ceil(d * code_bits(16) / 8) + 1 + 4
    acc = torch.zeros(d)
    n = 300
    for _ in range(n):
        q.assign_(x)
        acc += q.decompress()
    assert ((acc / n - x).norm() / x.norm()) < 0.02
    torch.testing.assert_close(q.estimate_at(torch.arange(d)), q.decompress())
    # a single quantization is already close with 16 levels and max-norm scaling
    assert (q.decompress() - x).norm() / x.norm() < 0.3
