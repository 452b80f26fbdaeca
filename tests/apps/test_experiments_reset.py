"""Sketch error reset, the in-process grid's simulation study (sim.inmemory, sim.experiments): on digits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context

from conef_fl.flower.client_state import STATE_KEY
from sim import experiments as ex
from sim.inmemory import InMemoryGrid, average_error_sketches, run_inmemory

BASE = {"dataset": "digits", "partitioning": "iid", "fraction-train": 1.0, "local-epochs": 0, "local-steps": 2,
        "batch-size": 16, "local-lr": 0.2, "eval-every": 2, "num-server-rounds": 2, "seed": 0,
        "method": "conef-cs", "compressor": "random-block-k", "k-ratio": 0.1, "sketch-ratio": 0.1, "beta": 0.5}


def _tables(ctx: Context) -> dict[tuple[str, str], torch.Tensor]:
    obj = torch.load(io.BytesIO(ctx.state[STATE_KEY]["blob"]), weights_only=True)
    return {(t, s): st["table"] for t, ts in obj["worker"]["tensors"].items() for s, st in ts["stores"].items()}


def _run(tmp_path: Path, name: str, every: int, **over: object) -> InMemoryGrid:
    cfg = {**BASE, **over, "output-dir": str(tmp_path), "run-name": name}
    return run_inmemory(cfg, 4, error_reset_every=every)


def test_no_reset_leaves_the_clients_sketches_different(tmp_path: Path) -> None:
    grid = _run(tmp_path, "plain", 0)
    a, b = (_tables(c) for c in list(grid.contexts.values())[:2])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert grid.error_resets == [] and grid.error_reset_bytes() == (0, 0)


def test_reset_every_round_makes_the_sketches_equal_to_the_mean(tmp_path: Path) -> None:
    plain = _run(tmp_path, "plain", 0)
    before = [_tables(c) for c in plain.contexts.values()]
    nbytes = average_error_sketches(list(plain.contexts.values()))
    after = [_tables(c) for c in plain.contexts.values()]
    assert nbytes == sum(t.numel() * t.element_size() for t in before[0].values())
    for k in before[0]:
        mean = torch.stack([t[k].double() for t in before]).mean(0)
        assert float(mean.abs().sum()) > 0
        for t in after:
            assert torch.allclose(t[k].double(), mean, atol=1e-6)  # sum of the errors kept: n x mean

    grid = _run(tmp_path, "reset", 1)
    assert [r["train_round"] for r in grid.error_resets] == [1, 2]
    assert all(r["clients"] == 4 and r["sketch_bytes_per_client"] == nbytes for r in grid.error_resets)
    assert grid.error_reset_bytes() == (2 * 4 * nbytes, 2 * 4 * nbytes)
    a, b = (_tables(c) for c in list(grid.contexts.values())[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reset_refuses_non_sketch_stores_and_different_hashes(tmp_path: Path) -> None:
    dense = _run(tmp_path, "ef", 0, method="efsgd")
    with pytest.raises(ValueError, match="count-sketch"):
        average_error_sketches(list(dense.contexts.values()))
    one = _run(tmp_path, "s0", 0)
    other = _run(tmp_path, "s1", 0, seed=1)  # other seed: other hashes
    mixed = [next(iter(one.contexts.values())), next(iter(other.contexts.values()))]
    with pytest.raises(ValueError, match="differs in hash seed"):
        average_error_sketches(mixed)


def test_grid_option_is_validated() -> None:
    with pytest.raises(ValueError, match="error_reset_every"):
        InMemoryGrid(lambda *a: None, 2, {}, error_reset_every=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only on the in-process grid"):
        ex.execute({**BASE, "output-dir": "/nonexistent", "run-name": "x"}, 4, "flower", {"error-reset-every": 1})
    with pytest.raises(ValueError, match="unknown simulation option"):
        ex.execute({**BASE, "output-dir": "/nonexistent", "run-name": "x"}, 4, "inmemory", {"reset": 1})


def test_runner_records_the_reset_and_counts_its_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ex.METHODS, "conef-cs-90-er1", ex.MethodRun(
        "conef-cs-90-er1", "ConEF-CS 90 % + reset every round", ex.METHODS["conef-cs-90"].overrides,
        sim={"error-reset-every": 1}))
    task = ex.dataclasses.replace(ex.TASKS["digits"], base={**ex.TASKS["digits"].base, "fraction-train": 1.0})
    runs = ex.plan_grid(task, ["conef-cs-90", "conef-cs-90-er1"], [0], 2, tmp_path)
    assert [r.sim for r in runs] == [{}, {"error-reset-every": 1}]
    ex.run_all(runs, tmp_path)
    meta = json.loads((tmp_path / "conef-cs-90-er1-s0" / "experiment.json").read_text())
    assert meta["simulation"] == {"error-reset-every": 1}
    assert "simulation" not in json.loads((tmp_path / "conef-cs-90-s0" / "experiment.json").read_text())
    summ = json.loads((tmp_path / "conef-cs-90-er1-s0" / "summary.json").read_text())
    reset = summ["error_reset"]
    assert reset["resets"] == 2 and reset["uplink_bytes"] == 2 * 4 * reset["sketch_bytes_per_client"] > 0
    # same run config, other simulation option: never taken for one another
    assert ex.find_equivalent(runs[1], [tmp_path]) == tmp_path / "conef-cs-90-er1-s0"
    assert ex.find_equivalent(ex.Run(runs[1].method_id, 0, runs[1].config, 4, "x"), [tmp_path]) == \
        tmp_path / "conef-cs-90-s0"
    rows = {r["method_id"]: r for r in ex.aggregate(ex.load_runs(tmp_path))}
    plain, er = rows["conef-cs-90"], rows["conef-cs-90-er1"]
    assert er["uplink_mb_mean"] == pytest.approx(plain["uplink_mb_mean"] + reset["uplink_bytes"] / 1e6)
    assert er["uplink_percent_of_dense"] > plain["uplink_percent_of_dense"]
