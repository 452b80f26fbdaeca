"""conef_fl.compressors.powersgd."""

from __future__ import annotations

import pytest
import torch

from conef_fl.compressors import (
    PowerSGD,
    ScaledSign,
)
from conef_fl.compressors.powersgd import matrix_view_shape

from .helpers import randn


@pytest.mark.parametrize("shape", [(12, 9), (8, 3, 2, 5)])
def test_powersgd_exact_on_rank_r(shape: tuple[int, ...]) -> None:
    n, m = matrix_view_shape(shape)
    low = randn(n, 2, seed=1) @ randn(2, m, seed=2)
    x = low.reshape(shape)
    q = PowerSGD(rank=2)
    y = q.decompress(q.compress(x, seed=3, key="w"))
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    # rank 1 on a rank-2 matrix is lossy: the test above could fail
    q1 = PowerSGD(rank=1)
    assert (q1.decompress(q1.compress(x, key="w")) - x).norm() > 1e-2 * x.norm()


def test_powersgd_views_and_dense_fallback() -> None:
    q = PowerSGD(rank=2)
    big = q.compress(randn(10_000))  # 1-D: 100 x 100 near-square view
    assert big.meta["dense"] is False and big.arrays["p"].shape == (100, 2)
    assert big.nbytes < big.dense_nbytes
    odd = q.compress(randn(1001))  # padded view 32 x 32
    assert odd.arrays["p"].shape == (32, 2) and q.decompress(odd).shape == (1001,)
    tiny = q.compress(randn(8))
    assert tiny.meta["dense"] is True and torch.equal(q.decompress(tiny), randn(8))
    assert q.compress(randn(1, 50)).meta["dense"] is True


def test_powersgd_warm_start_state() -> None:
    u, _ = torch.linalg.qr(randn(30, 30, seed=1))
    v, _ = torch.linalg.qr(randn(20, 20, seed=2))
    spectrum = torch.tensor([10.0, 5.0, 2.0] + [0.05] * 17)
    x = (u[:, :20] * spectrum) @ v.t()
    q = PowerSGD(rank=3)
    errors = [float((q.decompress(q.compress(x, key="w")) - x).norm()) for _ in range(6)]
    assert errors[-1] < 0.9 * errors[0]  # warm start converges towards the best rank-3 fit
    assert set(q.state_dict()) == {"w"} and q.state_dict()["w"].shape == (20, 3)
    fresh = PowerSGD(rank=3)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.compress(x, key="w").arrays["p"], q.compress(x, key="w").arrays["p"])
    with pytest.raises(ValueError):
        fresh.load_state_dict({"w": torch.zeros(20, 4)})
    with pytest.raises(ValueError):
        fresh.load_state_dict({"w": torch.zeros(20)})
    with pytest.raises(ValueError):
        ScaledSign().load_state_dict({"w": torch.zeros(2)})
