"""The experiment runner (sim.experiments) on digits: outputs, resume, --only, the β study.

One grid is run once per module and only read; a test that runs the CLI on a
grid again works on its own copy. Which runs execute is observed by recording
the calls of :func:`sim.experiments.execute` and by marking the finished
summaries, never by file times.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sim import experiments as ex

FAST = ["--task", "digits", "--rounds", "2", "--quiet"]
PLOTS = ("accuracy_vs_round.png", "accuracy_vs_uplink.png", "memory_per_client.png")
GRID_RUNS = ("sgd-s0", "conef-cs-90-s0")
MARK = "test-mark"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished two-method grid; tests read it, never write to it (see :func:`grid_copy`): checked at the end."""
    out = tmp_path_factory.mktemp("grid")
    assert ex.main([*FAST, "--out", str(out), "--methods", "sgd,conef-cs-90"]) == 0
    before = _contents(out)
    yield out
    assert _contents(out) == before, "a test wrote to the shared grid"


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def grid_copy(grid: Path, tmp_path: Path) -> Path:
    """This test's own copy of the grid, each finished summary marked (a re-run replaces the mark)."""
    out = tmp_path / "grid"
    shutil.copytree(grid, out)
    for run in GRID_RUNS:
        path = out / run / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), MARK: True}))
    return out


