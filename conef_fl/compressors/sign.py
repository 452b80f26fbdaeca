"""Scaled sign: ``Q(x) = (||x||_1 / d) * sign(x)``, one bit per entry plus one float.

Contractive: ``||Q(x) - x||^2 = ||x||^2 - ||x||_1^2 / d < ||x||^2`` for ``x != 0``.
Zero entries are sent as ``+`` (this keeps the identity above exact).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from conef_fl import native
from conef_fl.bitpack import bits_of_bytes_table, pack_bits, pack_mask_into, packed_nbytes
from conef_fl.compressors.base import Compressor, DecompressByAdding, Payload, flat_target

__all__ = ["ScaledSign"]

#: Most entries per chunk of packing and unpacking (a multiple of 8): bounds the temporaries ...
CHUNK = 1 << 16


def _chunk(d: int) -> int:
    """... to about 1/128 of the vector (at least 8192 entries): a multiple of 8."""
    return max(1 << 13, min(CHUNK, d // 128)) // 8 * 8


class ScaledSign(DecompressByAdding, Compressor):
    """Scaled sign compressor.

    Wire: ``"signs"``: ``ceil(d/8)`` uint8 bytes (bit = 1 for ``x >= 0``, bit-packed 8
    per byte, little-endian bit order, see :mod:`conef_fl.bitpack`); ``"scale"``: one
    float32 ``||x||_1 / d``. Deterministic; takes no constructor arguments.
    """

    name = "scaled-sign"
    contractive = True

    def __repr__(self) -> str:
        return "ScaledSign()"

    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """Sign bits of ``x`` and the mean absolute value (``seed`` and ``key`` are unused).

        The bits of a contiguous float32 CPU ``x`` are packed by the compiled kernel where it
        is built (:mod:`conef_fl.native`), else chunk by chunk in torch: the same bytes.
        """
        flat = x.reshape(-1)
        d = flat.numel()
        l1 = torch.linalg.vector_norm(flat, 1, dtype=torch.float32)  # no |x| temporary
        scale = (l1 / max(d, 1)).to(torch.float32).reshape(1)
        signs = torch.empty(packed_nbytes(d, 1), dtype=torch.uint8, device=flat.device)
        if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous() \
                and not flat.requires_grad:
            kernels = native.ops()
            if kernels is not None:  # one pass, the same bytes (conef_fl.native)
                kernels.sign_pack_(flat, signs)
                return Payload(self.name, tuple(int(s) for s in x.shape), {"signs": signs, "scale": scale}, {})
        full = d - d % 8
        step = _chunk(d)
        mask = torch.empty(min(step, full), dtype=torch.bool, device=flat.device)
        for lo in range(0, full, step):  # no d-sized boolean: one chunk at a time
            c = min(step, full - lo)
            m = torch.ge(flat[lo : lo + c], 0, out=mask[:c])
            pack_mask_into(m, signs[lo // 8 : (lo + c) // 8])
        if full < d:  # the last partial byte
            signs[full // 8 :] = pack_bits(flat[full:] >= 0, 1)
        return Payload(self.name, tuple(int(s) for s in x.shape), {"signs": signs, "scale": scale}, {})

    def _check(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        signs, scale = payload.arrays["signs"], payload.arrays["scale"]
        if signs.dtype != torch.uint8 or signs.numel() != packed_nbytes(payload.numel, 1):
            raise ValueError(
                f"scaled-sign payload has {signs.numel()} {signs.dtype} sign bytes; expected "
                f"{packed_nbytes(payload.numel, 1)} uint8 for shape {payload.shape}"
            )
        if scale.numel() != 1:
            raise ValueError(f"scaled-sign payload scale must have 1 element, got {scale.numel()}")
        return signs, scale.to(signs.device, torch.float32)

    def decompress_add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha * Q(x)``, chunk by chunk (no dense float temporary).

        Every entry gets ``±s`` added with ``s = float32(scale · alpha)``, rounded once:
        on a contiguous float32 CPU target through the compiled kernel where it is built
        (:mod:`conef_fl.native`), else through numpy (a lookup table of ``±s`` per
        byte, gathered into a reused chunk buffer; the same sums bit for bit as the
        torch path, which adds ``±1`` with ``alpha=s``, used everywhere else).
        """
        signs, scale = self._check(payload)
        flat = flat_target(payload, target)
        s = float(scale) * alpha
        signs = signs.to(flat.device)
        if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous() \
                and not flat.requires_grad:
            kernels = native.ops()
            if kernels is not None and signs.is_contiguous():  # one pass, the same sums (conef_fl.native)
                kernels.sign_add_(flat, signs, s)
            else:
                _add_signs_numpy(signs, flat, s)
            return target
        d = payload.numel
        # row b: the ±1 of the eight entries of byte b (bit 1 -> +1, bit 0 -> -1)
        table = bits_of_bytes_table(flat.device).to(torch.float32).mul_(2).sub_(1)
        step = _chunk(d)
        pm = torch.empty((packed_nbytes(min(step, d), 1), 8), dtype=torch.float32, device=flat.device)
        for lo in range(0, d, step):
            c = min(step, d - lo)
            nb = packed_nbytes(c, 1)
            torch.index_select(table, 0, signs[lo // 8 : lo // 8 + nb].to(torch.int32), out=pm[:nb])
            flat[lo : lo + c].add_(pm[:nb].view(-1)[:c], alpha=s)  # ±s exact, one rounding
        return target

    def norm_sq(self, payload: Payload) -> float:
        """``d · scale²``: every entry of ``Q(x)`` is ``±scale`` (no decoding)."""
        _, scale = self._check(payload)
        return payload.numel * float(scale) ** 2

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """``ceil(d / 8) + 4`` bytes."""
        return packed_nbytes(math.prod(shape), 1) + 4


#: Row ``b``: the ±1 of the eight entries of byte ``b`` (bit 1 -> +1, bit 0 -> -1), float32.
PM_TABLE = bits_of_bytes_table("cpu").numpy().astype(np.float32) * np.float32(2) - np.float32(1)


def _add_signs_numpy(signs: torch.Tensor, flat: torch.Tensor, s: float) -> None:
    """``flat += ±s`` per bit of ``signs`` (CPU, contiguous float32 ``flat``), in chunks.

    ``±1 · float32(s)`` is exact, so each entry is ``fl(flat + (±s))``: the torch path's
    ``add_(±1, alpha=s)`` bit for bit. The chunk buffers (int64 byte values, float32
    ``±s``) are torch tensors, so memory measurements see them; numpy only computes.
    """
    d = flat.numel()
    step = _chunk(d)
    nb_max = packed_nbytes(min(step, d), 1)
    idx = torch.empty(nb_max, dtype=torch.int64).numpy()
    pm = torch.empty((nb_max, 8), dtype=torch.float32).numpy()
    add_sign_bytes(signs.numpy(), flat.detach().numpy(), s, idx, pm)


def add_sign_bytes(src: np.ndarray, out: np.ndarray, s: float, idx: np.ndarray, pm: np.ndarray) -> None:
    """``out += ±s`` per bit of the packed bytes ``src`` (bit 1 -> +s), in place, in chunks.

    Parameters
    ----------
    src:
        uint8 sign bytes, ``ceil(out.size / 8)`` of them (bit order of :mod:`conef_fl.bitpack`).
    out:
        Contiguous float32 values to add to.
    s:
        The scale; ``±1 · float32(s)`` is exact, so each entry is rounded once.
    idx, pm:
        Caller's scratch: ``idx`` integer (byte values), ``pm`` float32 of shape ``(len(idx), 8)``;
        a chunk is ``8 · len(idx)`` values (the caller sizes it to its memory budget).
    """
    d = out.size
    if d == 0:
        return
    step = 8 * idx.shape[0]
    if step == 0:
        raise ValueError(f"add_sign_bytes: empty scratch for {d} values; give idx at least one entry")
    table = PM_TABLE * np.float32(s)  # (256, 8): ±s, exact
    for lo in range(0, d, step):
        c = min(step, d - lo)
        nb = packed_nbytes(c, 1)
        idx[:nb] = src[lo // 8 : lo // 8 + nb]
        np.take(table, idx[:nb], axis=0, out=pm[:nb], mode="clip")  # byte values are 0..255
        part = out[lo : lo + c]
        np.add(part, pm[:nb].reshape(-1)[:c], out=part)
