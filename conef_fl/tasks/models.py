"""Small models for the tasks.

Parameter counts (all trainable, no buffers, so ``state_dict()`` holds exactly
the parameters):

=============  ===========  ==========================================================  ==========
task           model        layers                                                      parameters
=============  ===========  ==========================================================  ==========
digits         ``cnn``      conv3x3(1->8), conv3x3(8->16), maxpool2, fc(256->32->10)        9,802
digits         ``mlp``      fc(64->64->10)                                                  4,810
mnist          ``cnn``      conv5x5(1->32), pool, conv5x5(32->64), pool, fc(1024->128->10)  184,586
mnist          ``mlp``      fc(784->200->200->10) (FedAvg "2NN")                          199,210
mnist          ``mlp-wide`` fc(784->1024->256->10) (the scale run's >= 1M-parameter model) 1,068,810
digits         ``mlp-wide`` fc(64->1024->256->10)                                          331,530
shakespeare    char-lstm    embedding(65, 8), 2-layer LSTM(256), fc(256->65) (LEAF)       815,945
shakespeare    ``char-gru`` embedding(65, 16), 1-layer GRU(128), fc(128->65)               65,489
=============  ===========  ==========================================================  ==========

``"auto"`` picks ``cnn`` for image tasks and ``char-lstm`` for text. ``char-gru`` is the
small character model of the converged language task (``python -m sim.experiments --task
shakespeare-gru``): LEAF's CharLSTM costs 2,100–2,900 s per 400-round run on this 2-core
machine and had not converged after 400 rounds; the GRU is 12× smaller and ~3× cheaper per step.
"""

from __future__ import annotations

import torch
from torch import nn

from conef_fl.tasks.data import TaskData

__all__ = ["MODEL_NAMES", "CharGRU", "CharLSTM", "DigitsCNN", "MLP", "MnistCNN", "build_model", "count_parameters"]

MODEL_NAMES: tuple[str, ...] = ("auto", "mlp", "cnn", "char-lstm", "mlp-wide", "char-gru")
#: Hidden widths of ``mlp-wide``.
WIDE_HIDDEN = (1024, 256)
# Static shapes so a model can be built from a task name without its data.
# Tiny Shakespeare's character vocabulary has 65 symbols; pass a TaskData for another corpus.
_TASK_SPECS: dict[str, dict[str, object]] = {
    "digits": {"input_shape": (1, 8, 8), "num_classes": 10, "text": False},
    "mnist": {"input_shape": (1, 28, 28), "num_classes": 10, "text": False},
    "shakespeare": {"input_shape": None, "num_classes": 65, "text": True},
}


class MLP(nn.Module):
    """Fully connected classifier over flattened images (ReLU between layers)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.net(x)


class _ConvClassifier(nn.Module):
    """Convolutional ``features`` followed by a linear ``classifier`` (the names fix the state-dict keys)."""

    def __init__(self, features: nn.Sequential, hidden_in: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(hidden_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.classifier(self.features(x))


class DigitsCNN(_ConvClassifier):
    """Two 3x3 convolutions and two linear layers for 8x8 digits (9,802 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        super().__init__(features, 16 * 4 * 4, 32, num_classes)


class MnistCNN(_ConvClassifier):
    """LeNet-like CNN for 28x28 images (184,586 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        features = nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        super().__init__(features, 64 * 4 * 4, 128, num_classes)


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding(vocab, 8), 2-layer LSTM, linear head."""

    def __init__(
        self, vocab_size: int, embed_dim: int = 8, hidden_size: int = 256, num_layers: int = 2
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-character logits ``(N, T, vocab)`` of token windows ``(N, T)``."""
        out, _ = self.lstm(self.embedding(x))
        return self.head(out)


class CharGRU(nn.Module):
    """A small character model: embedding(vocab, 16), one GRU layer, linear head (65,489 parameters for 65
    symbols)."""

    def __init__(self, vocab_size: int, embed_dim: int = 16, hidden_size: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_size, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-character logits ``(N, T, vocab)`` of token windows ``(N, T)``."""
        out, _ = self.gru(self.embedding(x))
        return self.head(out)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _construct(name: str, kind: str, spec: dict[str, object]) -> nn.Module:
    num_classes = int(spec["num_classes"])  # type: ignore[call-overload]
    if spec["text"]:
        if kind not in ("char-lstm", "char-gru"):
            raise ValueError(f"model {kind!r} does not fit text task {name!r}; use 'char-lstm', 'char-gru' or "
                             "'auto'")
        return CharGRU(num_classes) if kind == "char-gru" else CharLSTM(num_classes)
    if kind in ("char-lstm", "char-gru"):
        raise ValueError(f"model {kind!r} does not fit image task {name!r}; use 'cnn', 'mlp', 'mlp-wide' or "
                         "'auto'")
    shape = tuple(spec["input_shape"])  # type: ignore[arg-type]
    if kind in ("mlp", "mlp-wide"):
        hidden = WIDE_HIDDEN if kind == "mlp-wide" else (64,) if shape[1:] == (8, 8) else (200, 200)
        return MLP(int(torch.Size(shape).numel()), hidden, num_classes)
    if shape == (1, 8, 8):
        return DigitsCNN(num_classes)
    if shape == (1, 28, 28):
        return MnistCNN(num_classes)
    raise ValueError(f"no 'cnn' for input shape {shape} of task {name!r}; use 'mlp'")


def build_model(task: TaskData | str, model: str = "auto", *, seed: int | None = None) -> nn.Module:
    """Build the model for a task.

    Parameters
    ----------
    task : TaskData or str
        The task (its ``num_classes`` and input shape are used) or a task name
        (``"digits"``, ``"mnist"``, ``"shakespeare"``; the latter assumes Tiny
        Shakespeare's 65-character vocabulary).
    model : {"auto", "mlp", "cnn", "char-lstm", "mlp-wide", "char-gru"}
        ``"auto"`` is ``"cnn"`` for images and ``"char-lstm"`` for text.
    seed : int, optional
        If given, the weights are initialised under
        ``torch.random.fork_rng(devices=[])`` seeded with ``seed``: same seed,
        same weights, and the global RNG state is unchanged afterwards. If
        ``None``, torch's default initialisation draws from the global RNG.

    Returns
    -------
    torch.nn.Module
        A CPU float32 model in training mode.

    Raises
    ------
    ValueError
        Unknown task or model name, or a model that does not fit the task.
    """
    if isinstance(task, TaskData):
        name = task.name
        spec: dict[str, object] = {
            "input_shape": None if task.is_text else tuple(task.x_train.shape[1:]),
            "num_classes": task.num_classes,
            "text": task.is_text,
        }
    elif isinstance(task, str):
        if task not in _TASK_SPECS:
            raise ValueError(f"unknown task {task!r}; valid names: {', '.join(_TASK_SPECS)}")
        name, spec = task, _TASK_SPECS[task]
    else:
        raise ValueError(f"task must be a TaskData or a task name, got {type(task).__name__}")
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; valid models: {', '.join(MODEL_NAMES)}")
    kind = model if model != "auto" else ("char-lstm" if spec["text"] else "cnn")
    if seed is None:
        return _construct(name, kind, spec)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(name, kind, spec)
