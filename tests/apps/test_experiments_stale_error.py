"""sim.stale_error: matched-round comparison, mean ± std over seeds and paired differences (synthetic folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim import stale_error as se


def _run(root: Path, name: str, accs: dict[int, float], rounds: int = 40) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "experiment.json").write_text(json.dumps({"run_config": {"num-server-rounds": rounds}, "engine": "inmemory"}))
    (d / "summary.json").write_text("{}")
    (d / "rounds.json").write_text(json.dumps([{"round": r, "accuracy": a / 100} for r, a in accs.items()]))


def test_pairs_mean_std_and_common_seeds(tmp_path: Path) -> None:
    _run(tmp_path, "conef-cs-90-s0", {20: 50.0, 40: 90.0})
    _run(tmp_path, "conef-cs-90-s1", {20: 50.0, 40: 92.0})
    _run(tmp_path, "conef-cs-90-s2", {20: 50.0, 40: 99.0})   # no partner seed: left out of the pair
    _run(tmp_path, "efsgd-s0", {20: 50.0, 40: 80.0})
    _run(tmp_path, "efsgd-s1", {20: 50.0, 40: 86.0})
    out = tmp_path / "report"
    assert se.main(["--setting", f"full={tmp_path}", "--methods", "efsgd,conef-cs-90",
                    "--pairs", "conef-cs-90:efsgd", "--out", str(out)]) == 0
    res = json.loads((out / "stale_error.json").read_text())["results"]["full"]
    cs = res["methods"]["conef-cs-90"]
    assert cs["accuracy_at_horizon"] == pytest.approx(281 / 3)
    assert cs["accuracy_at_horizon_std"] == pytest.approx(4.7258, abs=1e-3)  # stdev of 90, 92, 99
    (pair,) = res["pairs"]
    assert pair["seeds"] == [0, 1]
    assert pair["diff_per_seed"] == pytest.approx([10.0, 6.0])
    assert pair["diff_mean"] == pytest.approx(8.0) and pair["diff_std"] == pytest.approx(2.8284, abs=1e-3)
    md = (out / "stale_error.md").read_text()
    assert "+8.00 ± 2.83" in md and "93.67 ± 4.73" in md and "Engine: inmemory" in md


def test_finished_only_leaves_out_runs_in_progress(tmp_path: Path) -> None:
    import torch

    _run(tmp_path, "efsgd-s0", {20: 50.0, 40: 80.0})
    d = tmp_path / "efsgd-s1"  # in progress: a checkpoint of round 20, no summary
    d.mkdir()
    (d / "experiment.json").write_text(json.dumps({"run_config": {"num-server-rounds": 40}}))
    torch.save({"strategy": {"history": [{"round": 20}]}, "evaluations": {20: {"accuracy": 0.6}}}, d / "checkpoint.pt")
    assert [(r["seed"], r["finished"]) for r in se.load([tmp_path], ["efsgd"])] == [(0, True), (1, False)]
    assert [r["seed"] for r in se.load([tmp_path], ["efsgd"], finished_only=True)] == [0]


def test_bad_pairs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        se.main(["--setting", f"a={tmp_path}", "--methods", "efsgd", "--pairs", "efsgd", "--out", str(tmp_path)])
