"""Deterministic seed derivation: no global RNG is ever touched.

Every worker derives the same per-tensor seed from a shared base seed (the
round seed in Flower, the step seed in DDP) and a stable tensor key, so that
all-reducible compressors pick the same coordinates everywhere.
"""

from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def splitmix64(x: int) -> int:
    """One round of the SplitMix64 mixer (a bijection on 64-bit integers)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *parts: int | str) -> int:
    """Mix ``seed`` with ``parts`` (ints or strings) into a non-negative 63-bit seed.

    The result depends only on the arguments (strings are hashed with CRC-32),
    so it is identical across processes, machines and Python runs.
    """
    h = splitmix64(int(seed) & _MASK64)
    for part in parts:
        v = zlib.crc32(part.encode("utf-8")) if isinstance(part, str) else int(part) & _MASK64
        h = splitmix64(h ^ v)
    return h & _MASK63


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & _MASK63)
    return g
