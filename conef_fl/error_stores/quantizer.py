"""Stochastic quantization of the error (QSGD-style, max-norm scaling), really bit-packed.

Entry ``j`` is stored as a sign bit and a level ``l_j ∈ {0, …, s}`` with
``E[l_j] = s·|x_j| / max|x|`` (stochastic rounding), so the reconstruction
``max|x| · sign(x_j) · l_j / s`` is unbiased. Codes take ``1 + ceil(log2(s+1))``
bits each and are packed densely with :func:`conef_fl.bitpack.pack_bits`; the
only float kept is the scale. Memory: ``ceil(d·b/8) + 1`` bytes plus 4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from conef_fl.bitpack import pack_bits, packed_nbytes, unpack_bits
from conef_fl.error_stores.base import ErrorStore, _check_same, check_finite, validate_tensor
from conef_fl.seeding import make_generator

#: Values quantized per chunk (a multiple of 8 so that chunks map to whole bytes).
_CHUNK = 1 << 16


def code_bits(levels: int) -> int:
    """Bits per entry for ``levels`` quantization levels: ``1 + ceil(log2(levels + 1))``."""
    return 1 + math.ceil(math.log2(levels + 1))


class QuantizedError(ErrorStore):
    """Error stored as an unbiased ``levels``-level stochastic quantization.

    Parameters
    ----------
    numel:
        Length of the error vector.
    levels:
        Quantization levels s (1 to 127, so that a code fits in 8 bits).
    seed:
        Seed of the private generator used for stochastic rounding.
    device:
        Device of the stored bytes.
    """

    linear = False
    name = "quantizer"

    def __init__(self, numel: int, *, levels: int = 16, seed: int = 0, device: torch.device | str = "cpu"):
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"quantizer levels={levels!r} is out of range; allowed: integers 1..127")
        if numel < 1:
            raise ValueError(f"numel={numel} must be >= 1")
        self.numel = int(numel)
        self.levels = levels
        self.bits = code_bits(levels)
        # one spare byte so that reading two bytes for the last code stays in range
        self.packed = torch.zeros(packed_nbytes(self.numel, self.bits) + 1, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(1, dtype=torch.float32, device=device)
        self.generator = make_generator(seed, device)

    @property
    def nbytes(self) -> int:
        return self.packed.untyped_storage().nbytes() + self.scale.untyped_storage().nbytes()

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scale]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        sign_bit = 1 << (self.bits - 1)
        level = (codes.to(torch.int32) & (sign_bit - 1)).to(torch.float32)
        neg = (codes.to(torch.int32) & sign_bit) != 0
        vals = level.mul_(float(self.scale) / self.levels)
        return torch.where(neg, -vals, vals)

    def _chunk_values(self, lo: int, hi: int) -> torch.Tensor:
        byte_lo = lo * self.bits // 8
        byte_hi = packed_nbytes(hi, self.bits)
        codes = unpack_bits(self.packed[byte_lo:byte_hi], self.bits, hi - lo)
        return self._decode(codes)

    def estimate_add_(self, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        flat = target.view(-1)
        if flat.numel() != self.numel:
            raise ValueError(f"target has {flat.numel()} elements, store expects {self.numel}")
        if float(self.scale) == 0.0:
            return target
        for lo in range(0, self.numel, _CHUNK):
            hi = min(self.numel, lo + _CHUNK)
            flat[lo:hi].add_(self._chunk_values(lo, hi).to(flat.dtype), alpha=alpha)
        return target

    def estimate_at(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.reshape(-1).to(self.packed.device, torch.int64)
        bitpos = idx * self.bits
        byte = torch.div(bitpos, 8, rounding_mode="floor")
        shift = bitpos - byte * 8
        lo = self.packed.index_select(0, byte).to(torch.int32)
        hi = self.packed.index_select(0, byte + 1).to(torch.int32)
        codes = ((lo | (hi << 8)) >> shift.to(torch.int32)) & ((1 << self.bits) - 1)
        return self._decode(codes)

    def estimate_block(self, start: int, length: int) -> torch.Tensor:
        idx = torch.arange(start, start + length, device=self.packed.device)
        return self.estimate_at(idx)

    def assign_(self, x: torch.Tensor) -> QuantizedError:
        flat = x.reshape(-1)
        if flat.numel() != self.numel:
            raise ValueError(f"x has {flat.numel()} elements, store expects {self.numel}")
        check_finite(flat, "error vector")
        scale = float(torch.linalg.vector_norm(flat, ord=float("inf")))
        self.scale.fill_(scale)
        if scale == 0.0:
            self.packed.zero_()
            return self
        sign_bit = 1 << (self.bits - 1)
        for lo in range(0, self.numel, _CHUNK):
            hi = min(self.numel, lo + _CHUNK)
            xc = flat[lo:hi].to(torch.float32)
            noise = torch.rand(hi - lo, generator=self.generator, device=self.generator.device)
            level = xc.abs().mul_(self.levels / scale).add_(noise.to(xc.device)).floor_().clamp_(0, self.levels)
            codes = level.to(torch.uint8) | ((xc < 0).to(torch.uint8) * sign_bit)
            packed = pack_bits(codes, self.bits)
            byte_lo = lo * self.bits // 8
            self.packed[byte_lo : byte_lo + packed.numel()].copy_(packed)
        return self

    def zero_(self) -> QuantizedError:
        self.packed.zero_()
        self.scale.zero_()
        return self

    def state_dict(self) -> dict[str, object]:
        return {
            "kind": self.name,
            "numel": self.numel,
            "levels": self.levels,
            "packed": self.packed,
            "scale": self.scale,
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_same("kind", state.get("kind"), self.name)
        _check_same("numel", state.get("numel"), self.numel)
        _check_same("levels", state.get("levels"), self.levels)
        packed = validate_tensor(state, "packed", tuple(self.packed.shape), torch.uint8)
        scale = validate_tensor(state, "scale", (1,), torch.float32)
        check_finite(scale, "loaded quantizer scale")
        self.packed.copy_(packed)
        self.scale.copy_(scale)
        rng = state.get("rng")
        if isinstance(rng, torch.Tensor):
            self.generator.set_state(rng)
