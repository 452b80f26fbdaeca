"""Validation of payloads received from untrusted workers.

A receiver knows the tensor's shape, the compressor and the round's shared
seed, so it can build the *expected structure* of a payload (array names,
dtypes, shapes, metadata) from a probe compression of zeros and compare the
reply against it **before** decoding anything. Nothing is allocated in
proportion to a size the sender declares. Every rejection is a
:class:`PayloadError` whose message names the tensor and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from conef_fl.compressors import make_compressor
from conef_fl.compressors.base import Compressor, Payload

#: ATOMO metadata that differs between workers (checked against the arrays instead).
_ATOMO_VARIABLE_META = {"atoms", "num_atoms"}


class PayloadError(ValueError):
    """A payload from a worker failed validation (the message says which tensor and why)."""


@dataclass(frozen=True)
class ArraySpec:
    """Expected dtype and shape of one wire array (``None`` in a dim: variable, bounded)."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]
    #: Upper bound for variable dimensions.
    max_dim: int = 0


@dataclass(frozen=True)
class PayloadSpec:
    """Expected structure of the payload for one tensor."""

    kind: str
    shape: tuple[int, ...]
    arrays: Mapping[str, ArraySpec]
    meta: Mapping[str, object]


def expected_spec(compressor: Compressor, shape: tuple[int, ...], *, seed: int, key: str) -> PayloadSpec:
    """Build the expected payload structure by compressing zeros with a *fresh* probe compressor.

    The probe never touches the caller's compressor (PowerSGD keeps warm-start state).
    ATOMO sends a variable number of atoms ``j ≤ min(n, m)``; its atom dimension is
    marked variable.
    """
    probe = _fresh_probe(compressor)
    if compressor.name == "atomo":
        # ATOMO: a random rank-1 probe yields the array layout; atom count is variable
        ref = probe.compress(torch.ones(shape, dtype=torch.float32), seed=seed, key=key)
    else:  # the compression of zeros, or what the compressor says it sends (top-k: no selection run)
        ref = probe.payload_structure(tuple(shape), seed=seed, key=key)
    arrays: dict[str, ArraySpec] = {}
    for name, t in ref.arrays.items():
        dims: tuple[int | None, ...] = tuple(int(s) for s in t.shape)
        max_dim = 0
        if compressor.name == "atomo" and not ref.meta.get("dense", False) and t.ndim >= 1:
            n_atoms_dim = t.ndim - 1
            dims = tuple(None if i == n_atoms_dim else d for i, d in enumerate(dims))
            max_dim = max(1, min(_matrix_dims(shape)))
        arrays[name] = ArraySpec(t.dtype, dims, max_dim)
    meta = dict(ref.meta)
    if compressor.name == "atomo":
        meta = {k: v for k, v in meta.items() if k not in _ATOMO_VARIABLE_META}
    return PayloadSpec(ref.kind, tuple(int(s) for s in shape), arrays, meta)


