"""Server checkpoints: global model, round, server optimizer and strategy state, saved every round.

A checkpoint is one ``torch.save`` file written atomically (temporary file,
fsync, rename). Resuming loads it, validates that it belongs to the same
method, seed and model, and continues at the next round; with the same seeds
(and clients that persist their error state, ``state-dir``) the resumed run
ends with the same model as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FILE = "checkpoint.pt"


def save_checkpoint(
    folder: Path,
    server_round: int,
    model_state: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, Any],
    evaluations: Mapping[int, Mapping[str, float]],
) -> Path:
    """Write ``<folder>/checkpoint.pt`` atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    tmp = folder / f".{FILE}.tmp{os.getpid()}"
    payload = {
        "round": int(server_round),
        "model": {k: v.detach().cpu().clone() for k, v in model_state.items()},
        "strategy": dict(strategy_state),
        "evaluations": {int(k): dict(v) for k, v in evaluations.items()},
    }
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: Path, model_state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """The checkpoint in ``folder`` (None if there is none), validated against the model's keys and shapes."""
    path = folder / FILE
    if not path.exists():
        return None
    ckpt = torch.load(path, weights_only=True)
    model = ckpt.get("model")
    if not isinstance(model, Mapping) or set(model) != set(model_state):
        raise ValueError(f"checkpoint {path} does not match the model's parameter names")
    for k, v in model_state.items():
        if tuple(model[k].shape) != tuple(v.shape):
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(model[k].shape)}, model {tuple(v.shape)}")
        if not bool(torch.isfinite(model[k]).all()):
            raise ValueError(f"checkpoint {path}: {k} contains NaN or Inf")
    log.info("loaded checkpoint of round %d from %s", ckpt["round"], path)
    return ckpt
