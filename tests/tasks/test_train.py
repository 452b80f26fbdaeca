"""conef_fl.tasks.train: local training and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conef_fl.tasks import (
    TaskData,
    build_model,
    evaluate,
    train_local,
)

from .helpers import _flat, _gen, _text_task


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
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])
    # one epoch (7 batches of up to 16), a reshuffle, then 2 more full batches
    assert out["steps"] == 9 and out["examples_seen"] == 100 + 2 * 16
    assert out["num_examples"] == 100
    model = build_model(digits, "mlp", seed=1)
    train_local(model, x, y, steps=9, batch_size=16, generator=_gen(5))
    assert not torch.equal(_flat(model), runs[0])


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
