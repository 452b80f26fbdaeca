"""Shared helpers of the tests of conef_fl.tasks: data locations, generators, small synthetic tasks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from conef_fl.tasks import (
    TaskData,
    default_data_dir,
)

MNIST_DIR = default_data_dir("mnist")


SHAKESPEARE_DIR = default_data_dir("shakespeare")


HAS_MNIST = all(
    (MNIST_DIR / f).is_file()
    for f in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
)


HAS_SHAKESPEARE = (SHAKESPEARE_DIR / "input.txt").is_file()


needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST IDX files not found in {MNIST_DIR}")


needs_shakespeare = pytest.mark.skipif(
    not HAS_SHAKESPEARE, reason=f"Tiny Shakespeare input.txt not found in {SHAKESPEARE_DIR}"
)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _text_task(num_groups: int = 6, per_group: int = 5, seq_len: int = 7, vocab: int = 11) -> TaskData:
    """A small synthetic text task with natural groups."""
    gen = _gen(3)
    n = num_groups * per_group
    codes = torch.randint(0, vocab, (n, seq_len + 1), generator=gen)
    return TaskData(
        name="synthetic-text",
        x_train=codes[:, :-1].contiguous(),
        y_train=codes[:, 1:].contiguous(),
        x_test=codes[:4, :-1].contiguous(),
        y_test=codes[:4, 1:].contiguous(),
        num_classes=vocab,
        groups=np.repeat(np.arange(num_groups), per_group),
    )


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], data: bytes, compress: bool = True) -> Path:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(header + data)
    return path


def _write_mnist(folder: Path, n_train: int = 5, n_test: int = 3) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28), images.tobytes())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), labels.tobytes())


def _assert_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(p.size > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert allidx.shape[0] == n and np.array_equal(np.sort(allidx), np.arange(n))


def _label_skew(task: TaskData, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    labels = task.y_train.numpy()
    glob = np.bincount(labels, minlength=10) / labels.shape[0]
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / p.size - glob).sum() for p in parts]))
