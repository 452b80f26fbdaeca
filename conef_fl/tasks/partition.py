"""Federated partitioning of a task's training set with ``flwr-datasets`` partitioners.

The partitioners run on an in-memory ``datasets.Dataset`` holding only sample
indices and the column they split by, so nothing is downloaded. Nothing is
cached here; the bundled ClientApp memoises per process (``clients/task.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import warnings
from typing import Any

import numpy as np

from conef_fl.tasks.data import TaskData

logger = logging.getLogger(__name__)

__all__ = ["PARTITION_SCHEMES", "partition_indices"]

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "natural")
_LABEL_SCHEMES = ("dirichlet", "pathological")
def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def partition_indices(
    task: TaskData,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``range(task.num_train)`` into ``num_partitions`` disjoint, non-empty parts.

    Parameters
    ----------
    task : TaskData
        The task whose training set is split.
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <= task.num_train``.
    scheme : {"iid", "dirichlet", "pathological", "natural"}
        - ``"iid"``: samples shuffled with ``seed``, then ``IidPartitioner``
          (contiguous shards of near-equal size, differing by at most one).
        - ``"dirichlet"``: ``DirichletPartitioner(partition_by="label", alpha=alpha)``
          on the labels (rows shuffled with ``seed`` first). It resamples until every
          partition has at least one sample; if its 11 draws all leave a partition
          empty, the first draw is kept and each empty partition receives one sample
          taken from the currently largest partition.
        - ``"pathological"``: ``PathologicalPartitioner`` with ``classes_per_partition``
          classes per partition. Class assignment ``"first-deterministic"`` (the
          original paper's) when ``num_partitions >= num_classes``, else
          ``"deterministic"`` (partition ``p`` gets classes ``p, p+1, ...``), so that
          every class and hence every sample is used.
        - ``"natural"``: by ``task.groups`` (e.g. Shakespeare speaker roles). The
          roles are shuffled with ``seed`` and split into ``num_partitions`` buckets
          of near-equal numbers of roles (one role each when ``num_partitions`` equals
          the number of roles); ``NaturalIdPartitioner`` then splits by bucket.
    alpha : float
        Dirichlet concentration (> 0); smaller means more label skew.
    classes_per_partition : int
        Classes per partition for ``"pathological"``.
    seed : int
        Seed of all randomness; same seed, same result.

    Returns
    -------
    list of numpy.ndarray
        ``num_partitions`` sorted int64 index arrays, disjoint, covering every
        training index exactly once. The arrays are shared with the cache and
        read-only; copy one before modifying it.

    Raises
    ------
    ValueError
        Unknown scheme, out-of-range arguments, a label scheme on a text task,
        ``"natural"`` on a task without groups or with fewer groups than partitions,
        or a configuration the flwr-datasets partitioner rejects.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITION_SCHEMES)}"
        )
    num_partitions = _as_int("num_partitions", num_partitions)
    seed = _as_int("seed", seed)
    n = task.num_train
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions must be in [1, {n}] (the number of training samples of {task.name!r}), "
            f"got {num_partitions}"
        )
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a positive float, got {alpha!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite float, got {alpha!r}")
    classes_per_partition = _as_int("classes_per_partition", classes_per_partition)
    if scheme in _LABEL_SCHEMES and task.is_text:
        raise ValueError(
            f"scheme {scheme!r} splits by class label, but {task.name!r} is a text task; "
            "use 'iid' or 'natural'"
        )
    if scheme == "pathological" and not 1 <= classes_per_partition <= task.num_classes:
        raise ValueError(
            f"classes_per_partition must be in [1, {task.num_classes}] for {task.name!r}, "
            f"got {classes_per_partition}"
        )
    if scheme == "natural" and task.groups is None:
        raise ValueError(f"task {task.name!r} has no natural groups; scheme 'natural' needs task.groups")

    if scheme in _LABEL_SCHEMES:
        column = task.labels
    elif scheme == "natural":
        column = np.asarray(task.groups)
        if column.shape != (n,):
            raise ValueError(f"task.groups has shape {column.shape}, expected ({n},)")
    else:
        column = None
    if column is None:  # iid
        parts = _iid(n, num_partitions, seed)
    elif scheme == "dirichlet":
        parts = _dirichlet(column, num_partitions, alpha, seed)
    elif scheme == "pathological":
        parts = _pathological(column, num_partitions, classes_per_partition, seed)
    else:
        parts = _natural(column, num_partitions, seed)

    result = _finalise(parts, n, scheme)
    logger.debug(
        "partitioned %s (%d samples) into %d %s partitions, sizes %d..%d",
        task.name,
        n,
        num_partitions,
        scheme,
        min(p.size for p in result),
        max(p.size for p in result),
    )
    return list(result)


def _finalise(parts: list[np.ndarray], n: int, scheme: str) -> list[np.ndarray]:
    """Sort, freeze and check that ``parts`` is a partition of ``range(n)`` into non-empty sets."""
    out = []
    for p in parts:
        arr = np.sort(np.asarray(p, dtype=np.int64))
        arr.flags.writeable = False
        out.append(arr)
    counts = np.bincount(np.concatenate(out), minlength=n) if out else np.zeros(n, dtype=np.int64)
    if any(p.size == 0 for p in out) or counts.shape[0] != n or not np.all(counts == 1):
        raise RuntimeError(f"{scheme} partitioning did not produce a disjoint cover by non-empty partitions")
    return out


def _dataset(columns: dict[str, np.ndarray]) -> Any:
    import datasets  # deferred: importing datasets takes seconds

    return datasets.Dataset.from_dict({k: np.asarray(v) for k, v in columns.items()})


def _collect(partitioner: Any, num_partitions: int) -> list[np.ndarray]:
    return [
        np.asarray(partitioner.load_partition(i).with_format("numpy")[:]["idx"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def _iid(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    perm = np.random.default_rng(seed).permutation(n)
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _dataset({"idx": perm})
    return _collect(partitioner, num_partitions)


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    def run(min_partition_size: int) -> list[np.ndarray]:
        with warnings.catch_warnings():
            # It warns on every rejected draw; the fallback below handles failure.
            warnings.simplefilter("ignore", UserWarning)
            return _by_label(
                DirichletPartitioner, labels, num_partitions, seed,
                alpha=alpha, min_partition_size=min_partition_size, self_balancing=False,
            )

    try:
        return run(min_partition_size=1)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
    logger.info(
        "dirichlet(alpha=%g) left a partition empty in all draws for %d partitions; "
        "filling empty partitions with one sample each from the largest",
        alpha,
        num_partitions,
    )
    parts = [list(p) for p in run(min_partition_size=0)]
    for i in range(num_partitions):
        if not parts[i]:
            donor = max(range(num_partitions), key=lambda j: (len(parts[j]), -j))
            parts[i].append(parts[donor].pop())
    return [np.asarray(p, dtype=np.int64) for p in parts]


def _pathological(
    labels: np.ndarray, num_partitions: int, classes_per_partition: int, seed: int
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    num_classes = int(np.unique(labels).shape[0])
    if num_partitions >= num_classes:
        mode = "first-deterministic"
    elif num_partitions + classes_per_partition - 1 >= num_classes:
        mode = "deterministic"
    else:
        raise ValueError(
            f"pathological partitioning into {num_partitions} partitions of {classes_per_partition} classes "
            f"cannot use all {num_classes} classes; need num_partitions + classes_per_partition - 1 >= "
            f"{num_classes}"
        )
    return _by_label(
        PathologicalPartitioner, labels, num_partitions, seed,
        num_classes_per_partition=classes_per_partition, class_assignment_mode=mode,
    )


def _by_label(
    partitioner_cls: Any, labels: np.ndarray, num_partitions: int, seed: int, **options: Any
) -> list[np.ndarray]:
    """Run a flwr-datasets label partitioner on the sample indices, shuffled by ``seed``."""
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    partitioner = partitioner_cls(
        num_partitions=num_partitions, partition_by="label", shuffle=True, seed=seed, **options
    )
    partitioner.dataset = _dataset({"idx": perm, "label": labels[perm]})
    return _collect(partitioner, num_partitions)


def _natural(groups: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    unique, inverse = np.unique(groups, return_inverse=True)
    if unique.shape[0] < num_partitions:
        raise ValueError(
            f"natural partitioning needs at least one group per partition: the task has "
            f"{unique.shape[0]} groups but num_partitions={num_partitions}"
        )
    order = np.random.default_rng(seed).permutation(unique.shape[0])
    bucket_of_group = np.empty(unique.shape[0], dtype=np.int64)
    for bucket, members in enumerate(np.array_split(order, num_partitions)):
        bucket_of_group[members] = bucket
    partitioner = NaturalIdPartitioner(partition_by="bucket")
    partitioner.dataset = _dataset(
        {"idx": np.arange(groups.shape[0]), "bucket": bucket_of_group[inverse.reshape(-1)]}
    )
    # NaturalIdPartitioner draws a tqdm progress bar on stderr; keep it out of logs.
    with contextlib.redirect_stderr(io.StringIO()):
        return _collect(partitioner, num_partitions)
