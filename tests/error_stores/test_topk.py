"""conef_fl.error_stores.topk: the top-k error store."""

from __future__ import annotations

import torch

from conef_fl.error_stores.topk import TopKError


def test_topk_store_keeps_largest() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 7.0, 0.05, 0.0, 1.0])
    s = TopKError(10, ratio=0.3)
    s.assign_(x)
    assert sorted(s.indices.tolist()) == [1, 3, 6]
    est = s.decompress()
    assert est[6] == 7.0 and est[1] == -5.0 and est[0] == 0.0
    torch.testing.assert_close(s.estimate_at(torch.arange(10)), est)
