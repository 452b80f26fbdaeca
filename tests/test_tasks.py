"""Tests of conef_fl.tasks: datasets, partitioning, models, local training."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conef_fl.tasks import (
    TaskData,
    build_model,
    clear_caches,
    clear_partition_cache,
    count_parameters,
    default_data_dir,
    evaluate,
    get_flat_params,
    load_task_data,
    model_to_ndarrays,
    ndarrays_to_model,
    partition_indices,
    read_idx,
    set_flat_params,
    train_local,
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


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These tiny models run faster on one thread (and the test machine has two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_task_data("digits")


@pytest.fixture(scope="module")
def shakespeare() -> TaskData:
    if not HAS_SHAKESPEARE:
        pytest.skip(f"Tiny Shakespeare input.txt not found in {SHAKESPEARE_DIR}")
    return load_task_data("shakespeare")


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


# ---------------------------------------------------------------- datasets


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
    clear_caches()
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


# ---------------------------------------------------------------- partitioning


def _assert_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(p.size > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert allidx.shape[0] == n and np.array_equal(np.sort(allidx), np.arange(n))


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
    clear_partition_cache()
    again = partition_indices(digits, k, scheme, seed=0, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(digits, k, scheme, seed=1, **kwargs)
    _assert_partition(other, digits.num_train, k)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    if scheme == "pathological":
        labels = digits.y_train.numpy()
        assert all(np.unique(labels[p]).shape[0] <= kwargs["classes_per_partition"] for p in parts)


def _label_skew(task: TaskData, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    labels = task.y_train.numpy()
    glob = np.bincount(labels, minlength=10) / labels.shape[0]
    return float(
        np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / p.size - glob).sum() for p in parts])
    )


def test_dirichlet_small_alpha_is_label_skewed(digits: TaskData) -> None:
    iid = _label_skew(digits, partition_indices(digits, 10, "iid"))
    skewed = _label_skew(digits, partition_indices(digits, 10, "dirichlet", alpha=0.1))
    assert iid < 0.15
    assert skewed > 0.4 and skewed > 3 * iid


def test_dirichlet_fills_partitions_left_empty(digits: TaskData, caplog: pytest.LogCaptureFixture) -> None:
    clear_partition_cache()
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
    clear_partition_cache()
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


# ---------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("task", "model", "low", "high", "x_shape"),
    [
        ("digits", "auto", 2_000, 20_000, (3, 1, 8, 8)),
        ("digits", "mlp", 2_000, 20_000, (3, 1, 8, 8)),
        ("mnist", "cnn", 100_000, 400_000, (3, 1, 28, 28)),
        ("mnist", "mlp", 100_000, 400_000, (3, 1, 28, 28)),
    ],
)
def test_image_models_size_and_forward(task: str, model: str, low: int, high: int, x_shape: tuple) -> None:
    net = build_model(task, model, seed=0)
    assert low <= count_parameters(net) <= high
    assert net(torch.zeros(x_shape)).shape == (3, 10)


def test_char_lstm_size_and_forward() -> None:
    net = build_model("shakespeare", seed=0)
    assert count_parameters(net) == 815_945  # LEAF: embedding 8, 2 x LSTM(256), linear
    assert net(torch.zeros(2, 80, dtype=torch.int64)).shape == (2, 80, 65)
    small = build_model(_text_task(vocab=11), "char-lstm", seed=0)
    assert small(torch.zeros(2, 7, dtype=torch.int64)).shape == (2, 7, 11)


def test_build_model_seed_keeps_global_rng(digits: TaskData) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(digits, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model("digits", seed=7)
    c = build_model("digits", seed=8)
    assert torch.equal(get_flat_params(a), get_flat_params(b))
    assert not torch.equal(get_flat_params(a), get_flat_params(c))


def test_build_model_bad_names(digits: TaskData) -> None:
    with pytest.raises(ValueError, match="auto.*mlp.*cnn.*char-lstm"):
        build_model(digits, "resnet")
    with pytest.raises(ValueError, match="valid names"):
        build_model("cifar10")
    with pytest.raises(ValueError, match="char-lstm"):
        build_model("digits", "char-lstm")
    with pytest.raises(ValueError, match="text task"):
        build_model("shakespeare", "cnn")


# ---------------------------------------------------------------- training


def test_train_local_learns_digits(digits: TaskData) -> None:
    model = build_model(digits, seed=0)
    before = evaluate(model, digits.x_test, digits.y_test)
    state = torch.get_rng_state()
    g = _gen(0)
    first = train_local(model, digits.x_train, digits.y_train, epochs=1, lr=0.05, momentum=0.9, generator=g)
    rest = train_local(model, digits.x_train, digits.y_train, epochs=5, lr=0.05, momentum=0.9, generator=g)
    assert torch.equal(torch.get_rng_state(), state)  # shuffling used only the generator
    after = evaluate(model, digits.x_test, digits.y_test)
    assert first["num_examples"] == rest["num_examples"] == digits.num_train
    assert first["steps"] == 45 and rest["steps"] == 225 and rest["examples_seen"] == 5 * digits.num_train
    assert rest["loss"] < 0.5 * first["loss"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8 and after["num_examples"] == digits.num_test
    assert "perplexity" not in after


def test_train_local_deterministic_and_steps(digits: TaskData) -> None:
    x, y = digits.x_train[:100], digits.y_train[:100]
    runs = []
    for _ in range(2):
        model = build_model(digits, "mlp", seed=1)
        out = train_local(model, x, y, steps=9, batch_size=16, generator=_gen(4), max_grad_norm=1.0)
        runs.append(get_flat_params(model))
    assert torch.equal(runs[0], runs[1])
    # one epoch (7 batches of up to 16), a reshuffle, then 2 more full batches
    assert out["steps"] == 9 and out["examples_seen"] == 100 + 2 * 16
    assert out["num_examples"] == 100
    model = build_model(digits, "mlp", seed=1)
    train_local(model, x, y, steps=9, batch_size=16, generator=_gen(5))
    assert not torch.equal(get_flat_params(model), runs[0])


def test_train_and_evaluate_char_model() -> None:
    task = _text_task(vocab=11)
    model = build_model(task, seed=0)
    out = train_local(model, task.x_train, task.y_train, epochs=2, batch_size=8, lr=0.5, generator=_gen(0))
    assert np.isfinite(out["loss"]) and out["num_examples"] == task.num_train
    ev = evaluate(model, task.x_test, task.y_test, batch_size=3)
    assert ev["num_examples"] == 4 and ev["num_scored"] == 4 * 7
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["perplexity"] == pytest.approx(np.exp(ev["loss"]))


def test_train_evaluate_bad_args(digits: TaskData) -> None:
    model = build_model(digits, seed=0)
    x, y = digits.x_train[:10], digits.y_train[:10]
    for kwargs in (
        {"epochs": 0},
        {"steps": 0},
        {"batch_size": 0},
        {"lr": -1.0},
        {"lr": "fast"},
        {"momentum": 1.0},
        {"weight_decay": -0.1},
        {"max_grad_norm": 0.0},
    ):
        with pytest.raises(ValueError):
            train_local(model, x, y, **kwargs)
    with pytest.raises(ValueError, match="differ in length"):
        train_local(model, x, y[:5])
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, x, y, batch_size=0)


# ---------------------------------------------------------------- parameter helpers


def test_flat_params_and_ndarrays_roundtrip() -> None:
    a = build_model("digits", seed=0)
    b = build_model("digits", seed=1)
    flat = get_flat_params(a)
    assert flat.shape == (count_parameters(a),)
    set_flat_params(b, flat)
    assert torch.equal(get_flat_params(b), flat)
    flat[0] += 1.0  # a copy: the model is unchanged
    assert not torch.equal(get_flat_params(a), flat)

    arrays = model_to_ndarrays(a)
    keys = list(a.state_dict())
    assert [arr.shape for arr in arrays] == [tuple(a.state_dict()[k].shape) for k in keys]
    c = build_model("digits", seed=2)
    ndarrays_to_model(c, arrays)
    assert torch.equal(get_flat_params(c), get_flat_params(a))

    with pytest.raises(ValueError, match="elements"):
        set_flat_params(c, flat[:-1])
    with pytest.raises(ValueError, match="arrays"):
        ndarrays_to_model(c, arrays[:-1])
    bad = list(arrays)
    bad[2] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=keys[2].replace(".", r"\.")):
        ndarrays_to_model(c, bad)


def test_train_device_values() -> None:
    from conef_fl.tasks import check_train_device

    assert check_train_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="train-device='gpu' is not a device; allowed: cpu, cuda, cuda:N"):
        check_train_device("gpu")
    with pytest.raises(ValueError, match="train-device='meta' is not supported"):
        check_train_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train-device='cuda' but CUDA is not available here"):
            check_train_device("cuda")
