"""Receiver side: weighted average of payloads, in compressed space where possible.

:class:`DenseAccumulator` adds decoded payloads into dense float32 tensors, bit for bit as
``compressor.decompress_add_``, with the receiver's fast paths (the server of
:mod:`conef_fl.flower` adds every reply of a round through it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from conef_fl import native
from conef_fl.compressors.base import Compressor, Payload, flat_target, normalized_weights
from conef_fl.compressors.sign import ScaledSign, add_sign_bytes
from conef_fl.compressors.topk import TopK

#: Values per chunk of the receiver's scaled-sign decode (a multiple of 8). Its scratch, reused
#: across payloads: ``SIGN_CHUNK`` float32 ``±s`` plus ``SIGN_CHUNK / 8`` int64 byte values
#: (160 KiB). The client's step decodes in chunks of at most 1/128 of the tensor instead
#: (:mod:`conef_fl.compressors.sign`, bounded by its 2 %-of-4d transient limit); a server
#: holds the dense sum anyway, and fewer chunks are fewer numpy calls per reply.
SIGN_CHUNK = 1 << 15


def average_payloads(compressor: Compressor, payloads: Sequence[Payload], weights: Sequence[float]) -> torch.Tensor:
    """``Σ_i w_i · Q⁻¹(payload_i)`` (weights normalised) as a dense float32 tensor.

    All-reducible compressors average the wire arrays first and decompress once;
    the others decompress each payload into one accumulator.
    """
    w = normalized_weights(weights)
    if len(payloads) != len(w):
        raise ValueError(f"got {len(payloads)} payloads but {len(w)} weights")
    if compressor.all_reducible:
        return compressor.decompress(compressor.aggregate(payloads, w))
    first = payloads[0]
    acc = torch.zeros(first.numel, dtype=torch.float32, device=next(iter(first.arrays.values())).device)
    dense = DenseAccumulator(compressor)
    for wi, p in zip(w, payloads, strict=True):
        dense.add_(p, acc, alpha=wi)
    return acc.view(first.shape)


class DenseAccumulator:
    """``target += alpha · Q⁻¹(payload)``, the same sums bit for bit as ``compressor.decompress_add_``.

    On a contiguous float32 CPU target:

    * **top-k**: one ``index_add_`` of the payload's int32 indices and values (what
      ``TopK.decompress_add_`` calls for up to 65,536 values, without its second pass over
      the indices for their range: the receiver's decoder checked them, and ``index_add_``
      refuses an index out of range itself);
    * **scaled sign**: the compiled ``sign_add_`` of :mod:`conef_fl.native` where it is built
      and enabled (looked up once per accumulator; the kernel ``ScaledSign.decompress_add_``
      calls, without its per-call checks and look-ups), else ``±float32(scale · alpha)``
      gathered per sign byte from a (256, 8) table into reused scratch, :data:`SIGN_CHUNK`
      values at a time, and added with numpy (``±1 · s`` is exact, so each entry is
      ``fl(target + (±s))``, as the compressor's ``add_(±1, alpha=s)``).

    Everything else, and any payload these paths do not recognise, goes to
    ``compressor.decompress_add_`` (which checks and refuses it).
    """

    def __init__(self, compressor: Compressor) -> None:
        self.q = compressor
        self._sign = isinstance(compressor, ScaledSign)
        self._topk = isinstance(compressor, TopK)
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None
        self._kernels = native.ops() if self._sign else None
        self._ks: dict[int, int] = {}

    def add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · Q⁻¹(payload)`` in place; returns ``target``."""
        if (self._sign or self._topk) and payload.kind == self.q.name and target.dtype == torch.float32 \
                and target.device.type == "cpu" and target.is_contiguous() and not target.requires_grad:
            arrays = payload.arrays
            flat = flat_target(payload, target)
            if self._topk:
                idx, values = arrays.get("indices"), arrays.get("values")
                if idx is not None and values is not None and idx.dtype == torch.int32 \
                        and values.dtype == torch.float32 and not idx.is_cuda and not values.is_cuda \
                        and idx.numel() == values.numel() <= 1 << 16 and idx.numel() == self._k(payload.numel):
                    flat.index_add_(0, idx, values, alpha=alpha)
                    return target
            else:
                signs, scale = arrays.get("signs"), arrays.get("scale")
                if signs is not None and scale is not None and signs.dtype == torch.uint8 \
                        and scale.dtype == torch.float32 and signs.device.type == "cpu" \
                        and scale.device.type == "cpu" and signs.numel() == (payload.numel + 7) // 8 \
                        and scale.numel() == 1:
                    if self._kernels is not None and signs.is_contiguous():
                        self._kernels.sign_add_(flat, signs, float(scale) * alpha)
                    else:
                        self._add_signs(signs.numpy(), float(scale) * alpha, flat.numpy())
                    return target
        self.q.decompress_add_(payload, target, alpha=alpha)
        return target

    def _k(self, numel: int) -> int:
        """Top-k's ``k_for(numel)``, computed once per size."""
        k = self._ks.get(numel)
        if k is None:
            k = self._ks[numel] = self.q.k_for(numel)  # type: ignore[attr-defined]
        return k

    def _add_signs(self, src: np.ndarray, s: float, out: np.ndarray) -> None:
        """``out += ±s`` per bit of ``src`` (bit 1 -> +s), :data:`SIGN_CHUNK` values at a time."""
        if self._scratch is None:
            self._scratch = (np.empty(SIGN_CHUNK // 8, dtype=np.intp), np.empty((SIGN_CHUNK // 8, 8), dtype=np.float32))
        idx, pm = self._scratch
        add_sign_bytes(src, out, s, idx, pm)

    def release(self) -> None:
        """Drop the scratch buffers (the next scaled-sign payload allocates them again)."""
        self._scratch = None
