"""Real datasets for the federated tasks: digits, MNIST and Tiny Shakespeare.

Every loader returns a :class:`TaskData` with torch tensors ready for
:func:`conef_fl.tasks.train_local` / :func:`conef_fl.tasks.evaluate`.

Datasets
--------
``"digits"``
    scikit-learn's bundled ``load_digits()`` (1797 real 8x8 handwritten digits,
    no download). Deterministic stratified 80/20 split: 1437 train / 360 test.
    Images ``(N, 1, 8, 8)`` float32 in ``[0, 1]``.
``"mnist"``
    The four standard IDX files (``.gz`` or uncompressed) from ``data_dir``
    (default ``<repo>/../shared/data/mnist``): 60000 train / 10000 test,
    ``(N, 1, 28, 28)`` float32 normalised with the MNIST mean/std.
``"shakespeare"``
    Tiny Shakespeare ``input.txt`` (default ``<repo>/../shared/data/tinyshakespeare``)
    split into speaking turns by speaker role. Per role, the first 90 % of the
    role's text is for training and the last 10 % for testing; both are cut
    into non-overlapping windows of ``seq_len`` characters whose targets are the
    next characters. Roles with fewer than :data:`SHAKESPEARE_MIN_TRAIN_WINDOWS`
    training windows are dropped. Of the file's 7,222 turns (7,097 with text) by
    292 roles (names whitespace-normalised and upper-cased), with
    ``seq_len=80`` this keeps 201 roles, 11,325 training windows and 1,171 test
    windows over a 65-character vocabulary; ``TaskData.groups`` holds each
    training window's role index (roles sorted by name).

Nothing here is cached: every call reads and parses its files. An app that
serves many virtual clients from one process keeps its own memo (the bundled
ClientApp does, in ``clients/task.py``).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "SHAKESPEARE_MIN_TRAIN_WINDOWS",
    "SHAKESPEARE_TEST_FRACTION",
    "TASK_NAMES",
    "TaskData",
    "default_data_dir",
    "load_task_data",
    "read_idx",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SHARED_DATA = _REPO_ROOT / ".." / "shared" / "data"

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SHAKESPEARE_TEST_FRACTION = 0.1
SHAKESPEARE_MIN_TRAIN_WINDOWS = 4
DIGITS_TEST_FRACTION = 0.2

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_SHAKESPEARE_FILE = "input.txt"
# A speaker line: the first line of a blank-line separated block, "NAME:".
_SPEAKER_RE = re.compile(r"^[A-Za-z][A-Za-z' .,&-]*:$")


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task's train and test data as torch tensors.

    Attributes
    ----------
    name : str
        Task name, e.g. ``"digits"``.
    x_train, y_train, x_test, y_test : torch.Tensor
        Images: ``x`` float32 ``(N, 1, H, W)``, ``y`` int64 ``(N,)``.
        Text: ``x`` int64 token windows ``(N, seq_len)``, ``y`` int64 ``(N, seq_len)``
        holding the next character of each position.
    num_classes : int
        Number of classes (vocabulary size for text).
    groups : numpy.ndarray or None
        Natural partition key (int64) of every training sample, e.g. the speaker
        role of a Shakespeare window; ``None`` when the task has none.
    description : str
        Human-readable summary (sizes, preprocessing).
    group_names : tuple of str or None
        ``group_names[g]`` is the name of group id ``g`` (role names).
    test_groups : numpy.ndarray or None
        Group id of every test sample, when ``groups`` is set.
    vocab : str or None
        For text tasks, ``vocab[i]`` is the character of token ``i``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    groups: np.ndarray | None = None
    description: str = ""
    group_names: tuple[str, ...] | None = field(default=None, repr=False)
    test_groups: np.ndarray | None = field(default=None, repr=False)
    vocab: str | None = field(default=None, repr=False)

    @property
    def is_text(self) -> bool:
        """Whether samples are token windows (sequence targets)."""
        return self.y_train.dim() == 2

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.y_test.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """Training labels as int64 numpy array (classification tasks only)."""
        if self.is_text:
            raise ValueError(f"task {self.name!r} is a text task: it has no per-sample class label")
        return self.y_train.numpy().astype(np.int64, copy=False)


def default_data_dir(name: str) -> Path:
    """The default data folder of a task: ``<repo>/../shared/data/<subdir>``.

    When the environment variable ``CONEF_DATA_DIR`` names a data root, the task's
    folder under it is tried first (Flower runs apps from a copy under
    ``FLWR_HOME``, where ``<repo>/..`` means something else).

    Parameters
    ----------
    name : str
        ``"mnist"`` or ``"shakespeare"``.
    """
    subdirs = {"mnist": "mnist", "shakespeare": "tinyshakespeare"}
    if name not in subdirs:
        raise ValueError(f"task {name!r} has no data folder; tasks with one: {sorted(subdirs)}")
    return (_SHARED_DATA / subdirs[name]).resolve()


def _resolve_dir(name: str, data_dir: str | os.PathLike[str] | None, probe: str) -> Path:
    """Pick the folder holding ``probe`` (or ``probe + '.gz'``).

    ``data_dir`` may be the task's own folder or the shared data root that
    contains it (``<root>/mnist``, ``<root>/tinyshakespeare``).
    """
    if data_dir is None or str(data_dir) == "":
        candidates = [default_data_dir(name)]
        env_root = os.environ.get("CONEF_DATA_DIR", "")
        if env_root:  # Flower runs the app from a copy under FLWR_HOME: the launcher names the data root
            root = Path(env_root).expanduser()
            candidates = [root / default_data_dir(name).name, root, *candidates]
    else:
        base = Path(data_dir).expanduser()
        candidates = [base, base / default_data_dir(name).name]
    for cand in candidates:
        if (cand / probe).is_file() or (cand / f"{probe}.gz").is_file():
            return cand.resolve()
    tried = ", ".join(str(c / probe) + "[.gz]" for c in candidates)
    raise FileNotFoundError(f"{name} data file {probe!r} not found; looked for: {tried}")


def _find_idx_file(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"MNIST file missing: {folder / stem}.gz (or uncompressed {stem})")


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when its name ends in ``.gz``).

    Parameters
    ----------
    path : str or PathLike
        File to read.
    expected_magic : int, optional
        Required magic number (2051 for images, 2049 for labels).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the shape stored in the header (read-only).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If the header, magic number or payload size is wrong; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # bad gzip stream, truncated gzip
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    magic = int.from_bytes(raw[:4], "big")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"IDX file {path} has magic number {magic}, expected {expected_magic}")
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise ValueError(
            f"IDX file {path} has magic number {magic} (0x{magic:08x}): not an unsigned-byte IDX file"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected:
        raise ValueError(
            f"IDX file {path} holds {payload} data bytes but its header shape {shape} needs {expected}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)
    return arr


def _mnist_raw(files: list[Path]) -> dict[str, np.ndarray]:
    """Parse and check the four MNIST files (in ``_MNIST_FILES`` order)."""
    paths = dict(zip(_MNIST_FILES, files, strict=True))
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], _IDX_IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], _IDX_LABELS_MAGIC)
        if images.ndim != 3:
            raise ValueError(
                f"IDX file {paths[f'{split}_images']} has shape {images.shape}, expected (N, H, W)"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"IDX file {paths[f'{split}_labels']} has shape {labels.shape}, "
                f"expected ({images.shape[0]},) to match {paths[f'{split}_images'].name}"
            )
        if labels.size and int(labels.max()) > 9:
            raise ValueError(f"IDX file {paths[f'{split}_labels']} has label {int(labels.max())} > 9")
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    if out["train_images"].shape[1:] != out["test_images"].shape[1:]:
        raise ValueError(
            f"MNIST train images {out['train_images'].shape[1:]} and test images "
            f"{out['test_images'].shape[1:]} differ in size"
        )
    return out


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    target = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    target.flags.writeable = False
    return images, target


def _stratified_test_indices(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Pick ``ceil(test_fraction * N)`` test indices, proportionally per class.

    Per-class counts use largest-remainder rounding (ties broken by class), so
    the split is exactly stratified; which samples are chosen depends on ``rng``.
    """
    n = labels.shape[0]
    n_test = int(np.ceil(test_fraction * n))
    classes, counts = np.unique(labels, return_counts=True)
    ideal = counts * (n_test / n)
    alloc = np.floor(ideal).astype(np.int64)
    remainder = n_test - int(alloc.sum())
    order = np.lexsort((classes, -(ideal - alloc)))  # largest fraction first, then class id
    alloc[order[:remainder]] += 1
    test = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, alloc, strict=True)]
    return np.sort(np.concatenate(test))


