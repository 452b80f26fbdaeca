"""Every task of the experiment runner plans valid run configs (the app's schema accepts them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conef_fl.app_config import read_app_config
from conef_fl.tasks import build_model, count_parameters
from sim import experiments as ex


@pytest.mark.parametrize("name", sorted(ex.TASKS))
def test_task_run_configs_are_valid(name: str, tmp_path: Path) -> None:
    task = ex.TASKS[name]
    runs = ex.plan_grid(task, list(task.methods), list(task.seeds), task.rounds, tmp_path)
    assert runs
    for run in runs:
        cfg = read_app_config(run.config)
        assert cfg.num_server_rounds == task.rounds


def test_language_task_is_the_small_gru_on_ten_clients(tmp_path: Path) -> None:
    task = ex.TASKS["shakespeare-gru"]
    assert task.text and task.num_nodes == 10
    assert set(task.methods) == {"sgd", "efsgd", "conef-cs-60", "conef-cs-90"}
    cfg = read_app_config(ex.plan_grid(task, ["sgd"], [0], task.rounds, tmp_path)[0].config)
    assert cfg.model == "char-gru" and cfg.partitioning == "natural"
    assert count_parameters(build_model("shakespeare", cfg.model)) == 65_489