def _matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) >= 2:
        return int(shape[0]), int(math.prod(shape[1:]))
    d = int(math.prod(shape))
    n = math.isqrt(max(d, 1))
    return max(n, 1), -(-d // max(n, 1))


def _fresh_probe(compressor: Compressor) -> Compressor:
    kwargs: dict[str, object] = {}
    for attr in ("ratio", "value_dtype", "rank", "levels", "norm"):
        if hasattr(compressor, attr):
            kwargs[attr] = getattr(compressor, attr)
    try:
        return make_compressor(compressor.name, **kwargs)
    except TypeError:
        return make_compressor(compressor.name)


def validate_payload(payload: Payload, spec: PayloadSpec, *, key: str) -> None:
    """Check ``payload`` against ``spec``; raise :class:`PayloadError` naming ``key`` and the problem.

    The structure (:func:`validate_structure`), then the values: no NaN/Inf in any float
    array, indices in range and strictly increasing (:func:`check_values`).
    """
    validate_structure(payload, spec, key=key)
    _check_values_of(payload, f"tensor {key!r}")


def validate_structure(payload: Payload, spec: PayloadSpec, *, key: str) -> None:
    """Every check of :func:`validate_payload` that does not read the values (kind, shapes, dtypes, metadata)."""
    where = f"tensor {key!r}"
    if payload.kind != spec.kind:
        raise PayloadError(f"{where}: compressor {payload.kind!r}, expected {spec.kind!r}")
    if tuple(payload.shape) != spec.shape:
        raise PayloadError(f"{where}: shape {tuple(payload.shape)}, expected {spec.shape}")
    names, want = set(payload.arrays), set(spec.arrays)
    if names != want:
        raise PayloadError(f"{where}: arrays {sorted(names)}, expected {sorted(want)}")
    for name, aspec in spec.arrays.items():
        t = payload.arrays[name]
        if not isinstance(t, torch.Tensor):
            raise PayloadError(f"{where}: array {name!r} is {type(t).__name__}, not a tensor")
        if t.dtype != aspec.dtype:
            raise PayloadError(f"{where}: array {name!r} has dtype {t.dtype}, expected {aspec.dtype}")
        if t.ndim != len(aspec.shape):
            raise PayloadError(f"{where}: array {name!r} has shape {tuple(t.shape)}, expected {aspec.shape}")
        for i, (got, exp) in enumerate(zip(t.shape, aspec.shape, strict=True)):
            if exp is None:
                if not 0 <= got <= aspec.max_dim:
                    raise PayloadError(
                        f"{where}: array {name!r} dim {i} is {got}, allowed 0..{aspec.max_dim}"
                    )
            elif got != exp:
                raise PayloadError(f"{where}: array {name!r} has shape {tuple(t.shape)}, expected {aspec.shape}")
    variable = [n for n, a in spec.arrays.items() if None in a.shape]
    if len(variable) > 1:  # ATOMO: every variable dim must agree (same number of atoms)
        counts = {n: payload.arrays[n].shape[[i for i, d in enumerate(spec.arrays[n].shape) if d is None][0]]
                  for n in variable}
        if len(set(counts.values())) != 1:
            raise PayloadError(f"{where}: inconsistent atom counts {counts}")
    extra = set(payload.meta) - set(spec.meta) - (_ATOMO_VARIABLE_META if spec.kind == "atomo" else set())
    if extra:
        raise PayloadError(f"{where}: unexpected metadata {sorted(extra)}")
    for mkey, mval in spec.meta.items():
        if mkey not in payload.meta:
            raise PayloadError(f"{where}: metadata {mkey!r} is missing")
        got = payload.meta[mkey]
        if type(got) is not type(mval) and not (isinstance(got, (int, float)) and isinstance(mval, (int, float))):
            raise PayloadError(f"{where}: metadata {mkey!r}={got!r} has the wrong type")
        if got != mval:
            raise PayloadError(f"{where}: metadata {mkey}={got!r}, expected {mval!r}")


def check_values(payloads: Mapping[str, Payload]) -> None:
    """The value checks of :func:`validate_payload` for all tensors of one reply, batched.

    No NaN/Inf in any float array: one max-abs reduction per float dtype over all
    the reply's arrays of that dtype. ``"indices"`` arrays in range and strictly
    increasing: one pass over all of them, shifted to disjoint ranges with a sentinel
    between neighbours (numpy; CPU tensors). Only when one of these fails are the
    tensors checked one by one, in order, for the message that names the tensor.

    Raises
    ------
    PayloadError
        Naming the first tensor (in ``payloads`` order) whose values are bad.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    segments: list[tuple[torch.Tensor, int]] = []
    for p in payloads.values():
        for t in p.arrays.values():
            if t.is_floating_point() and t.numel():
                by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
        if "indices" in p.arrays:
            segments.append((p.arrays["indices"], p.numel))
    ok = all(_all_finite(ts) for ts in by_dtype.values()) and _indices_ok(segments)
    if ok:
        return
    for key, p in payloads.items():
        _check_values_of(p, f"tensor {key!r}")
    raise PayloadError("payload values are invalid (NaN/Inf or bad indices)")  # not reached: a tensor raised


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN/Inf in any of the flat ``tensors`` (one dtype): one max-abs reduction over them all."""
    x = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    if x.dtype != torch.float32:
        x = x.float()
    return bool(torch.isfinite(torch.linalg.vector_norm(x, ord=float("inf"))))


def _indices_ok(segments: list[tuple[torch.Tensor, int]]) -> bool:
    """Whether every ``(indices, numel)`` segment lies in ``[0, numel)`` and strictly increases.

    The segments are written one after another into one int64 array, segment ``i``
    shifted by ``base_i`` (``base_{i+1} = base_i + numel_i + 1``) and framed by the
    sentinels ``base_i - 1`` and ``base_i + numel_i``: the whole array strictly
    increases exactly when every segment is valid.
    """
    if not segments:
        return True
    if any(t.device.type != "cpu" for t, _ in segments):
        return False  # checked tensor by tensor
    g = np.empty(sum(t.numel() for t, _ in segments) + len(segments) + 1, dtype=np.int64)
    g[0] = -1
    pos, base = 1, 0
    for idx, numel in segments:
        k = idx.numel()
        seg = g[pos : pos + k]
        seg[...] = idx.reshape(-1).numpy()
        seg += base
        base += numel + 1
        pos += k
        g[pos] = base - 1
        pos += 1
    return bool((g[1:] > g[:-1]).all())


def _check_values_of(payload: Payload, where: str) -> None:
    """NaN/Inf in float arrays and bad indices of one payload (PayloadError naming ``where``)."""
    for name, t in payload.arrays.items():
        if t.is_floating_point() and t.numel() and not bool(
            torch.isfinite(torch.linalg.vector_norm(t.float(), ord=float("inf")))
        ):
            raise PayloadError(f"{where}: array {name!r} contains NaN or Inf")
    if "indices" in payload.arrays:
        _check_indices(payload.arrays["indices"], payload.numel, where)


def _check_indices(idx: torch.Tensor, numel: int, where: str) -> None:
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        raise PayloadError(f"{where}: indices out of range [{lo}, {hi}] for {numel} elements")
    flat = idx.reshape(-1).to(torch.int64)
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise PayloadError(f"{where}: indices are not strictly increasing (duplicates or unsorted)")
