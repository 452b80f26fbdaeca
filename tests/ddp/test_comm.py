"""``conef_fl.ddp.comm``: the communicator's collectives (gloo, 2 processes) and its support lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from conef_fl.compressors import COMPRESSORS, make_compressor
from conef_fl.ddp import comm

from .harness import WORLD, run_world


def _payloads(rank: int) -> dict[str, Any]:
    """Rank ``r`` compresses ``(r + 1) x`` with the same seed: block payloads average, top-k ones gather."""
    x = torch.arange(20, dtype=torch.float32) * (rank + 1)
    block, topk = make_compressor("random-block-k", ratio=0.25), make_compressor("top-k", ratio=0.25)
    group = comm.group_of(None)
    fut, sent = comm.allreduce_payloads([block.compress(x, seed=3, key="a"), block.compress(x[:8], seed=3)], group)
    averaged = [block.decompress(p) for p in fut.wait()]
    fut, gathered_bytes = comm.allgather_payloads([topk.compress(x, key="a"), topk.compress(-x[:8])], group)
    gathered = [[topk.decompress(p) for p in received] for received in fut.wait()]
    return {"averaged": averaged, "sent": sent, "gathered": gathered, "gathered_bytes": gathered_bytes}


def _dense(rank: int) -> dict[str, Any]:
    buffer = torch.full((6,), 1.0 + rank)
    fut, sent = comm.allreduce_dense(buffer, torch.float16, comm.group_of(None))
    out = fut.wait()
    a, b = torch.full((3,), float(rank)), torch.full((2,), rank, dtype=torch.float64)
    averaged_bytes = comm.average_([a, b], comm.group_of(None))
    return {"mean": out, "same": out is buffer, "sent": sent, "a": a, "b": b, "averaged_bytes": averaged_bytes}


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {"payloads": _payloads, "dense": _dense}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    """Every scenario's results, one dict per rank."""
    return run_world(__name__)


def test_allreduce_payloads_averages_the_values(runs: list[dict[str, Any]]) -> None:
    block = make_compressor("random-block-k", ratio=0.25)
    x = torch.arange(20, dtype=torch.float32)
    mean = (1 + WORLD) / 2
    expected = [
        block.decompress(block.compress(x * mean, seed=3, key="a")),
        block.decompress(block.compress(x[:8] * mean, seed=3)),
    ]
    for res in runs:
        for got, want in zip(res["payloads"]["averaged"], expected, strict=True):
            torch.testing.assert_close(got, want)
        assert res["payloads"]["sent"] == 4 * (5 + 2)


def test_allgather_payloads_returns_every_ranks_payloads(runs: list[dict[str, Any]]) -> None:
    topk = make_compressor("top-k", ratio=0.25)
    x = torch.arange(20, dtype=torch.float32)
    for res in runs:
        for r, received in enumerate(res["payloads"]["gathered"]):
            assert torch.equal(received[0], topk.decompress(topk.compress(x * (r + 1))))
            assert torch.equal(received[1], topk.decompress(topk.compress(-x[:8] * (r + 1))))
        assert res["payloads"]["gathered_bytes"] == 8 * (5 + 2)


def test_dense_allreduce_in_a_wire_dtype_and_average(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        d = res["dense"]
        assert d["same"] and d["sent"] == 6 * 2  # float16 on the wire, the result back in the buffer
        assert torch.equal(d["mean"], torch.full((6,), 1.5))
        assert torch.equal(d["a"], torch.full((3,), 0.5)) and torch.equal(
            d["b"], torch.full((2,), 0.5, dtype=torch.float64)
        )
        assert d["averaged_bytes"] == 3 * 4 + 2 * 8


def test_all_reducible_is_the_compressors_flag() -> None:
    assert comm.all_reducible() == tuple(sorted(n for n, c in COMPRESSORS.items() if c.all_reducible))
    assert "random-block-k" in comm.all_reducible() and "top-k" not in comm.all_reducible()
    assert not set(comm.GATHER_COMPRESSORS) & set(comm.all_reducible())