@pytest.fixture
def executed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The run names :func:`sim.experiments.execute` is called with from now on (the real runs still happen)."""
    calls: list[str] = []
    real: Callable[..., dict[str, Any]] = ex.execute

    def spy(cfg: dict[str, Any], num_nodes: int) -> dict[str, Any]:
        calls.append(str(cfg["run-name"]))
        return real(cfg, num_nodes)

    monkeypatch.setattr(ex, "execute", spy)
    return calls


def _marked(out: Path, run: str) -> bool:
    return bool(json.loads((out / run / "summary.json").read_text()).get(MARK))


def test_grid_writes_runs_tables_and_plots(grid: Path) -> None:
    for run in ("sgd-s0", "conef-cs-90-s0"):
        for f in ("rounds.json", "rounds.csv", "summary.json", "experiment.json"):
            assert (grid / run / f).exists(), f"{run}/{f}"
        cfg = json.loads((grid / run / "experiment.json").read_text())["run_config"]
        assert cfg["num-server-rounds"] == 2 and cfg["seed"] == 0
        rounds = json.loads((grid / run / "rounds.json").read_text())
        summary = json.loads((grid / run / "summary.json").read_text())
        assert all(r["round_seconds"] > 0 for r in rounds)  # each round's own time, kept across a resume
        assert summary["rounds_seconds_total"] == pytest.approx(sum(r["round_seconds"] for r in rounds))
    for f in ("results.md", "results.json", *PLOTS):
        assert (grid / f).stat().st_size > 0, f
    res = json.loads((grid / "results.json").read_text())
    rows = {r["method_id"]: r for r in res["rows"]}
    assert set(rows) == {"sgd", "conef-cs-90"}
    assert rows["sgd"]["uplink_percent_of_dense"] == pytest.approx(100.0)
    assert rows["conef-cs-90"]["uplink_percent_of_dense"] <= 10.0 + 1e-6
    assert rows["conef-cs-90"]["memory_saving_percent_vs_efsgd"] == pytest.approx(90.0, abs=0.5)
    assert 0.0 <= rows["sgd"]["final_accuracy_mean"] <= 100.0
    md = (grid / "results.md").read_text()
    assert "| SGD (dense FedAvg) |" in md and "| ConEF-CS 90 % |" in md and "uplink % of dense" in md


def test_resume_skips_finished_runs(grid_copy: Path, executed: list[str]) -> None:
    assert ex.main([*FAST, "--out", str(grid_copy), "--methods", "sgd,conef-cs-90"]) == 0
    assert executed == []
    assert all(_marked(grid_copy, r) for r in GRID_RUNS)  # both summaries are the ones written before
    rows = json.loads((grid_copy / "results.json").read_text())["rows"]
    assert {r["method_id"] for r in rows} == {"sgd", "conef-cs-90"}  # the report is rebuilt from them


def test_resume_runs_what_is_missing(grid_copy: Path, executed: list[str]) -> None:
    (grid_copy / "conef-cs-90-s0" / "summary.json").unlink()  # as if the run had been killed before its end
    assert ex.main([*FAST, "--out", str(grid_copy), "--methods", "sgd,conef-cs-90"]) == 0
    assert executed == ["conef-cs-90-s0"]
    assert _marked(grid_copy, "sgd-s0")
    assert not _marked(grid_copy, "conef-cs-90-s0") and (grid_copy / "conef-cs-90-s0" / "summary.json").exists()


def test_only_reruns_one_method(grid_copy: Path, executed: list[str]) -> None:
    assert ex.main([*FAST, "--out", str(grid_copy), "--only", "conef-cs-90", "--force"]) == 0
    assert executed == ["conef-cs-90-s0"]
    assert _marked(grid_copy, "sgd-s0")  # left alone
    assert not _marked(grid_copy, "conef-cs-90-s0")  # written again by the new run
    rows = json.loads((grid_copy / "results.json").read_text())["rows"]
    assert {r["method_id"] for r in rows} == {"sgd", "conef-cs-90"}  # the report still covers both


def test_only_adds_a_missing_method(tmp_path: Path, executed: list[str]) -> None:
    assert ex.main([*FAST, "--out", str(tmp_path), "--only", "efsgd", "--rounds", "1"]) == 0
    assert executed == ["efsgd-s0"]
    assert (tmp_path / "efsgd-s0" / "summary.json").exists()
    assert not (tmp_path / "sgd-s0").exists()


def test_plan_grid_seeds_and_ids(tmp_path: Path) -> None:
    task = ex.TASKS["mnist"]
    runs = ex.plan_grid(task, ["sgd", "ef-sign"], [0, 1, 2], 5, tmp_path)
    assert [r.name for r in runs] == ["sgd-s0", "ef-sign-s0", "sgd-s1", "sgd-s2"]  # extra seeds: main methods only
    cfg = runs[0].config
    assert cfg["method"] == "sgd" and cfg["partitioning"] == "dirichlet" and cfg["num-server-rounds"] == 5
    with pytest.raises(SystemExit):
        ex.main(["--task", "digits", "--out", str(tmp_path / "unused"), "--methods", "nope"])


def test_aggregate_mean_std_and_delta() -> None:
    def run(mid: str, seed: int, acc: float, mem: float) -> dict[str, object]:
        s = {"final_accuracy": acc, "best_accuracy": acc, "final_loss": 0.5, "wall_seconds": 10.0,
             "uplink_bytes_total": 1e6, "dense_fedavg_uplink_bytes_total": 1e7, "uplink_fraction_of_dense": 0.1,
             "client_error_state_bytes": mem, "efsgd_error_state_bytes": 1000.0, "rounds": 3}
        return {"method_id": mid, "seed": seed, "summary": s, "rounds": [], "run_config": {}}

    rows = ex.aggregate([run("efsgd", 0, 0.90, 1000.0), run("efsgd", 1, 0.92, 1000.0),
                         run("conef-cs-90", 0, 0.89, 100.0), run("conef-cs-90", 1, 0.89, 100.0)], text=True)
    ef, cs = rows
    assert ef["final_accuracy_mean"] == pytest.approx(91.0) and ef["final_accuracy_std"] == pytest.approx(math.sqrt(2))
    assert cs["delta_vs_efsgd_points"] == pytest.approx(-2.0)
    assert cs["memory_saving_percent_vs_efsgd"] == pytest.approx(90.0)
    assert cs["perplexity_mean"] == pytest.approx(math.exp(0.5))


def test_beta_study_picks_smallest_ratio(tmp_path: Path) -> None:
    table = ex.beta_study(ex.TASKS["digits"], tmp_path, betas=[0.9, 0.5], ladder=[0.1, 0.5], rounds=1,
                          tolerance=100.0)
    assert [r["smallest_sketch_ratio"] for r in table["rows"]] == [0.1, 0.1]  # anything is within 100 points
    assert (tmp_path / "beta_study.md").exists() and (tmp_path / "beta_study.json").exists()
    strict = ex.beta_study(ex.TASKS["digits"], tmp_path, betas=[0.9], ladder=[0.1, 0.5], rounds=1, tolerance=-100.0)
    assert strict["rows"][0]["smallest_sketch_ratio"] is None  # nothing is 100 points above EFSGD
    assert [t["ratio"] for t in strict["rows"][0]["tried"]] == [0.1, 0.5]


def test_beta_study_exhaustive_runs_every_pair_and_keeps_the_smallest(tmp_path: Path) -> None:
    table = ex.beta_study(ex.TASKS["digits"], tmp_path, betas=[0.9], ladder=[0.1, 0.5], rounds=1,
                          tolerance=100.0, exhaustive=True)
    row = table["rows"][0]
    assert [t["ratio"] for t in row["tried"]] == [0.1, 0.5]  # both ran although 0.1 already passes
    assert row["smallest_sketch_ratio"] == 0.1
    assert (tmp_path / "cs-b0.9-w0.5-s0" / "summary.json").exists()


def test_beta_study_reuses_grid_runs(grid: Path, tmp_path: Path) -> None:
    table = ex.beta_study(ex.TASKS["digits"], tmp_path, betas=[0.5], ladder=[0.1], rounds=2, tolerance=100.0,
                          reuse=[grid])
    tried = table["rows"][0]["tried"]
    assert tried[0]["run"] == str(grid / "conef-cs-90-s0")  # same config as the grid's ConEF-CS 90 % run
    assert not (tmp_path / "cs-b0.5-w0.1-s0").exists()
    assert (tmp_path / "efsgd-s0" / "summary.json").exists()


def test_grid_copies_equivalent_runs(grid: Path, tmp_path: Path) -> None:
    assert ex.main([*FAST, "--out", str(tmp_path), "--methods", "conef-cs-90", "--reuse", str(grid)]) == 0
    meta = json.loads((tmp_path / "conef-cs-90-s0" / "experiment.json").read_text())
    assert meta["copied_from"] == str(grid / "conef-cs-90-s0")
    assert meta["run_config"]["output-dir"] == str(tmp_path.resolve())
    assert (tmp_path / "results.md").exists()


def test_highlight_plot_draws_only_the_named_methods_present(grid: Path, tmp_path: Path) -> None:
    from sim import plots

    runs = ex.load_runs(grid)
    path = plots.plot_highlight(runs, {"sgd": "SGD"}, ["sgd", "not-run"], tmp_path / "main.png")
    assert path == tmp_path / "main.png" and path.stat().st_size > 0
    assert plots.plot_highlight(runs, {}, ["not-run"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
