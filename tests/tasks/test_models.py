"""conef_fl.tasks.models: sizes, forward passes, seeding and bad names."""

from __future__ import annotations

import pytest
import torch

from conef_fl.tasks import (
    TaskData,
    build_model,
    count_parameters,
)

from .helpers import _flat, _text_task


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


def test_char_gru_size_forward_and_learns() -> None:
    net = build_model("shakespeare", "char-gru", seed=0)
    assert count_parameters(net) == 65_489  # embedding 16, 1 x GRU(128), linear
    assert net(torch.zeros(2, 80, dtype=torch.int64)).shape == (2, 80, 65)
    small = build_model(_text_task(vocab=11), "char-gru", seed=0)
    assert small(torch.zeros(2, 7, dtype=torch.int64)).shape == (2, 7, 11)
    # a periodic sequence is learnable: SGD steps lower the loss well below log(vocab)
    x = torch.arange(64).remainder(11).repeat(8, 1)
    opt = torch.optim.SGD(small.parameters(), lr=1.0)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(small(x[:, :-1]).reshape(-1, 11), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * float(torch.log(torch.tensor(11.0)))
    with pytest.raises(ValueError, match="char-gru.*does not fit image task"):
        build_model("mnist", "char-gru")


def test_build_model_seed_keeps_global_rng(digits: TaskData) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(digits, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model("digits", seed=7)
    c = build_model("digits", seed=8)
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), _flat(c))


def test_build_model_bad_names(digits: TaskData) -> None:
    with pytest.raises(ValueError, match="auto.*mlp.*cnn.*char-lstm"):
        build_model(digits, "resnet")
    with pytest.raises(ValueError, match="valid names"):
        build_model("cifar10")
    with pytest.raises(ValueError, match="char-lstm"):
        build_model("digits", "char-lstm")
    with pytest.raises(ValueError, match="text task"):
        build_model("shakespeare", "cnn")
