"""conef_fl.tasks.partition: iid, Dirichlet, pathological and natural partitions."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conef_fl.tasks import (
    TaskData,
    partition_indices,
)

from .helpers import (
    _assert_partition,
    _label_skew,
    _text_task,
    needs_shakespeare,
)


@pytest.mark.parametrize(
    ("scheme", "k", "kwargs"),
    [
        ("iid", 10, {}),
        ("dirichlet", 10, {"alpha": 0.5}),
        ("dirichlet", 50, {"alpha": 0.05}),
        ("pathological", 20, {"classes_per_partition": 2}),
        ("pathological", 7, {"classes_per_partition": 4}),
    ],
)
def test_label_partitions_cover_and_are_seeded(digits: TaskData, scheme: str, k: int, kwargs: dict) -> None:
    parts = partition_indices(digits, k, scheme, seed=0, **kwargs)
    _assert_partition(parts, digits.num_train, k)
    again = partition_indices(digits, k, scheme, seed=0, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(digits, k, scheme, seed=1, **kwargs)
    _assert_partition(other, digits.num_train, k)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    if scheme == "pathological":
        labels = digits.y_train.numpy()
        assert all(np.unique(labels[p]).shape[0] <= kwargs["classes_per_partition"] for p in parts)


def test_dirichlet_small_alpha_is_label_skewed(digits: TaskData) -> None:
    iid = _label_skew(digits, partition_indices(digits, 10, "iid"))
    skewed = _label_skew(digits, partition_indices(digits, 10, "dirichlet", alpha=0.1))
    assert iid < 0.15
    assert skewed > 0.4 and skewed > 3 * iid


def test_dirichlet_fills_partitions_left_empty(digits: TaskData, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="conef_fl.tasks.partition"):
        parts = partition_indices(digits, 300, "dirichlet", alpha=0.05, seed=0)
    assert "filling empty partitions" in caplog.text  # every Dirichlet draw left one empty
    _assert_partition(parts, digits.num_train, 300)
    assert _label_skew(digits, parts) > 0.6


def test_thousand_iid_partitions_of_digits(digits: TaskData) -> None:
    parts = partition_indices(digits, 1000, "iid", seed=0)
    _assert_partition(parts, digits.num_train, 1000)
    assert {p.size for p in parts} == {1, 2}
    assert partition_indices(digits, 1000, "iid", seed=0)[999].tolist() == parts[999].tolist()
    with pytest.raises(ValueError):
        parts[0][0] = 5  # cached results are read-only


def test_natural_partitions_synthetic_groups() -> None:
    task = _text_task(num_groups=6, per_group=5)
    parts = partition_indices(task, 6, "natural", seed=0)
    _assert_partition(parts, task.num_train, 6)
    assert sorted(np.unique(task.groups[p]).shape[0] for p in parts) == [1] * 6
    three = partition_indices(task, 3, "natural", seed=0)
    _assert_partition(three, task.num_train, 3)
    # roles are never split across partitions
    assert all(
        np.isin(task.groups[p], np.unique(task.groups[q]), invert=True).all()
        for p in three
        for q in three
        if p is not q
    )
    other = partition_indices(task, 3, "natural", seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(three, other, strict=True))
    iid = partition_indices(task, 4, "iid", seed=0)
    _assert_partition(iid, task.num_train, 4)


@needs_shakespeare
def test_natural_partitions_shakespeare(shakespeare: TaskData) -> None:
    k = 50
    parts = partition_indices(shakespeare, k, "natural", seed=0)
    _assert_partition(parts, shakespeare.num_train, k)
    again = partition_indices(shakespeare, k, "natural", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(shakespeare, k, "natural", seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    group_of_part = [set(np.unique(shakespeare.groups[p]).tolist()) for p in parts]
    assert sum(len(g) for g in group_of_part) == len(shakespeare.group_names)  # roles never split
    n_roles = len(shakespeare.group_names)
    with pytest.raises(ValueError, match=f"{n_roles} groups"):
        partition_indices(shakespeare, n_roles + 1, "natural")


def test_partition_bad_args(digits: TaskData) -> None:
    text = _text_task()
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(digits, 0)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(digits, digits.num_train + 1)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(digits, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(digits, 10, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="iid.*dirichlet.*pathological.*natural"):
        partition_indices(digits, 10, "by-label")
    with pytest.raises(ValueError, match="classes_per_partition"):
        partition_indices(digits, 10, "pathological", classes_per_partition=11)
    with pytest.raises(ValueError, match="cannot use all 10 classes"):
        partition_indices(digits, 5, "pathological", classes_per_partition=2)
    with pytest.raises(ValueError, match="no natural groups"):
        partition_indices(digits, 10, "natural")
    for scheme in ("dirichlet", "pathological"):
        with pytest.raises(ValueError, match="text task"):
            partition_indices(text, 2, scheme)
    with pytest.raises(ValueError, match="6 groups"):
        partition_indices(text, 7, "natural")
