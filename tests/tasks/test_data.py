"""conef_fl.tasks.data: digits, MNIST IDX files and Tiny Shakespeare, parsed and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conef_fl.tasks import (
    TaskData,
    load_task_data,
    read_idx,
)

from .helpers import (
    MNIST_DIR,
    SHAKESPEARE_DIR,
    _write_idx,
    _write_mnist,
    needs_mnist,
    needs_shakespeare,
)


def test_digits_shapes_labels_and_split(digits: TaskData) -> None:
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.groups is None
    assert float(digits.x_train.min()) >= 0.0 and float(digits.x_train.max()) == 1.0
    for y in (digits.y_train, digits.y_test):
        assert set(y.unique().tolist()) == set(range(10))
    # stratified: every class has 20 % (+- 1 sample) of its samples in the test set
    train_counts = torch.bincount(digits.y_train, minlength=10)
    test_counts = torch.bincount(digits.y_test, minlength=10)
    assert torch.all((test_counts - 0.2 * (train_counts + test_counts)).abs() <= 1)


def test_digits_split_deterministic_and_seeded(digits: TaskData) -> None:
    again = load_task_data("digits", seed=0)
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)
    other = load_task_data("digits", seed=1)
    assert other.x_test.shape == digits.x_test.shape
    assert not torch.equal(other.x_test, digits.x_test)
    small = load_task_data("digits", max_train=100)
    assert small.x_train.shape[0] == 100 and small.x_test.shape == digits.x_test.shape


def test_unknown_task_and_bad_loader_args() -> None:
    with pytest.raises(ValueError, match="digits.*mnist.*shakespeare"):
        load_task_data("cifar10")
    with pytest.raises(ValueError, match="seq_len"):
        load_task_data("shakespeare", seq_len=0)
    with pytest.raises(ValueError, match="max_train"):
        load_task_data("digits", max_train=0)


@needs_mnist
def test_mnist_parses() -> None:
    task = load_task_data("mnist")
    assert task.x_train.shape == (60000, 1, 28, 28) and task.x_test.shape == (10000, 1, 28, 28)
    assert task.y_train.shape == (60000,) and task.y_test.shape == (10000,)
    assert task.x_train.dtype == torch.float32
    assert int(task.y_train.min()) == 0 and int(task.y_train.max()) == 9
    assert set(task.y_test.unique().tolist()) == set(range(10))
    assert abs(float(task.x_train.mean())) < 0.01 and abs(float(task.x_train.std()) - 1.0) < 0.01
    # the shared data root is accepted too
    small = load_task_data("mnist", str(MNIST_DIR.parent), max_train=50)
    assert small.x_train.shape == (50, 1, 28, 28)


def test_idx_files_built_in_tmp(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    task = load_task_data("mnist", str(tmp_path))
    assert task.x_train.shape == (5, 1, 28, 28) and task.y_test.tolist() == [0, 1, 2]
    raw = read_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049)
    assert raw.dtype == np.uint8 and raw.tolist() == [0, 1, 2, 3, 4]
    plain = _write_idx(tmp_path / "plain-idx1", 2049, (2,), b"\x01\x02", compress=False)
    assert read_idx(plain, 2049).tolist() == [1, 2]


def test_idx_bad_magic_truncated_and_missing(tmp_path: Path) -> None:
    bad = _write_idx(tmp_path / "bad-magic.gz", 2049, (4, 28, 28), bytes(4 * 28 * 28))
    with pytest.raises(ValueError, match=r"bad-magic\.gz.*magic number 2049, expected 2051"):
        read_idx(bad, 2051)
    truncated = _write_idx(tmp_path / "short.gz", 2051, (4, 28, 28), bytes(3 * 28 * 28))
    with pytest.raises(ValueError, match=r"short\.gz.*2352 data bytes.*needs 3136"):
        read_idx(truncated, 2051)
    headless = _write_idx(tmp_path / "headless.gz", 2051, (), b"")
    with pytest.raises(ValueError, match=r"headless\.gz.*truncated"):
        read_idx(headless, 2051)
    not_gzip = tmp_path / "not-gzip.gz"
    not_gzip.write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match=r"not-gzip\.gz"):
        read_idx(not_gzip)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope.gz")
    # a whole data folder: a wrong file is named in the error, a missing one too
    folder = tmp_path / "mnist"
    folder.mkdir()
    _write_mnist(folder)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", 2051, (3,), bytes(3))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_task_data("mnist", str(folder))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_task_data("mnist", str(folder))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_task_data("mnist", str(tmp_path / "empty"))


@needs_shakespeare
def test_shakespeare_roles_windows_and_vocab(shakespeare: TaskData) -> None:
    task = shakespeare
    assert task.is_text and task.groups is not None and task.group_names is not None
    assert len(task.group_names) > 100
    assert np.unique(task.groups).shape[0] == len(task.group_names)
    assert task.groups.shape == (task.num_train,) and task.test_groups.shape == (task.num_test,)
    assert task.x_train.shape[1] == 80 and task.x_train.dtype == torch.int64
    assert task.num_train > 10000 and task.num_test > 1000
    # targets are the inputs shifted by one character
    assert torch.equal(task.x_train[:, 1:], task.y_train[:, :-1])
    assert torch.equal(task.x_test[:, 1:], task.y_test[:, :-1])
    # vocabulary: sorted unique characters of the whole file
    text = (SHAKESPEARE_DIR / "input.txt").read_text(encoding="utf-8")
    assert task.vocab == "".join(sorted(set(text))) and task.num_classes == len(task.vocab) == 65
    assert int(task.x_train.max()) < task.num_classes and int(task.x_train.min()) >= 0
    # a decoded window is real text of its role
    window = "".join(task.vocab[i] for i in task.x_train[0].tolist())
    assert window.replace("\n", " ").strip().split(" ")[0] in text
    other = load_task_data("shakespeare", seq_len=40)
    assert other.x_train.shape[1] == 40 and other.num_train > task.num_train
