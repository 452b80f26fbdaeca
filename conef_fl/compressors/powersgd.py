"""PowerSGD (Vogels et al. 2019): rank-``r`` approximation by one warm-started power iteration.

Per tensor key the compressor keeps the last ``Q`` (``m x r``) and computes

    P = M Q;  P = orth(P);  Q = M^T P;  send P (n x r), Q (m x r);  Q(x) = P Q^T

where ``M`` is the ``n x m`` matrix view of the tensor (:func:`matrix_view_shape`):
``(shape[0], prod(shape[1:]))`` for ``ndim >= 2``, and a near-square ``ceil(sqrt(d))``
rows view, zero-padded, for 0-/1-D tensors (flat DDP buckets, biases). When the
factors would not be smaller than the tensor (``(n + m) * r >= d``) the tensor is
sent dense (``{"values": ...}``, ``meta["dense"] = True``) and no state is kept.

``P P^T M`` is an orthogonal projection of ``M``'s columns, so
``||Q(x) - x|| <= ||x||`` always, strictly when ``M Q != 0`` (contractive, heuristically
with a ``delta`` that depends on the spectrum).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from conef_fl.compressors.base import Compressor, Payload, check_int, wire_value_dtype
from conef_fl.seeding import derive_seed, make_generator

__all__ = [
    "PowerSGD",
    "as_matrix",
    "factor_product",
    "matrix_view_shape",
    "orthogonalize",
    "project_back",
    "uses_dense",
    "warm_start",
]

logger = logging.getLogger(__name__)


def matrix_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(n, m)`` matrix view used by PowerSGD and ATOMO.

    ``ndim >= 2``: ``(shape[0], prod(shape[1:]))``. Otherwise ``n = ceil(sqrt(d))``,
    ``m = ceil(d / n)`` (``n * m >= d``; the tail is zero padding).
    """
    d = math.prod(shape)
    if len(shape) >= 2:
        return int(shape[0]), (d // int(shape[0]) if shape[0] else math.prod(shape[1:]))
    if d == 0:
        return 0, 0
    n = math.isqrt(d - 1) + 1  # ceil(sqrt(d))
    return n, -(-d // n)


def uses_dense(shape: tuple[int, ...], rank: int, extra_per_atom: int = 0) -> bool:
    """True when rank-``rank`` factors (plus ``extra_per_atom`` per atom) are not smaller than ``d``."""
    n, m = matrix_view_shape(shape)
    r = min(rank, n, m)
    return r == 0 or (n + m + extra_per_atom) * r >= math.prod(shape)


def as_matrix(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``x`` as a float32 ``n x m`` matrix: a view of ``x`` itself when ``x`` is contiguous float32 and
    ``n * m = d``, else a (zero-padded) float32 copy."""
    flat = x.reshape(-1).to(torch.float32)
    d = flat.numel()
    if n * m == d:
        return flat.view(n, m)
    out = torch.zeros(n * m, dtype=torch.float32, device=x.device)
    out[:d] = flat
    return out.view(n, m)


# The two phases as pure helpers (the DDP hook all-reduces between them):
# compress: P = M Q (warm start), P = orthogonalize(P), Q = project_back(M, P); decompress: P Q^T.


def warm_start(q: torch.Tensor | None, m: int, r: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """``q`` if usable (``m x r``, finite, not all zero), else ``N(0, 1)`` from ``seed`` (not the global RNG)."""
    if q is not None and tuple(q.shape) == (m, r):
        q = q.to(device)
        if bool(torch.isfinite(q).all()) and bool(q.abs().sum() > 0):
            return q
        logger.debug("powersgd: stored Q is zero or not finite; re-drawing")
    return torch.randn(m, r, generator=make_generator(seed)).to(device)


def orthogonalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p`` (reduced QR)."""
    return torch.linalg.qr(p, mode="reduced").Q


def project_back(mat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``Q = M^T P`` (``m x r``), computed the fast way round as ``(P^T M)^T`` (not contiguous)."""
    return (p.t() @ mat).t()


def factor_product(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``P Q^T`` (into ``out`` when given)."""
    return torch.matmul(p, q.t(), out=out)


class PowerSGD(Compressor):
    """Rank-``r`` PowerSGD with one power iteration and a per-key warm start.

    Parameters
    ----------
    rank:
        Target rank ``r >= 1`` (capped per tensor at ``min(n, m)``).
    value_dtype:
        Wire dtype of ``P`` and ``Q``: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.

    Notes
    -----
    The first ``Q`` for a key is drawn from a generator seeded with
    ``derive_seed(seed, key)`` (never the global RNG). The warm-start ``Q`` is
    re-drawn when the stored one has a different shape or is all zero / not finite.
    Not all-reducible in this API: each worker sends its own ``P`` and ``Q`` and the
    receiver averages ``P Q^T``.
    """

    name = "powersgd"
    contractive = True
    stateful = True

    def __init__(self, rank: int = 4, value_dtype: str = "float32") -> None:
        self.rank = check_int("rank", rank, 1)
        self.value_dtype = value_dtype
        self._dtype = wire_value_dtype(value_dtype)
        self._q: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"PowerSGD(rank={self.rank}, value_dtype={self.value_dtype!r})"

    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """One power iteration on the matrix view of ``x``, warm-started from the last ``Q`` of ``key``."""
        shape = tuple(int(s) for s in x.shape)
        meta = {"rank": self.rank, "value_dtype": self.value_dtype}
        if uses_dense(shape, self.rank):
            values = x.detach().reshape(-1).to(self._dtype, copy=True)
            return Payload(self.name, shape, {"values": values}, {**meta, "dense": True})
        n, m = matrix_view_shape(shape)
        r = min(self.rank, n, m)
        mat = as_matrix(x.detach(), n, m)
        q = warm_start(self._q.get(key), m, r, derive_seed(seed, key), x.device)
        p = orthogonalize(mat @ q)
        q = project_back(mat, p).contiguous()
        self._q[key] = q
        arrays = {"p": p.to(self._dtype), "q": q.to(self._dtype, copy=True)}
        return Payload(self.name, shape, arrays, {**meta, "dense": False})

    def _factors(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        if uses_dense(payload.shape, self.rank):
            values = payload.arrays.get("values")
            if values is None or values.numel() != payload.numel:
                raise ValueError(f"powersgd payload for shape {payload.shape} must be dense 'values'")
            return values
        n, m = matrix_view_shape(payload.shape)
        r = min(self.rank, n, m)
        p, q = payload.arrays.get("p"), payload.arrays.get("q")
        if p is None or q is None or tuple(p.shape) != (n, r) or tuple(q.shape) != (m, r):
            raise ValueError(
                f"powersgd payload for shape {payload.shape} must hold p ({n}x{r}) and q ({m}x{r}), got "
                f"{None if p is None else tuple(p.shape)} and {None if q is None else tuple(q.shape)}"
            )
        return p, q

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense float32 ``P Q^T`` (cropped to ``d`` and reshaped), or the dense values."""
        f = self._factors(payload)
        if isinstance(f, torch.Tensor):
            return f.to(torch.float32).reshape(payload.shape)
        p, q = f
        full = factor_product(p.to(torch.float32), q.to(p.device, torch.float32))
        return full.reshape(-1)[: payload.numel].reshape(payload.shape).clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The warm-start ``Q`` per tensor key (copies)."""
        return {k: v.detach().clone() for k, v in self._q.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the warm-start ``Q``s; each must be a finite 2-D float tensor with 1..rank columns."""
        new: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if not isinstance(k, str):
                raise ValueError(f"powersgd state keys must be str, got {k!r}")
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 2:
                raise ValueError(f"powersgd state[{k!r}] must be a 2-D float tensor, got {v!r:.80}")
            if not 1 <= v.shape[1] <= self.rank or not bool(torch.isfinite(v).all()):
                raise ValueError(
                    f"powersgd state[{k!r}] has shape {tuple(v.shape)}; "
                    f"allowed: finite, 1..{self.rank} columns"
                )
            new[k] = v.detach().to(torch.float32).clone()
        self._q = new

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """``(n + m) * r * value size``, or ``d * value size`` when sent dense."""
        size = torch.empty((), dtype=self._dtype).element_size()
        if uses_dense(shape, self.rank):
            return math.prod(shape) * size
        n, m = matrix_view_shape(shape)
        return (n + m) * min(self.rank, n, m) * size
