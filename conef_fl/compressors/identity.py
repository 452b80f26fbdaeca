"""The identity compressor: the whole tensor goes on the wire (optionally in fp16/bf16)."""

from __future__ import annotations

import torch

from conef_fl.compressors.base import Payload, Selection
from conef_fl.compressors.random_block import SeededSelectiveCompressor

__all__ = ["Identity"]


class Identity(SeededSelectiveCompressor):
    """``Q(x) = x``: sends all ``d`` values (in ``value_dtype``), no indices.

    Unbiased and trivially contractive (``delta = 0``; exactly so for ``float32``
    values). Payloads are averaged directly (all-reducible). It is a selective
    compressor whose selection is the block ``[0, d)``, so error feedback can
    treat it like the others.

    Parameters
    ----------
    value_dtype:
        Wire dtype of the values: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
    """

    name = "identity"
    unbiased = True
    contractive = True

    def __init__(self, value_dtype: str = "float32") -> None:
        super().__init__(ratio=1.0, value_dtype=value_dtype)

    def __repr__(self) -> str:
        return f"Identity(value_dtype={self.value_dtype!r})"

    def k_for(self, numel: int) -> int:
        """All ``numel`` elements."""
        return max(0, numel)

    def select(self, numel: int, seed: int, device: torch.device | str = "cpu") -> Selection:
        """The whole tensor, independent of ``seed``."""
        return Selection(numel=numel, k=self.k_for(numel), start=0)

    def pack(
        self, values: torch.Tensor, selection: Selection, shape: tuple[int, ...], seed: int, *, owned: bool = False
    ) -> Payload:
        """Like the base ``pack``, but records seed 0: the selection does not depend on it."""
        return super().pack(values, selection, shape, 0, owned=owned)
