"""Shared fixtures: paths to ../shared/data and skips when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
MNIST_DIR = SHARED_DATA / "mnist"
SHAKESPEARE_FILE = SHARED_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture
def mnist_dir() -> Path:
    """The MNIST IDX folder, or skip with the reason."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST_DIR} (../shared/data is not present on this machine)")
    return MNIST_DIR


@pytest.fixture
def shakespeare_file() -> Path:
    """The Tiny Shakespeare text, or skip with the reason."""
    if not SHAKESPEARE_FILE.exists():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE_FILE} (../shared/data is not present)")
    return SHAKESPEARE_FILE


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # One intra-op thread per pytest-xdist worker: the suite runs 2 workers on 2 cores, and a
    # parallel kernel whose second thread is descheduled waits a whole scheduler slice (a GRU
    # step measured 0.06 s with 1 thread and 0.62 s with 2 while the other worker ran). The
    # ClientApp and ServerApp use one thread too.
    torch.set_num_threads(1)


@pytest.fixture
def task_identity():
    """Flower's task identity set as inside a running app (creating a Message needs a run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity.node_id = 0
