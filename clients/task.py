"""The ClientApp's settings and data: which partition this node trains on, read from its contexts."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from flwr.app import Context

from clients.partition_cache import cached_partition_indices
from conef_fl.app_config import KEYS, NODE, NODE_ONLY_KEYS, read_app_config
from conef_fl.tasks import TaskData, load_task_data


def client_config(context: Context) -> Any:
    """The app config as this node sees it: run config, then the node config's per-node keys.

    Raises
    ------
    ValueError
        Naming the key (as typed) and where it came from.
    """
    node = {k: v for k, v in context.node_config.items() if k in KEYS and KEYS[k].reader == NODE}
    run = read_app_config(context.run_config, where="run config")
    if not node:
        return run
    return read_app_config(context.run_config, node, where="node config")


def partition_of(context: Context, cfg: Any) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of this node: node config first, then the run config.

    Flower's simulation sets both in every node's config; on real SuperNodes pass
    ``--node-config "partition-id=3 num-partitions=10"``.
    """
    node = context.node_config
    num = node.get("num-partitions", cfg.num_partitions or None)
    pid = node.get("partition-id")
    if pid is None or num is None:
        raise ValueError(
            "this node has no partition: pass --node-config \"partition-id=<i> num-partitions=<n>\" to the "
            "SuperNode (Flower's simulation sets both)"
        )
    pid = NODE_ONLY_KEYS["partition-id"].check("partition-id", pid)
    num = KEYS["num-partitions"].spec.check("num-partitions", num)
    if not 0 <= pid < num:
        raise ValueError(f"partition-id={pid} is out of range; allowed: 0..{num - 1} (num-partitions={num})")
    return pid, num


class _ProcessMemo:
    """This process's loaded tasks and partitionings, keyed by every setting that determines them.

    In a simulation one process serves many virtual clients, and the ClientApp runs once
    per message: the data is parsed and partitioned once per process, not once per client.
    A deployment starts a new process per message, so the partitions also go through the
    on-disk cache of :mod:`clients.partition_cache` (``CONEF_FL_PARTITION_CACHE``).
    The key holds every input of the result, so the memo never changes one and no caller
    (test or app) ever has to reset it. The data files are assumed not to change while a
    run's process lives. Returned tensors are shared: callers must not modify them.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self._max = max_entries
        self._tasks: dict[tuple[Any, ...], TaskData] = {}
        self._parts: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def task(self, cfg: Any) -> TaskData:
        key = (cfg.dataset, cfg.data_dir or None, cfg.seed)
        with self._lock:
            if key not in self._tasks:
                self._evict(self._tasks)
                self._tasks[key] = load_task_data(cfg.dataset, cfg.data_dir or None, seed=cfg.seed)
            return self._tasks[key]

    def partitions(self, cfg: Any, num_partitions: int) -> list[np.ndarray]:
        key = (cfg.dataset, cfg.data_dir or None, cfg.seed, num_partitions, cfg.partitioning, cfg.dirichlet_alpha)
        task = self.task(cfg)
        with self._lock:
            if key not in self._parts:
                self._evict(self._parts)
                self._parts[key] = cached_partition_indices(
                    task, num_partitions, cfg.partitioning, alpha=cfg.dirichlet_alpha, seed=cfg.seed,
                    dataset=cfg.dataset, data_dir=cfg.data_dir or None,
                )
            return self._parts[key]

    def _evict(self, table: dict) -> None:
        while len(table) >= self._max:
            table.pop(next(iter(table)))


_MEMO = _ProcessMemo()


def load_partition(cfg: Any, partition_id: int, num_partitions: int) -> tuple[TaskData, torch.Tensor, torch.Tensor]:
    """The task and this partition's training inputs and labels (memoised per process, see :class:`_ProcessMemo`)."""
    task = _MEMO.task(cfg)
    parts = _MEMO.partitions(cfg, num_partitions)
    idx = torch.tensor(parts[partition_id], dtype=torch.long)
    return task, task.x_train.index_select(0, idx), task.y_train.index_select(0, idx)
