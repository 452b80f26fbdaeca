"""Sketch groups and one-product block estimates: bit-identical to the per-sketch calls (issue #13)."""

from __future__ import annotations

import pytest
import torch

from conef_fl.error_stores.sketch import CountSketch, SketchGeometry
from conef_fl.error_stores.sketch_group import SketchGroup

#: Sizes with unit 1, unit > 1, tails of several widths, and a one-element tensor.
SIZES = (1, 64, 1000, 3001, 7 * 5, 32_768, 36_864, 9_408)


def _filled(numel: int, seed: int, gen: torch.Generator) -> CountSketch:
    sk = CountSketch(SketchGeometry.for_ratio(numel, 0.1), seed=seed)
    sk.table.copy_(torch.randn(sk.table.shape, generator=gen))
    return sk


def test_group_matches_every_sketch_bitwise() -> None:
    gen = torch.Generator().manual_seed(3)
    alone = [_filled(n, seed=i, gen=gen) for i, n in enumerate(SIZES)]
    grouped = [CountSketch(s.geometry, seed=s.seed) for s in alone]
    for a, b in zip(alone, grouped, strict=True):
        b.table.copy_(a.table)
    group = SketchGroup(grouped)
    xs = [torch.randn(n, generator=gen) for n in SIZES]
    # estimate at a block of every vector (whole units and edge pieces), as estimate_block_add_ computes it
    blocks, offsets, off = [], [], 0
    for n in SIZES:
        lo = n // 3
        blocks.append((lo, max(1, n // 10)))
        offsets.append(off)
        off += n
    idx = torch.cat([torch.arange(o + lo, o + lo + k) for o, (lo, k) in zip(offsets, blocks, strict=True)])
    tables = group.tables()
    got = torch.cat([x for x in xs]).index_select(0, idx)
    group.estimate_at_add_(got, tables, idx, alpha=0.3)
    want = torch.cat([sk.estimate_block_add_(x[lo : lo + k].clone(), lo, alpha=0.3)
                      for sk, x, (lo, k) in zip(alone, xs, blocks, strict=True)])
    assert torch.equal(got, want)
    # one sparse product updates every table exactly as accumulate_ does, tails included
    group.accumulate_(tables, torch.cat(xs))
    group.store_tables_(tables)
    for sk, x in zip(alone, xs, strict=True):
        sk.accumulate_(x)
    for a, b in zip(alone, grouped, strict=True):
        assert torch.equal(a.table, b.table)


def test_group_refuses_what_it_cannot_batch() -> None:
    g = SketchGeometry.for_ratio(1000, 0.1)
    with pytest.raises(ValueError, match="one row"):
        SketchGroup([CountSketch(g), CountSketch(g, dtype="float16")])
    with pytest.raises(ValueError, match="one row"):
        SketchGroup([CountSketch(SketchGeometry.for_ratio(1000, 0.1, rows=3))])
    with pytest.raises(ValueError, match="estimate_scale"):
        SketchGroup([CountSketch(g), CountSketch(g, estimate_scale=0.5)])
    with pytest.raises(ValueError, match="at least one"):
        SketchGroup([])
    group = SketchGroup([CountSketch(g)])
    with pytest.raises(ValueError, match="1000"):
        group.accumulate_(group.tables(), torch.zeros(999))


@pytest.mark.parametrize("numel,unit", [(50_000, 7), (73_728, None), (3001, None), (10_000, 1), (589_824, None)])
def test_estimate_span_matches_the_block_estimate(numel: int, unit: int | None) -> None:
    gen = torch.Generator().manual_seed(numel)
    sk = CountSketch(SketchGeometry.for_ratio(numel, 0.1, unit=unit), seed=5)
    sk.table.copy_(torch.randn(sk.table.shape, generator=gen))
    x = torch.randn(numel, generator=gen)
    end = sk.geometry.full_units * sk.geometry.unit
    for lo, k in [(0, numel // 10), (numel // 3 + 1, numel // 10), (end - numel // 10, numel // 10), (5, 1)]:
        span = sk.estimate_span(x, lo, lo + k, alpha=0.1)
        assert span is not None and span.is_contiguous() and span.numel() == k
        assert torch.equal(span, sk.estimate_block_add_(x[lo : lo + k].clone(), lo, alpha=0.1))
    # the tail unit, a non-sparse table, a foreign dtype: no fast path
    tail = sk.geometry.tail
    assert tail == 0 or sk.estimate_span(x, numel - 2, numel) is None
    assert CountSketch(sk.geometry, dtype="float16").estimate_span(x, 0, 10) is None
    assert sk.estimate_span(x.double(), 0, 10) is None
