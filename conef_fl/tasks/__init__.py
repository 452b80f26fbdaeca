"""Federated learning tasks: real datasets, partitioning, small models, local training.

Typical use in a client::

    task = load_task_data("digits")
    parts = partition_indices(task, num_partitions=100, scheme="dirichlet", alpha=0.5)
    idx = torch.from_numpy(parts[partition_id])
    model = build_model(task, seed=0)
    ndarrays_to_model(model, global_arrays)
    metrics = train_local(model, task.x_train[idx], task.y_train[idx], generator=g)
"""

from __future__ import annotations

from conef_fl.tasks.data import (
    TASK_NAMES,
    TaskData,
    clear_data_cache,
    default_data_dir,
    load_task_data,
    load_task_data_shared,
    read_idx,
)
from conef_fl.tasks.models import MODEL_NAMES, build_model, count_parameters
from conef_fl.tasks.params import get_flat_params, model_to_ndarrays, ndarrays_to_model, set_flat_params
from conef_fl.tasks.partition import PARTITION_SCHEMES, clear_partition_cache, partition_indices
from conef_fl.tasks.train import check_train_device, evaluate, train_local

__all__ = [
    "MODEL_NAMES",
    "PARTITION_SCHEMES",
    "TASK_NAMES",
    "TaskData",
    "build_model",
    "check_train_device",
    "clear_caches",
    "clear_data_cache",
    "clear_partition_cache",
    "count_parameters",
    "default_data_dir",
    "evaluate",
    "get_flat_params",
    "load_task_data",
    "load_task_data_shared",
    "model_to_ndarrays",
    "ndarrays_to_model",
    "partition_indices",
    "read_idx",
    "set_flat_params",
    "train_local",
]


def clear_caches() -> None:
    """Empty this process's caches of parsed data files and of partitionings."""
    clear_data_cache()
    clear_partition_cache()
