"""Shared fixtures: paths to ../shared/data and skips when it is missing; a private partition cache and Ray folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
MNIST_DIR = SHARED_DATA / "mnist"
SHAKESPEARE_FILE = SHARED_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session", autouse=True)
def _private_partition_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the ClientApp's on-disk partition cache at this worker's temp folder.

    The tests (and the SuperNodes and ClientApps they start, which inherit the
    environment) never read or write the user's real cache, and the deployments of one
    worker share their partitions as a user's runs would.
    """
    from clients.partition_cache import ENV_VAR

    folder = tmp_path_factory.mktemp("partition-cache")
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = before


@pytest.fixture(scope="session", autouse=True)
def _private_ray_temp_dir() -> Iterator[Path]:
    """Give every Ray instance the tests start (in process, or in the SuperLinks, SuperNodes and
    app processes they launch, which inherit the environment) a temp folder of this worker,
    removed at the end: Ray would otherwise leave a session folder in /tmp/ray per simulation.

    A short path under the system temp folder (``RAY_TMPDIR``): Ray's socket paths below a
    pytest ``tmp_path`` exceed the 107-byte AF_UNIX limit and Ray hangs.
    """
    folder = Path(tempfile.mkdtemp(prefix="cf-ray-"))
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = before
    shutil.rmtree(folder, ignore_errors=True)


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
