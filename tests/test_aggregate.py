"""conef_fl.aggregate: averaging payloads in compressed space."""

from __future__ import annotations

import torch

from conef_fl.compressors import make_compressor

SHAPE = (64, 150)


def _updates(n: int, seed: int = 0, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_all_reducible_aggregate_equals_decompress_then_average() -> None:
    from conef_fl.aggregate import average_payloads

    q = make_compressor("random-block-k", ratio=0.1)
    xs = _updates(4, seed=9)
    ps = [q.compress(x, seed=3, key="w") for x in xs]
    w = [1.0, 2.0, 3.0, 4.0]
    got = average_payloads(q, ps, w)
    ref = sum(wi * q.decompress(p) for wi, p in zip(w, ps, strict=True)) / sum(w)
    torch.testing.assert_close(got, ref)
