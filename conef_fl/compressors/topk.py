"""Top-k: the ``k`` entries of largest magnitude, sent as int32 indices and values.

For large tensors ``torch.topk`` over all ``d`` entries is slow (279 ms at
d = 10M on the project's CPU). Above :data:`FAST_MIN_NUMEL` elements a threshold
is estimated from a strided sample, every entry at or above it becomes a
candidate, and ``torch.topk`` runs on the candidates only. If the estimate was
too high (fewer than ``k`` candidates) it falls back to the full ``torch.topk``,
so the result is always exactly a set of ``k`` largest ``|x|`` (ties broken
arbitrarily, as in ``torch.topk``). Indices are sent sorted ascending.
"""

from __future__ import annotations

import math

import torch

from conef_fl.compressors.base import Compressor, Payload, check_ratio, k_for_ratio, wire_value_dtype

__all__ = ["FAST_MIN_NUMEL", "TopK", "topk_indices"]

#: Tensors at least this large use the sampled-threshold path.
FAST_MIN_NUMEL = 1 << 18
_INT32_MAX = 2**31 - 1


def topk_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, sorted ascending) of ``k`` largest entries of the flat ``magnitude``.

    Exact: uses a sampled threshold to shortlist candidates for large inputs
    and ``torch.topk`` on the shortlist (or on everything if the shortlist is short).
    """
    d = magnitude.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=magnitude.device)
    if k >= d:
        return torch.arange(d, dtype=torch.int64, device=magnitude.device)
    if d >= FAST_MIN_NUMEL and k <= d // 4:
        step = max(1, d // max(8 * 1024, 32 * math.ceil(d / k)))  # sample ~>=32 per expected pick
        sample = magnitude[::step]
        s = sample.numel()
        # Rank in the sample a little below the k/d quantile, so usually > k candidates survive.
        rank = min(s, int(math.ceil(k / d * s * 1.05)) + 8)
        threshold = torch.topk(sample, rank, sorted=False).values.min()
        candidates = (magnitude >= threshold).nonzero().squeeze(1)
        if k <= candidates.numel() <= 4 * k + 1024:
            local = torch.topk(magnitude.index_select(0, candidates), k, sorted=False).indices
            return candidates.index_select(0, local).sort().values
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


class TopK(Compressor):
    """Top-k: ``k`` int32 indices + ``k`` values of largest ``|x|``. Contractive (``delta = 1 - k/d``).

    Not all-reducible: workers pick different coordinates, the receiver sums
    sparse vectors (:meth:`decompress_add_` adds them without a dense temporary).

    Parameters
    ----------
    ratio:
        Fraction of elements kept, ``0 < ratio <= 1``; ``k = max(1, min(d, round(ratio * d)))``.
    value_dtype:
        Wire dtype of the values: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
    """

    name = "top-k"
    contractive = True

    def __init__(self, ratio: float = 0.01, value_dtype: str = "float32") -> None:
        self.ratio = check_ratio(ratio)
        self.value_dtype = value_dtype
        self._dtype = wire_value_dtype(value_dtype)

    def __repr__(self) -> str:
        return f"TopK(ratio={self.ratio}, value_dtype={self.value_dtype!r})"

    def k_for(self, numel: int) -> int:
        """Number of entries sent for a tensor of ``numel`` elements."""
        return k_for_ratio(numel, self.ratio)

    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """Pick the ``k`` largest ``|x|`` (deterministic; ``seed`` and ``key`` are unused)."""
        flat = x.reshape(-1)
        d = flat.numel()
        if d > _INT32_MAX:
            raise ValueError(f"tensor has {d} elements; top-k's int32 indices allow at most {_INT32_MAX}")
        k = self.k_for(d)
        idx = topk_indices(flat.abs(), k)
        values = flat.index_select(0, idx).to(self._dtype)
        arrays = {"indices": idx.to(torch.int32), "values": values}
        return Payload(
            self.name, tuple(int(s) for s in x.shape), arrays, {"k": k, "value_dtype": self.value_dtype}
        )

    def _check(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        idx, values = payload.arrays["indices"], payload.arrays["values"]
        k = self.k_for(payload.numel)
        if idx.dtype != torch.int32 or idx.numel() != k or values.numel() != k:
            raise ValueError(
                f"top-k payload has {idx.numel()} {idx.dtype} indices and {values.numel()} values; "
                f"expected {k} int32 indices and values for shape {payload.shape}"
            )
        if k and (int(idx.min()) < 0 or int(idx.max()) >= payload.numel):
            raise ValueError(f"top-k indices out of range [0, {payload.numel})")
        return idx.to(torch.int64), values

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense float32 tensor with the ``k`` values at their indices."""
        idx, values = self._check(payload)
        out = torch.zeros(payload.numel, dtype=torch.float32, device=values.device)
        out.index_copy_(0, idx.to(values.device), values.to(torch.float32))
        return out.view(payload.shape)

    def decompress_add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha * Q(x)`` touching only the ``k`` sent entries."""
        idx, values = self._check(payload)
        if target.numel() != payload.numel:
            raise ValueError(f"target has {target.numel()} elements, payload shape {payload.shape}")
        flat = target.view(-1)
        flat.index_add_(0, idx.to(flat.device), values.to(flat.device, flat.dtype), alpha=alpha)
        return target

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """``k * (4 + value size)`` bytes."""
        k = self.k_for(math.prod(shape))
        return k * (4 + torch.empty((), dtype=self._dtype).element_size())
