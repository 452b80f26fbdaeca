"""The bundled apps' task code: real datasets, partitioning, small models, local training.

This package is application code, kept apart from the library core: the core
(compressors, error stores, feedback, worker, the Flower and DDP adapters)
never imports it (``tests/tasks/test_boundary.py`` checks), and a user's own
app brings its own data and model instead. Nothing here is cached between
calls; the ClientApp memoises per process in ``clients/task.py``.

Typical use in a client::

    task = load_task_data("digits")
    parts = partition_indices(task, num_partitions=100, scheme="dirichlet", alpha=0.5)
    idx = torch.from_numpy(parts[partition_id])
    model = build_model(task, seed=0)
    metrics = train_local(model, task.x_train[idx], task.y_train[idx], generator=g)
"""

from __future__ import annotations

from conef_fl.tasks.data import (
    TASK_NAMES,
    TaskData,
    default_data_dir,
    load_task_data,
    read_idx,
)
from conef_fl.tasks.models import MODEL_NAMES, build_model, count_parameters
from conef_fl.tasks.partition import PARTITION_SCHEMES, partition_indices
from conef_fl.tasks.train import check_train_device, evaluate, train_local

__all__ = [
    "MODEL_NAMES",
    "PARTITION_SCHEMES",
    "TASK_NAMES",
    "TaskData",
    "build_model",
    "check_train_device",
    "count_parameters",
    "default_data_dir",
    "evaluate",
    "load_task_data",
    "partition_indices",
    "read_idx",
    "train_local",
]
