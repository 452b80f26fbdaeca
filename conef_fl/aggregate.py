"""Receiver side: weighted average of payloads, in compressed space where possible."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conef_fl.compressors.base import Compressor, Payload, normalized_weights


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
    for wi, p in zip(w, payloads, strict=True):
        compressor.decompress_add_(p, acc, alpha=wi)
    return acc.view(first.shape)
