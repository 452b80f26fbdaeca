"""Shared helpers of the compressor tests: the names, small-test defaults and random inputs."""

from __future__ import annotations

import math

import torch

from conef_fl.compressors import (
    Compressor,
    Payload,
    make_compressor,
)
from conef_fl.config import GRADIENT_COMPRESSORS

NAMES = list(GRADIENT_COMPRESSORS)


RATIO_NAMES = {"random-block-k", "random-k", "top-k", "rbsgd"}


SELECTIVE_NAMES = ["identity", "random-block-k", "random-k", "rbsgd"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(name: str, **kwargs: object) -> Compressor:
    """A compressor with small-test defaults (ratio 0.25, rank 2, levels 4)."""
    defaults: dict[str, object] = {}
    if name in RATIO_NAMES:
        defaults["ratio"] = 0.25
    if name in ("powersgd", "atomo"):
        defaults["rank"] = 2
    if name == "qsgd":
        defaults["levels"] = 4
    if name in ("qsgd", "atomo"):
        defaults["generator"] = torch.Generator().manual_seed(1234)
    defaults.update(kwargs)
    return make_compressor(name, **defaults)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def array_bytes(p: Payload) -> int:
    return sum(a.numel() * a.element_size() for a in p.arrays.values())


def _z_scores(samples: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|mean - x| / standard error, per coordinate (0 where the samples do not vary)."""
    mean, std = samples.mean(0), samples.std(0)
    err = (mean - x).abs()
    se = std / math.sqrt(samples.shape[0])
    return torch.where(se > 0, err / se.clamp_min(1e-12), err * 1e6)


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of k largest |x|, ties towards lower indices (a stable sort)."""
    order = torch.sort(x.abs().double(), descending=True, stable=True).indices[:k]
    return order.sort().values