def _subsample(n: int, max_train: int | None, seed: int) -> np.ndarray | None:
    """Sorted random subset of ``range(n)`` of size ``max_train`` (None = keep all)."""
    if max_train is None or max_train >= n:
        return None
    rng = np.random.default_rng([seed, 0x5EB5])
    return np.sort(rng.choice(n, size=max_train, replace=False))


def _load_digits(data_dir: str | None, seq_len: int, max_train: int | None, seed: int) -> TaskData:
    del data_dir, seq_len
    images, target = _digits_raw()
    rng = np.random.default_rng(seed)
    test_idx = _stratified_test_indices(target, DIGITS_TEST_FRACTION, rng)
    train_mask = np.ones(target.shape[0], dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    sub = _subsample(train_idx.shape[0], max_train, seed)
    if sub is not None:
        train_idx = train_idx[sub]
    x = torch.from_numpy(images / 16.0).unsqueeze(1)  # values 0..16 -> [0, 1]
    y = torch.from_numpy(target.copy())
    return TaskData(
        name="digits",
        x_train=x[train_idx].contiguous(),
        y_train=y[train_idx].contiguous(),
        x_test=x[test_idx].contiguous(),
        y_test=y[test_idx].contiguous(),
        num_classes=10,
        description=(
            f"scikit-learn digits: {train_idx.shape[0]} train / {test_idx.shape[0]} test 8x8 images "
            f"in [0, 1], stratified split (seed {seed})"
        ),
    )


def _load_mnist(data_dir: str | None, seq_len: int, max_train: int | None, seed: int) -> TaskData:
    del seq_len
    folder = _resolve_dir("mnist", data_dir, _MNIST_FILES["train_images"])
    paths = [_find_idx_file(folder, stem) for stem in _MNIST_FILES.values()]
    raw = _mnist_raw(paths)

    table = ((np.arange(256, dtype=np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)

    def to_x(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(table[images]).unsqueeze(1)  # uint8 -> normalised float32 by lookup

    train_images, train_labels = raw["train_images"], raw["train_labels"]
    sub = _subsample(train_labels.shape[0], max_train, seed)
    if sub is not None:
        train_images, train_labels = train_images[sub], train_labels[sub]
    h, w = train_images.shape[1:]
    return TaskData(
        name="mnist",
        x_train=to_x(train_images),
        y_train=torch.from_numpy(train_labels.astype(np.int64)),
        x_test=to_x(raw["test_images"]),
        y_test=torch.from_numpy(raw["test_labels"].astype(np.int64)),
        num_classes=10,
        description=(
            f"MNIST from {folder}: {train_labels.shape[0]} train / {raw['test_labels'].shape[0]} test "
            f"{h}x{w} images, normalised with mean {MNIST_MEAN} / std {MNIST_STD}"
        ),
    )


def _split_turns(text: str) -> dict[str, list[str]]:
    """Map each speaker role to the list of its turns' texts.

    A turn is a block of lines separated from the next by a blank line whose
    first line is ``NAME:``; the role is the name with whitespace collapsed and
    upper-cased (the file spells some roles both ways, e.g. ``Nurse``/``NURSE``).
    Blocks that do not start with a speaker line, and empty turns, are ignored.
    """
    roles: dict[str, list[str]] = {}
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if len(lines) < 2 or not _SPEAKER_RE.match(lines[0]):
            continue
        role = " ".join(lines[0][:-1].split()).upper()
        roles.setdefault(role, []).append("\n".join(lines[1:]) + "\n")
    return roles


def _windows(codes: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: ``x[i] = codes[i*L : i*L+L]``, ``y[i]`` shifted by one."""
    n = (codes.shape[0] - 1) // seq_len
    if n <= 0:
        empty = np.zeros((0, seq_len), dtype=np.int64)
        return empty, empty.copy()
    x = codes[: n * seq_len].reshape(n, seq_len)
    y = codes[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y


def _load_shakespeare(data_dir: str | None, seq_len: int, max_train: int | None, seed: int) -> TaskData:
    folder = _resolve_dir("shakespeare", data_dir, _SHAKESPEARE_FILE)
    path = folder / _SHAKESPEARE_FILE
    text = path.read_text(encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    lut = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lut[[ord(c) for c in vocab]] = np.arange(len(vocab))
    roles = _split_turns(text)
    if not roles:
        raise ValueError(f"{path} has no speaking turns (blocks starting with a 'NAME:' line)")

    xs_tr, ys_tr, gs_tr, xs_te, ys_te, gs_te, names = [], [], [], [], [], [], []
    for role in sorted(roles):
        role_text = "".join(roles[role])
        codes = lut[np.frombuffer(role_text.encode("utf-32-le"), dtype=np.uint32)]
        n_train_chars = int(np.floor(codes.shape[0] * (1.0 - SHAKESPEARE_TEST_FRACTION)))
        x_tr, y_tr = _windows(codes[:n_train_chars], seq_len)
        if x_tr.shape[0] < SHAKESPEARE_MIN_TRAIN_WINDOWS:
            continue
        x_te, y_te = _windows(codes[n_train_chars:], seq_len)
        gid = len(names)
        names.append(role)
        xs_tr.append(x_tr)
        ys_tr.append(y_tr)
        gs_tr.append(np.full(x_tr.shape[0], gid, dtype=np.int64))
        xs_te.append(x_te)
        ys_te.append(y_te)
        gs_te.append(np.full(x_te.shape[0], gid, dtype=np.int64))
    if not names:
        raise ValueError(
            f"no role of {path} has {SHAKESPEARE_MIN_TRAIN_WINDOWS} training windows of seq_len={seq_len}"
        )
    x_train, y_train, groups = np.concatenate(xs_tr), np.concatenate(ys_tr), np.concatenate(gs_tr)
    sub = _subsample(groups.shape[0], max_train, seed)
    if sub is not None:
        x_train, y_train, groups = x_train[sub], y_train[sub], groups[sub]
    groups.flags.writeable = False
    test_groups = np.concatenate(gs_te)
    test_groups.flags.writeable = False
    n_roles_present = int(np.unique(groups).shape[0])
    return TaskData(
        name="shakespeare",
        x_train=torch.from_numpy(x_train.copy()),
        y_train=torch.from_numpy(y_train.copy()),
        x_test=torch.from_numpy(np.concatenate(xs_te)),
        y_test=torch.from_numpy(np.concatenate(ys_te)),
        num_classes=len(vocab),
        groups=groups,
        description=(
            f"Tiny Shakespeare from {path}: {len(roles)} roles, {len(names)} kept "
            f"(>= {SHAKESPEARE_MIN_TRAIN_WINDOWS} train windows; {n_roles_present} present after "
            f"subsampling), {groups.shape[0]} train / {test_groups.shape[0]} test windows of "
            f"{seq_len} chars, vocab {len(vocab)}, last {SHAKESPEARE_TEST_FRACTION:.0%} of each role's "
            "text held out"
        ),
        group_names=tuple(names),
        test_groups=test_groups,
        vocab=vocab,
    )


_LOADERS: dict[str, Callable[[str | None, int, int | None, int], TaskData]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "shakespeare": _load_shakespeare,
}
TASK_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_task_data(
    name: str,
    data_dir: str | None = None,
    *,
    seq_len: int = 80,
    max_train: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a task's train and test data.

    Parameters
    ----------
    name : str
        ``"digits"``, ``"mnist"`` or ``"shakespeare"``.
    data_dir : str, optional
        Folder with the task's files, or the shared data root holding ``mnist/``
        and ``tinyshakespeare/``. ``None`` or ``""`` means ``<repo>/../shared/data/...``.
        Ignored by ``"digits"``.
    seq_len : int
        Window length of text tasks (ignored by image tasks).
    max_train : int, optional
        Keep a random subset (drawn from ``seed``, original order kept) of at
        most this many training samples. The test set is never subsampled.
    seed : int
        Seed of the digits train/test split and of ``max_train`` subsampling.

    Returns
    -------
    TaskData
        New tensors on every call (callers may modify them).

    Raises
    ------
    ValueError
        Unknown ``name`` or invalid arguments or malformed files.
    FileNotFoundError
        A data file is missing.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if max_train is not None and (not isinstance(max_train, int) or max_train < 1):
        raise ValueError(f"max_train must be None or an int >= 1, got {max_train!r}")
    task = _LOADERS[name](data_dir, seq_len, max_train, int(seed))
    logger.debug("loaded task %s: %s", name, task.description)
    return task
