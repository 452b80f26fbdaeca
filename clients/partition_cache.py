"""On-disk cache of the ClientApp's partition index arrays, shared by every process of a user.

In a Flower 1.41 deployment each message starts a new ``flwr-clientapp`` process, so the
per-process memo of :mod:`clients.task` never hits there, and recomputing a Dirichlet
partition through ``flwr-datasets`` costs ~6 CPU-s per message on MNIST. This module keeps
the result of :func:`conef_fl.tasks.partition_indices` in one ``.npy`` file per key.

Where (:data:`ENV_VAR`, read at every call):

- unset or empty: ``$XDG_CACHE_HOME/conef-fl/partitions`` (``~/.cache/conef-fl/partitions``
  when ``XDG_CACHE_HOME`` is unset or not an absolute path);
- a path: that folder (created when missing);
- ``off`` (or ``0``, ``false``, ``no``, ``none``, ``disabled``; any case): no cache, every
  process computes its partitions.

**Key.** Everything that determines the partition: dataset, data dir, seed, number of
partitions, scheme, Dirichlet alpha, classes per partition, the installed ``flwr-datasets``
version, a SHA-256 of the column the scheme splits by (labels or groups; the sample count
for ``iid``) and :data:`FORMAT_VERSION`. The file name is a digest of that key and the key's
digest is stored inside the file again, so a file renamed to another key is refused.

**Loading never trusts the file.** ``np.load(allow_pickle=False)`` after a size check, then
the magic number, format, sizes, key digest and a SHA-256 of the content are checked, and
the arrays must form sorted, disjoint, non-empty parts covering ``range(n)`` exactly once.
On any mismatch, corruption or I/O error the partition is recomputed, a warning is logged
and the file is replaced; a cache problem never fails a client. (A file that passes every
check was written by this code for this key or forged by someone who can already write to
the user's cache folder, i.e. run code as the user.)

**Writing is atomic.** A temporary file in the cache folder, ``fsync``, then
``os.replace``; on any failure the temporary file is removed and a warning logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np

from conef_fl.tasks import TaskData, partition_indices

log = logging.getLogger(__name__)

__all__ = ["DISABLED_VALUES", "ENV_VAR", "FORMAT_VERSION", "cache_dir", "cache_key", "cache_path",
           "cached_partition_indices"]

#: Environment variable: the cache folder, or one of :data:`DISABLED_VALUES` to turn the cache off.
ENV_VAR = "CONEF_FL_PARTITION_CACHE"
#: Values of :data:`ENV_VAR` (compared lower-case, stripped) that disable the cache.
DISABLED_VALUES = frozenset({"off", "0", "false", "no", "none", "disabled"})
#: Bump when the file layout or the partitioning code's output changes.
FORMAT_VERSION = 1
#: First word of every cache file ("CONEFPC1" as a little-endian int64).
_MAGIC = int.from_bytes(b"CONEFPC1", "little", signed=True)
#: Words before the offsets: magic, format, n, partitions, 4 words key digest, 4 words content digest.
_HEADER_WORDS = 12
#: Bytes a ``.npy`` header may take beyond the data (numpy pads it to 64 or 4096 bytes).
_NPY_HEADER_MAX = 4096


def cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The cache folder :data:`ENV_VAR` selects (see the module docstring); ``None`` when disabled."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR, "").strip()
    if value.lower() in DISABLED_VALUES:
        return None
    if value:
        return Path(value).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "conef-fl" / "partitions"


def _split_column_digest(task: TaskData, scheme: str) -> str:
    """SHA-256 of what ``scheme`` splits by: labels, groups, or (iid) only the sample count."""
    h = hashlib.sha256(f"n={task.num_train}".encode())
    if scheme in ("dirichlet", "pathological") and not task.is_text:
        h.update(np.ascontiguousarray(task.labels, dtype="<i8").tobytes())
    elif scheme == "natural" and task.groups is not None:
        groups = np.asarray(task.groups)
        h.update(str(groups.dtype).encode())
        h.update(np.ascontiguousarray(groups).tobytes())
    return h.hexdigest()


def _flwr_datasets_version() -> str:
    try:
        return metadata.version("flwr-datasets")
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_key(task: TaskData, num_partitions: int, scheme: str, *, alpha: float, seed: int, dataset: str,
              data_dir: str | None, classes_per_partition: int = 2) -> dict[str, object]:
    """Every input that determines ``partition_indices(task, num_partitions, scheme, ...)``, as a JSON-able dict."""
    return {
        "format": FORMAT_VERSION, "dataset": str(dataset), "data_dir": data_dir or None, "seed": int(seed),
        "num_partitions": int(num_partitions), "scheme": str(scheme), "alpha": repr(float(alpha)),
        "classes_per_partition": int(classes_per_partition), "flwr_datasets": _flwr_datasets_version(),
        "column": _split_column_digest(task, scheme),
    }


def _key_digest(key: Mapping[str, object]) -> bytes:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()


def cache_path(directory: Path, key: Mapping[str, object]) -> Path:
    """The file of ``key`` in ``directory``."""
    return directory / f"partitions-v{FORMAT_VERSION}-{_key_digest(key).hex()[:40]}.npy"


def _words(digest: bytes) -> np.ndarray:
    return np.frombuffer(digest, dtype="<i8")


def _encode(parts: list[np.ndarray], n: int, key_digest: bytes) -> np.ndarray:
    offsets = np.zeros(len(parts) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([p.size for p in parts])
    body = np.concatenate([offsets, *(np.asarray(p, dtype="<i8") for p in parts)])
    head = np.array([_MAGIC, FORMAT_VERSION, n, len(parts)], dtype="<i8")
    content = _words(hashlib.sha256(body.tobytes()).digest())
    return np.concatenate([head, _words(key_digest), content, body])


def _decode(arr: np.ndarray, n: int, num_partitions: int, key_digest: bytes) -> list[np.ndarray]:
    """The partitions stored in ``arr``; raises ``ValueError`` naming the first check that fails."""
    words = _HEADER_WORDS + num_partitions + 1 + n
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype("<i8") or arr.shape != (words,):
        raise ValueError(f"expected int64 words of shape ({words},), got {getattr(arr, 'dtype', type(arr))} "
                         f"{getattr(arr, 'shape', '')}")
    if int(arr[0]) != _MAGIC or int(arr[1]) != FORMAT_VERSION:
        raise ValueError("not a partition cache file of this format")
    if int(arr[2]) != n or int(arr[3]) != num_partitions:
        raise ValueError(f"sizes {int(arr[2])}, {int(arr[3])} do not match n={n}, partitions={num_partitions}")
    if not np.array_equal(arr[4:8], _words(key_digest)):
        raise ValueError("written for another key")
    body = arr[_HEADER_WORDS:]
    if not np.array_equal(arr[8:12], _words(hashlib.sha256(body.tobytes()).digest())):
        raise ValueError("content digest mismatch (corrupt file)")
    offsets, idx = body[: num_partitions + 1], body[num_partitions + 1:]
    if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
        raise ValueError("partition offsets are not 0 < ... < n with non-empty parts")
    if np.any(idx < 0) or np.any(idx >= n):
        raise ValueError("an index is out of range")
    if np.any(np.bincount(idx, minlength=n) != 1):
        raise ValueError("the parts are not a disjoint cover of range(n)")
    parts = []
    for i in range(num_partitions):
        p = idx[offsets[i]:offsets[i + 1]].astype(np.int64, copy=True)
        if p.size > 1 and np.any(np.diff(p) <= 0):
            raise ValueError(f"partition {i} is not sorted")
        p.flags.writeable = False
        parts.append(p)
    return parts


def _load(path: Path, n: int, num_partitions: int, key_digest: bytes) -> list[np.ndarray] | None:
    """The cached partitions, or None when there is no file; raises on a file that fails a check."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    expected = 8 * (_HEADER_WORDS + num_partitions + 1 + n)
    if not path.is_file() or not expected < size <= expected + _NPY_HEADER_MAX:
        raise ValueError(f"{size} bytes, expected a file of {expected} data bytes plus a header")
    arr = np.load(path, allow_pickle=False)
    return _decode(arr, n, num_partitions, key_digest)


