"""Random-block-k and rbSGD: a contiguous block of ``k`` coordinates chosen by a shared seed.

Every worker derives the same block start from the shared seed and the tensor
key, so only the ``k`` values travel (no indices) and payloads of different
workers can be averaged in compressed form (all-reducible).

:class:`SeededSelectiveCompressor` holds what random-block-k, rbSGD, random-k
and identity share: the value-only wire format, ``decompress_add_`` without a
dense temporary, and ``aggregate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conef_fl.compressors.base import (
    KeepsRatio,
    Payload,
    Selection,
    SelectiveCompressor,
    flat_target,
    normalized_weights,
)
from conef_fl.seeding import derive_seed

__all__ = ["RandomBlockK", "RBSGD", "SeededSelectiveCompressor"]


class SeededSelectiveCompressor(KeepsRatio, SelectiveCompressor):
    """Base for compressors that send only the values at a seed-determined selection.

    Wire format: ``arrays = {"values": k values in value_dtype}``;
    ``meta = {"seed": per-tensor seed, "k": k, "value_dtype": name}``. The values
    on the wire are the *unscaled* selected entries of ``x``; ``decompress``
    multiplies by :meth:`value_scale` (so rbSGD's ``d/k`` never overflows fp16).
    Parameters: ``ratio`` and ``value_dtype`` (:class:`~conef_fl.compressors.base.KeepsRatio`).
    """

    all_reducible = True

    # -- sender -------------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """Send the values of ``x`` at the selection of ``tensor_seed(seed, key)``."""
        tseed = self.tensor_seed(seed, key)
        flat = x.reshape(-1)
        selection = self.select(flat.numel(), tseed, flat.device)
        return self.pack(selection.gather(flat), selection, tuple(x.shape), tseed, owned=True)

    def pack(
        self, values: torch.Tensor, selection: Selection, shape: tuple[int, ...], seed: int, *, owned: bool = False
    ) -> Payload:
        """Build the payload from the ``k`` selected (unscaled) values.

        ``seed`` is the per-tensor seed given to :meth:`select` (``tensor_seed(seed, key)``).
        """
        if values.numel() != selection.k:
            raise ValueError(f"values has {values.numel()} elements, selection.k={selection.k}")
        wire = values.detach().reshape(-1)
        if not (owned and wire.dtype == self._dtype and wire.is_contiguous()):
            wire = wire.to(self._dtype, copy=True)
        meta = {"seed": int(seed), "k": selection.k, "value_dtype": self.value_dtype}
        return Payload(self.name, tuple(int(s) for s in shape), {"values": wire}, meta)

    # -- receiver -----------------------------------------------------------------------------
    def _check(self, payload: Payload) -> tuple[Selection, torch.Tensor]:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        values = payload.arrays["values"]
        numel = payload.numel
        k = self.k_for(numel)
        if int(payload.meta.get("k", -1)) != k or values.numel() != k:
            raise ValueError(
                f"payload has k={payload.meta.get('k')} and {values.numel()} values; "
                f"expected k={k} for shape {payload.shape}"
            )
        return self.select(numel, int(payload.meta["seed"]), values.device), values

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense float32 tensor: ``value_scale * values`` at the selection, zero elsewhere."""
        selection, values = self._check(payload)
        out = torch.zeros(payload.numel, dtype=torch.float32, device=values.device)
        scale = self.value_scale(payload.numel)
        vals = values.to(torch.float32)
        selection.scatter_(out, vals * scale if scale != 1.0 else vals)
        return out.view(payload.shape)

    def decompress_add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha * Q(x)`` touching only the ``k`` selected entries."""
        selection, values = self._check(payload)
        selection.add_(flat_target(payload, target), values, alpha=alpha * self.value_scale(payload.numel))
        return target

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """Weighted average of the value arrays (all payloads must share shape, seed and ``k``).

        Raises
        ------
        ValueError
            On an empty list, a length mismatch with ``weights``, or payloads of
            a different kind, shape, seed, ``k`` or value dtype.
        """
        if not payloads:
            raise ValueError("payloads must not be empty")
        if len(payloads) != len(weights):
            raise ValueError(f"got {len(payloads)} payloads but {len(weights)} weights")
        acc: Payload | None = None
        for wi, p in zip(normalized_weights(weights), payloads, strict=True):
            self._check(p)
            acc = self.sum_into_(acc, p, wi)
        # the average stays in float32: rounding it back to a 16-bit wire dtype would add error
        assert acc is not None
        return acc

    def sum_into_(self, acc: Payload | None, payload: Payload, weight: float) -> Payload:
        """``acc + weight · payload`` on the float32 value arrays (see :meth:`Compressor.sum_into_`).

        A payload that starts a sum is checked in full (``k`` and the value count for
        its shape); later ones must match it in kind, shape, metadata and value count.
        """
        values = payload.arrays["values"]
        if acc is None:
            self._check(payload)
            summed = values.detach().to(torch.float32, copy=True).reshape(-1).mul_(weight)
            return Payload(self.name, tuple(payload.shape), {"values": summed}, dict(payload.meta))
        mine = acc.arrays["values"]
        if (payload.kind != acc.kind or tuple(payload.shape) != tuple(acc.shape)
                or dict(payload.meta) != dict(acc.meta) or values.numel() != mine.numel()):
            raise ValueError(
                f"payload (kind {payload.kind!r}, shape {tuple(payload.shape)}, meta {dict(payload.meta)}) cannot "
                f"be averaged with the sum (kind {acc.kind!r}, shape {tuple(acc.shape)}, meta {dict(acc.meta)}): "
                "seeds/shapes/k must match"
            )
        mine.add_(values.reshape(-1), alpha=weight)
        return acc

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """``k * value size`` bytes."""
        numel = 1
        for s in shape:
            numel *= int(s)
        return self.k_for(numel) * torch.empty((), dtype=self._dtype).element_size()


class RandomBlockK(SeededSelectiveCompressor):
    """Random-block-k (unscaled): ``k`` contiguous values from a seed-derived start, wrapping around.

    Contractive with ``delta = 1 - k/d`` in expectation over the seed; all-reducible.
    """

    name = "random-block-k"
    contractive = True
    block_selection = True

    def select(self, numel: int, seed: int, device: torch.device | str = "cpu") -> Selection:
        """Block ``[start, start + k) mod numel`` with ``start = derive_seed(seed, numel) % numel``."""
        k = self.k_for(numel)
        start = derive_seed(seed, numel) % numel if numel > 0 else 0
        return Selection(numel=numel, k=k, start=start)


class RBSGD(RandomBlockK):
    """rbSGD: the random block of :class:`RandomBlockK` scaled by ``d/k`` (unbiased over the seed)."""

    name = "rbsgd"
    contractive = False
    unbiased = True

    def value_scale(self, numel: int) -> float:
        """``d / k``."""
        k = self.k_for(numel)
        return numel / k if k else 1.0
