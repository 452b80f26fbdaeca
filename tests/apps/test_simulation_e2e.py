"""End to end on Flower's real simulation engine: few clients, few rounds, nothing left running."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conef_fl.feedback import make_compressor_for
from conef_fl.registry import method_config
from conef_fl.tasks import build_model, load_task_data
from sim.flower_runtime import descendants
from sim.run import run_simulation

pytestmark = pytest.mark.slow


def test_simulation_improves_model_and_counts_bytes(tmp_path: Path) -> None:
    before = set(descendants(os.getpid()))  # e.g. multiprocessing's resource tracker from earlier tests
    overrides = {
        "num-server-rounds": 3,
        "fraction-train": 0.5,
        "method": "conef-cs",
        "k-ratio": 0.25,
        "local-epochs": 2,
        "output-dir": str(tmp_path),
        "run-name": "e2e",
    }
    summary = run_simulation(overrides, num_supernodes=4, timeout=400, log_file=tmp_path / "flwr.log")
    # nothing this test started is still running (SuperLink, ServerApp, Ray, actors)
    assert set(descendants(os.getpid())) - before == set()
    rows = json.loads((tmp_path / "e2e" / "rounds.json").read_text())
    assert len(rows) == 3 and all(r["accepted"] == 2 and r["rejected"] == 0 for r in rows)
    # the global model improves: test loss falls from the initial model's to the final one
    model = build_model(load_task_data("digits"), seed=0)
    initial_loss = 2.3  # ln(10) for an untrained 10-class model, ±0.05
    assert rows[-1]["loss"] < initial_loss - 0.2, rows
    # uplink bytes equal what the compressor claims for this model
    q = make_compressor_for(method_config("conef-cs", k_ratio=0.25))
    per_client = sum(q.expected_nbytes(tuple(v.shape)) for v in model.state_dict().values())
    assert all(r["uplink_payload_bytes_total"] == 2 * per_client for r in rows)
    assert summary["uplink_bytes_total"] == 6 * per_client
    assert summary["error_memory_saving_vs_efsgd"] > 0.85
    assert (tmp_path / "e2e" / "model.pt").exists() and (tmp_path / "e2e" / "rounds.csv").exists()
