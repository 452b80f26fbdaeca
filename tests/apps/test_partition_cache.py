"""The ClientApp's on-disk partition cache: same partitions as computing them, hostile files ignored."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

import clients.partition_cache as pc
from clients.partition_cache import ENV_VAR, cache_dir, cache_key, cache_path, cached_partition_indices
from clients.task import _ProcessMemo
from conef_fl.app_config import read_app_config
from conef_fl.tasks import load_task_data, partition_indices

NUM = 5


@pytest.fixture(scope="module")
def task():
    return load_task_data("digits", seed=0)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache folder through the environment variable (never the user's cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(ENV_VAR, str(folder))
    return folder


def _cached(task, scheme: str = "dirichlet", alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    return cached_partition_indices(task, NUM, scheme, alpha=alpha, seed=seed, dataset="digits", data_dir=None)


def _file(task, folder: Path, scheme: str = "dirichlet", alpha: float = 0.5, seed: int = 0) -> Path:
    return cache_path(folder, cache_key(task, NUM, scheme, alpha=alpha, seed=seed, dataset="digits", data_dir=None))


def _no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("partition_indices was called: the cache was not used")

    monkeypatch.setattr(pc, "partition_indices", fail)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == np.int64 and not x.flags.writeable
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_cached_partitions_equal_computed_ones(task, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                               scheme: str) -> None:
    expected = partition_indices(task, NUM, scheme, alpha=0.5, seed=0)
    _same(_cached(task, scheme), expected)  # computed, then written
    assert _file(task, cache, scheme).is_file()
    _no_compute(monkeypatch)
    _same(_cached(task, scheme), expected)  # read back
    assert [p.name for p in cache.iterdir()] == [_file(task, cache, scheme).name]  # no temporary file left


def _valid_words(task, folder: Path) -> np.ndarray:
    _cached(task)
    return np.load(_file(task, folder), allow_pickle=False)


def _hostile(kind: str, words: np.ndarray, path: Path) -> None:
    size = path.stat().st_size  # garbage and pickles of the valid size reach np.load past the size check
    if kind == "garbage":
        path.write_bytes((b"\x93NUMPY not really" * size)[:size])
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:-800])
    elif kind == "pickle":
        np.save(path, np.array([{"x": 1}] * 3, dtype=object), allow_pickle=True)
        path.write_bytes(path.read_bytes().ljust(size, b"\0"))
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(list(range(words.size))))
    elif kind == "wrong-dtype":
        np.save(path, words.astype(np.float64))
    elif kind == "swapped-indices":  # a plausible partition, but not the one written: the digest catches it
        w = words.copy()
        w[-1], w[20] = w[20], w[-1]
        np.save(path, w)
    elif kind == "huge":
        np.save(path, np.zeros(words.size * 4, dtype=np.int64))
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickle", "raw-pickle", "wrong-dtype", "swapped-indices",
                                  "huge", "directory"])
def test_a_corrupt_or_hostile_file_is_ignored_and_replaced(task, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, kind: str) -> None:
    expected = partition_indices(task, NUM, "dirichlet", alpha=0.5, seed=0)
    path = _file(task, cache)
    _hostile(kind, _valid_words(task, cache), path)
    with caplog.at_level(logging.WARNING, logger=pc.__name__):
        _same(_cached(task), expected)
    assert "ignoring the partition cache file" in caplog.text
    if kind == "directory":  # cannot be replaced by a file: the warning says so, the client still trains
        assert "could not write" in caplog.text
        return
    _no_compute(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=pc.__name__):
        _same(_cached(task), expected)  # the replacement is valid
    assert not caplog.text
    assert sorted(p.name for p in cache.iterdir()) == [path.name]


def test_a_file_for_another_key_is_refused(task, cache: Path) -> None:
    _cached(task, alpha=0.5)
    other = _file(task, cache, alpha=2.0)
    other.write_bytes(_file(task, cache, alpha=0.5).read_bytes())  # renamed into alpha=2.0's place
    _same(_cached(task, alpha=2.0), partition_indices(task, NUM, "dirichlet", alpha=2.0, seed=0))


def test_the_key_separates_alphas_and_seeds(task, cache: Path) -> None:
    runs = {(a, s): _cached(task, alpha=a, seed=s) for a, s in [(0.5, 0), (2.0, 0), (0.5, 1)]}
    assert len({_file(task, cache, alpha=a, seed=s) for a, s in runs}) == 3
    assert len(list(cache.iterdir())) == 3
    for (a, s), parts in runs.items():
        _same(parts, partition_indices(task, NUM, "dirichlet", alpha=a, seed=s))
    assert not np.array_equal(runs[0.5, 0][0], runs[2.0, 0][0])
    assert not np.array_equal(runs[0.5, 0][0], runs[0.5, 1][0])


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none"])
def test_the_environment_variable_disables_it(task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              value: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() is None
    _same(_cached(task), partition_indices(task, NUM, "dirichlet", alpha=0.5, seed=0))
    assert not list(tmp_path.iterdir())


def test_default_folder_follows_xdg_cache_home(tmp_path: Path) -> None:
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "conef-fl" / "partitions"
    assert cache_dir({"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == Path.home() / ".cache" / "conef-fl" / "partitions"
    assert cache_dir({ENV_VAR: str(tmp_path / "x"), "XDG_CACHE_HOME": "/elsewhere"}) == tmp_path / "x"
    assert cache_dir({ENV_VAR: "  ", "XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "conef-fl" / "partitions"


def test_a_failed_write_leaves_no_temporary_file(task, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pc.os, "replace", refuse)
    with caplog.at_level(logging.WARNING, logger=pc.__name__):
        _same(_cached(task), partition_indices(task, NUM, "dirichlet", alpha=0.5, seed=0))
    assert "could not write" in caplog.text
    assert list(cache.iterdir()) == []


def test_the_client_app_path_uses_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = read_app_config({"dataset": "digits", "partitioning": "dirichlet", "dirichlet-alpha": 0.5, "seed": 3})
    first = _ProcessMemo().partitions(cfg, NUM)  # a fresh memo: like a new ClientApp process
    assert len(list(cache.iterdir())) == 1
    _no_compute(monkeypatch)
    _same(_ProcessMemo().partitions(cfg, NUM), first)
