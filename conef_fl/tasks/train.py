"""Local training and evaluation loops (plain SGD, no global RNG)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate", "train_local"]


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y differ in length: {x.shape[0]} != {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x and y are empty")


def _loss_sum(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy and the number of scored positions (chars for text)."""
    if logits.dim() == 3:  # (N, T, V) next-token logits against (N, T) targets
        flat, tgt = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    else:
        flat, tgt = logits, target
    return F.cross_entropy(flat, tgt, reduction="sum"), int(tgt.numel())


def _as_float(name: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    max_grad_norm: float | None = None,
    proximal_mu: float = 0.0,
) -> dict[str, float | int]:
    """Train ``model`` in place with mini-batch SGD on ``(x, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits ``(B, C)``, or a sequence model returning
        ``(B, T, V)`` for targets ``(B, T)``. Batches are moved to its device.
    x, y : torch.Tensor
        Local data (same length, at least one sample).
    epochs : int
        Passes over the data, each in a fresh random order (the last batch of
        an epoch may be smaller). Ignored when ``steps`` is given.
    steps : int, optional
        Exactly this many mini-batch steps instead of ``epochs``, reshuffling
        whenever the data is exhausted.
    batch_size, lr, momentum, weight_decay : number
        ``torch.optim.SGD`` settings (a new optimizer per call, so momentum
        starts from zero).
    generator : torch.Generator, optional
        CPU generator for shuffling. ``None`` uses a fresh generator seeded 0
        (the same order every call); the global RNG is never used.
    max_grad_norm : float, optional
        Clip the gradient's total 2-norm to this value before each step.
    proximal_mu : float
        FedProx: add ``mu/2 * ||w - w_start||^2`` to every step's loss (0 = plain SGD).

    Returns
    -------
    dict
        ``loss``: mean training loss over all examples processed (per character
        for text), measured during training; ``num_examples``: ``len(x)``, the
        local dataset size used as FedAvg weight (not the number processed);
        ``examples_seen``: samples processed over all steps; ``steps``: optimizer steps.
    """
    _check_xy(x, y)
    if steps is None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None or an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    lr, momentum = _as_float("lr", lr), _as_float("momentum", momentum)
    weight_decay = _as_float("weight_decay", weight_decay)
    if max_grad_norm is not None:
        max_grad_norm = _as_float("max_grad_norm", max_grad_norm)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    proximal_mu = _as_float("proximal_mu", proximal_mu)
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError(f"proximal_mu must be a finite float >= 0, got {proximal_mu!r}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be None or a positive float, got {max_grad_norm!r}")
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0)
    elif generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")

    n = int(x.shape[0])
    batches_per_epoch = math.ceil(n / batch_size)
    total_steps = steps if steps is not None else epochs * batches_per_epoch
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None

    was_training = model.training
    model.train()
    loss_total, scored, seen = 0.0, 0, 0
    perm = torch.randperm(n, generator=generator)
    pos = 0
    try:
        for _ in range(total_steps):
            if pos >= n:
                perm, pos = torch.randperm(n, generator=generator), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, count = _loss_sum(model(xb), yb)
            loss = loss_sum / count
            if anchor is not None:
                loss = loss + 0.5 * proximal_mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            loss_total += float(loss_sum.detach())
            scored += count
            seen += int(idx.shape[0])
    finally:
        model.train(was_training)
    return {
        "loss": loss_total / scored,
        "num_examples": n,
        "examples_seen": seen,
        "steps": total_steps,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> dict[str, float | int]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        As for :func:`train_local`.
    x, y : torch.Tensor
        Evaluation data (at least one sample).
    batch_size : int
        Samples per forward pass.

    Returns
    -------
    dict
        ``loss`` and ``accuracy`` (per character for text), ``num_examples``
        (``len(x)``: samples, i.e. windows for text), ``num_scored`` (labels
        scored: characters for text) and, for text (targets ``(N, T)``),
        ``perplexity`` = ``exp(loss)``.
    """
    _check_xy(x, y)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = _device(model)
    was_training = model.training
    model.eval()
    loss_total, correct, scored = 0.0, 0, 0
    try:
        for start in range(0, int(x.shape[0]), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            logits = model(xb)
            loss_sum, count = _loss_sum(logits, yb)
            loss_total += float(loss_sum)
            correct += int((logits.argmax(dim=-1) == yb).sum())
            scored += count
    finally:
        model.train(was_training)
    loss = loss_total / scored
    out: dict[str, float | int] = {
        "loss": loss,
        "accuracy": correct / scored,
        "num_examples": int(x.shape[0]),
        "num_scored": scored,
    }
    if y.dim() == 2:
        out["perplexity"] = math.exp(min(loss, 700.0))
    return out


def check_train_device(device: str) -> torch.device:
    """The torch device of ``train-device`` (``cpu``, ``cuda`` or ``cuda:N``), or a ``ValueError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"train-device={device!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"train-device={device!r} is not supported; allowed: cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train-device={device!r} but CUDA is not available here; allowed: cpu")
    return dev