def _store(path: Path, words: np.ndarray) -> None:
    """Write ``words`` to ``path`` atomically; never leaves its temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partitions-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, words, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_partition_indices(task: TaskData, num_partitions: int, scheme: str, *, alpha: float, seed: int,
                             dataset: str, data_dir: str | None, classes_per_partition: int = 2,
                             directory: Path | None = None) -> list[np.ndarray]:
    """:func:`conef_fl.tasks.partition_indices`, read from the on-disk cache when a valid file exists.

    Parameters
    ----------
    task, num_partitions, scheme, alpha, seed, classes_per_partition
        As for :func:`conef_fl.tasks.partition_indices`.
    dataset, data_dir
        The task's name and data folder as configured (part of the key).
    directory : pathlib.Path, optional
        Cache folder; default :func:`cache_dir` (``None`` there: no cache).

    Returns
    -------
    list of numpy.ndarray
        The same arrays ``partition_indices`` returns (sorted, read-only int64), whether they came from
        the cache or were computed.

    Raises
    ------
    ValueError
        Whatever ``partition_indices`` raises for bad arguments; never for a cache problem.
    """
    folder = cache_dir() if directory is None else directory
    if folder is None:
        return partition_indices(task, num_partitions, scheme, alpha=alpha,
                                 classes_per_partition=classes_per_partition, seed=seed)
    key = cache_key(task, num_partitions, scheme, alpha=alpha, seed=seed, dataset=dataset, data_dir=data_dir,
                    classes_per_partition=classes_per_partition)
    digest = _key_digest(key)
    path = cache_path(folder, key)
    n = task.num_train
    try:
        parts = _load(path, n, int(num_partitions), digest)
    except Exception as exc:  # noqa: BLE001 - a bad cache file must never fail a client
        log.warning("ignoring the partition cache file %s (%s: %s); recomputing and replacing it",
                    path, type(exc).__name__, exc)
        parts = None
    if parts is not None:
        log.debug("partitions of %s read from %s", dataset, path)
        return parts
    parts = partition_indices(task, num_partitions, scheme, alpha=alpha,
                              classes_per_partition=classes_per_partition, seed=seed)
    try:
        _store(path, _encode(parts, n, digest))
        log.debug("partitions of %s cached in %s", dataset, path)
    except OSError as exc:
        log.warning("could not write the partition cache file %s (%s); continuing without it "
                    "(set %s=off to disable the cache)", path, exc, ENV_VAR)
    return parts
