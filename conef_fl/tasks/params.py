"""Conversions between a model's parameters and flat tensors / numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["get_flat_params", "model_to_ndarrays", "ndarrays_to_model", "set_flat_params"]


def get_flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` (``model.parameters()`` order) as one new 1-D tensor.

    The result is a detached copy on the parameters' device and dtype.
    """
    params = [p.detach().reshape(-1) for p in model.parameters()]
    if not params:
        return torch.zeros(0)
    return torch.cat(params)


@torch.no_grad()
def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a 1-D tensor laid out as by :func:`get_flat_params` into ``model``'s parameters.

    Raises
    ------
    ValueError
        If ``flat`` is not 1-D or its length differs from the number of parameters.
    """
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ValueError(f"flat must be a 1-D tensor, got {getattr(flat, 'shape', type(flat).__name__)}")
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat has {flat.numel()} elements but the model has {total} parameters")
    offset = 0
    for p in params:
        k = p.numel()
        p.copy_(flat[offset : offset + k].view_as(p))
        offset += k


def model_to_ndarrays(model: nn.Module) -> list[np.ndarray]:
    """``model.state_dict()`` values, in key order, as new numpy arrays (CPU copies)."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def ndarrays_to_model(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays laid out as by :func:`model_to_ndarrays` into ``model``.

    Values are cast to each entry's dtype and device.

    Raises
    ------
    ValueError
        If the number of arrays differs from the number of ``state_dict`` entries,
        or an array's shape differs from its entry's (the message names the key).
    """
    state = model.state_dict()
    arrays = list(arrays)
    if len(arrays) != len(state):
        raise ValueError(f"got {len(arrays)} arrays but the model's state_dict has {len(state)} entries")
    new_state = {}
    for (key, ref), arr in zip(state.items(), arrays, strict=True):
        arr = np.asarray(arr)
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"array for {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        new_state[key] = torch.as_tensor(arr).to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(new_state, strict=True)
