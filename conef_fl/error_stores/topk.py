"""Top-k storage of the error (the hEFSGD baseline): sorted int32 indices + float32 values."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from conef_fl.error_stores.base import ErrorStore, _check_same, check_finite, validate_tensor


class TopKError(ErrorStore):
    """Keep only the ``k`` largest-magnitude entries of the error (biased; nothing dense kept).

    ``assign_`` ranks ``|x|`` with ``torch.topk``, which allocates one temporary of
    ``numel`` floats during the step (reported by the memory benchmark).
    """

    linear = False
    name = "top-k"

    def __init__(self, numel: int, *, ratio: float = 0.05, device: torch.device | str = "cpu"):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"error top-k ratio={ratio!r} is out of range; allowed: (0, 1]")
        self.numel = int(numel)
        self.k = max(1, min(self.numel, round(ratio * self.numel)))
        self.indices = torch.zeros(self.k, dtype=torch.int32, device=device)
        self.values = torch.zeros(self.k, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.indices.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [self.indices, self.values]

    def estimate_add_(self, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        flat = target.view(-1)
        flat.index_add_(0, self.indices.to(torch.int64), self.values.to(flat.dtype), alpha=alpha)
        return target

    def estimate_at(self, indices: torch.Tensor) -> torch.Tensor:
        q = indices.reshape(-1).to(self.indices.device, torch.int64)
        keys = self.indices.to(torch.int64)
        pos = torch.searchsorted(keys, q).clamp_(max=self.k - 1)
        hit = keys.index_select(0, pos) == q
        return torch.where(hit, self.values.index_select(0, pos), torch.zeros((), device=q.device))

    def estimate_block(self, start: int, length: int) -> torch.Tensor:
        return self.estimate_at(torch.arange(start, start + length, device=self.indices.device))

    def assign_(self, x: torch.Tensor) -> TopKError:
        flat = x.reshape(-1)
        check_finite(flat, "error vector")
        idx = torch.topk(flat.abs(), self.k, sorted=False).indices
        idx, _ = torch.sort(idx)
        self.values.copy_(flat.index_select(0, idx))
        self.indices.copy_(idx)
        return self

    def zero_(self) -> TopKError:
        self.values.zero_()
        self.indices.copy_(torch.arange(self.k, dtype=torch.int32, device=self.indices.device))
        return self

    def state_dict(self) -> dict[str, object]:
        return {"kind": self.name, "numel": self.numel, "k": self.k, "indices": self.indices, "values": self.values}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_same("kind", state.get("kind"), self.name)
        _check_same("numel", state.get("numel"), self.numel)
        _check_same("k", state.get("k"), self.k)
        idx = validate_tensor(state, "indices", (self.k,), torch.int32)
        vals = validate_tensor(state, "values", (self.k,), torch.float32)
        check_finite(vals, "loaded top-k error values")
        if self.k and (int(idx.min()) < 0 or int(idx.max()) >= self.numel):
            raise ValueError(f"top-k error indices out of range [0, {self.numel})")
        if self.k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("top-k error indices must be strictly increasing")
        self.indices.copy_(idx)
        self.values.copy_(vals)
