"""QSGD (Alistarh et al. 2017): unbiased stochastic quantization to ``s`` levels.

``Q(x)_i = norm * sign(x_i) * l_i / s`` with ``l_i = floor(s |x_i| / norm + u_i)``,
``u_i ~ U[0, 1)`` from the compressor's private generator, so ``E[Q(x)] = x``.
``norm`` is ``||x||_2`` (the paper's choice; variance ``<= min(d/s^2, sqrt(d)/s) ||x||^2``)
or ``max |x_i|`` (``norm="max"``, lower variance, as the ConEF paper's quantizer).

Wire: ``"norm"``: one float32; ``"codes"``: per entry a ``b = 1 + ceil(log2(s + 1))``-bit
code ``(l_i << 1) | (x_i < 0)``, bit-packed with :mod:`conef_fl.bitpack`
(``ceil(d * b / 8)`` bytes). ``s <= 127`` so that ``b <= 8``.
Work is done in chunks, so no full-length float temporary besides the output.
"""

from __future__ import annotations

import math

import torch

from conef_fl.bitpack import CHUNK, pack_bits, packed_nbytes, unpack_bits
from conef_fl.compressors.base import (
    Compressor,
    DecompressByAdding,
    Payload,
    check_int,
    flat_target,
    private_generator,
    private_uniform,
)

__all__ = ["QSGD", "MAX_LEVELS"]

#: Largest ``s`` whose code (sign + level) fits in one byte.
MAX_LEVELS = 127
_NORMS = ("l2", "max")


class QSGD(DecompressByAdding, Compressor):
    """QSGD with ``levels`` quantization levels; unbiased.

    Parameters
    ----------
    levels:
        Number of levels ``s``, ``1 <= s <= 127``.
    norm:
        ``"l2"`` (default, as in QSGD) or ``"max"``.
    generator, seed:
        The private randomness of the stochastic rounding
        (:func:`~conef_fl.compressors.base.private_generator`, :func:`~conef_fl.compressors.base.private_uniform`).
    """

    name = "qsgd"
    unbiased = True

    def __init__(self, levels: int = 16, norm: str = "l2", generator: torch.Generator | None = None,
                 seed: int = 0) -> None:
        self.levels = check_int("levels", levels, 1, MAX_LEVELS)
        if norm not in _NORMS:
            raise ValueError(f"norm={norm!r} is not supported; allowed: {list(_NORMS)}")
        self.norm = norm
        self.bits = 1 + self.levels.bit_length()  # 1 + ceil(log2(s + 1))
        self.generator = private_generator(generator, seed)

    def __repr__(self) -> str:
        return f"QSGD(levels={self.levels}, norm={self.norm!r})"

    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """Quantize ``x`` (``seed``/``key`` unused: the rounding uses the private generator)."""
        flat = x.detach().reshape(-1)
        d = flat.numel()
        s = self.levels
        if d == 0:
            norm = torch.zeros(1, dtype=torch.float32, device=flat.device)
        elif self.norm == "l2":
            norm = torch.linalg.vector_norm(flat, dtype=torch.float32).reshape(1)
        else:
            norm = flat.abs().max().to(torch.float32).reshape(1)
        codes = torch.empty(packed_nbytes(d, self.bits), dtype=torch.uint8, device=flat.device)
        nval = float(norm.item())
        inv = s / nval if nval > 0 and math.isfinite(s / nval) else 0.0
        for lo in range(0, d, CHUNK):
            chunk = flat[lo : lo + CHUNK]
            scaled = chunk.abs().to(torch.float32).mul_(inv)  # a new tensor: x is never modified
            scaled.add_(private_uniform(self.generator, chunk.numel(), flat.device)).floor_()
            level = scaled.clamp_(0, s).to(torch.uint8)
            code = (level << 1) | (chunk < 0).to(torch.uint8)
            start = lo * self.bits // 8
            packed = pack_bits(code, self.bits)
            codes[start : start + packed.numel()] = packed
        return Payload(
            self.name,
            tuple(int(v) for v in x.shape),
            {"norm": norm, "codes": codes},
            {"levels": s, "bits": self.bits, "norm_type": self.norm},
        )

    def _check(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        if int(payload.meta.get("levels", -1)) != self.levels:
            raise ValueError(f"payload has levels={payload.meta.get('levels')}, compressor {self.levels}")
        codes, norm = payload.arrays["codes"], payload.arrays["norm"]
        need = packed_nbytes(payload.numel, self.bits)
        if codes.dtype != torch.uint8 or codes.numel() != need or norm.numel() != 1:
            raise ValueError(
                f"qsgd payload has {codes.numel()} {codes.dtype} code bytes and {norm.numel()} norms; "
                f"expected {need} uint8 and 1 for shape {payload.shape}"
            )
        return codes, norm.to(torch.float32)

    def decompress_add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha * Q(x)``, chunk by chunk (no dense float temporary)."""
        codes, norm = self._check(payload)
        flat = flat_target(payload, target)
        step = norm.to(flat.device) * (alpha / self.levels)
        d = payload.numel
        for lo in range(0, d, CHUNK):
            c = min(CHUNK, d - lo)
            start = lo * self.bits // 8
            code = unpack_bits(codes[start : start + packed_nbytes(c, self.bits)], self.bits, c)
            code = code.to(flat.device)
            value = (code >> 1).to(torch.float32)
            value.mul_(1 - 2 * (code & 1).to(torch.float32)).mul_(step)
            flat[lo : lo + c].add_(value.to(flat.dtype))
        return target

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """``ceil(d * b / 8) + 4`` bytes."""
        return packed_nbytes(math.prod(shape), self.bits) + 4
