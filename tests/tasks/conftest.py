"""Fixtures of the tests of conef_fl.tasks: one torch thread, the digits and Tiny Shakespeare tasks."""

from __future__ import annotations

import pytest
import torch

from conef_fl.tasks import TaskData, load_task_data

from .helpers import HAS_SHAKESPEARE, SHAKESPEARE_DIR


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These tiny models run faster on one thread (and the test machine has two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_task_data("digits")


@pytest.fixture(scope="module")
def shakespeare() -> TaskData:
    if not HAS_SHAKESPEARE:
        pytest.skip(f"Tiny Shakespeare input.txt not found in {SHAKESPEARE_DIR}")
    return load_task_data("shakespeare")
