"""ATOMO (Wang et al. 2018) with the SVD basis: unbiased sampling of singular triplets.

For the ``n x m`` matrix view ``M = sum_i sigma_i u_i v_i^T`` (same view as PowerSGD,
:func:`~conef_fl.compressors.powersgd.matrix_view_shape`), atom ``i`` is kept
independently with probability ``p_i = min(1, c * sigma_i)``, where ``c`` is set so
that ``sum_i p_i = r`` (the rank budget; iterative capping, :func:`atomo_probabilities`),
and sent as ``(u_i, v_i, sigma_i / p_i)``. Hence ``E[Q(x)] = M`` (unbiased) with ``r``
atoms in expectation. Singular values below ``sigma_max * max(n, m) * eps`` (the
numerical rank cut-off of ``torch.linalg.matrix_rank``) count as zero. With
``r >= rank(M)`` every nonzero atom has ``p_i = 1`` and the reconstruction is exact up
to float rounding.

Tensors whose ``r`` atoms would not be smaller than the tensor
(``(n + m + 1) * r >= d``) are sent dense (``meta["dense"] = True``).
"""

from __future__ import annotations

import math

import torch

from conef_fl.compressors.base import (
    Compressor,
    Payload,
    check_int,
    private_generator,
    private_uniform,
    wire_value_dtype,
)
from conef_fl.compressors.powersgd import as_matrix, matrix_view_shape, uses_dense

__all__ = ["ATOMO", "atomo_probabilities"]


def atomo_probabilities(sigma: torch.Tensor, budget: float) -> torch.Tensor:
    """Sampling probabilities ``p_i = min(1, c sigma_i)`` with ``sum p_i = min(budget, #nonzero)``.

    Parameters
    ----------
    sigma:
        Non-negative singular values sorted in descending order (1-D).
    budget:
        Expected number of atoms ``r > 0``.

    Returns
    -------
    torch.Tensor
        float64 probabilities (same length); zero where ``sigma == 0``.
    """
    s = sigma.detach().to(torch.float64)
    p = torch.zeros_like(s)
    nonzero = int((s > 0).sum())
    if budget >= nonzero:
        p[s > 0] = 1.0
        return p
    fixed = 0  # the capped atoms form a prefix, since sigma is sorted
    while True:
        rest = s[fixed:]
        q = (budget - fixed) * rest / rest.sum()
        over = int((q > 1).sum())
        if over == 0:
            p[fixed:] = q
            p[:fixed] = 1.0
            return p
        fixed += over


class ATOMO(Compressor):
    """ATOMO (SVD atoms) with an expected rank budget; unbiased, stateless.

    Wire: ``"u"`` (``n x j``) and ``"v"`` (``m x j``) in ``value_dtype``, ``"s"``
    (``j`` float32 scales ``sigma_i / p_i``), where ``j`` (the number of sampled atoms)
    varies from call to call, ``r`` on average. :meth:`expected_nbytes` is therefore an
    **upper bound** (all ``min(n, m)`` atoms sampled).

    Parameters
    ----------
    rank:
        Expected number of atoms ``r >= 1``.
    value_dtype:
        Wire dtype of ``u`` and ``v``: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
    generator, seed:
        The private randomness of the sampling (:func:`~conef_fl.compressors.base.private_generator`).
    """

    name = "atomo"
    unbiased = True

    def __init__(self, rank: int = 4, value_dtype: str = "float32", generator: torch.Generator | None = None,
                 seed: int = 0) -> None:
        self.rank = check_int("rank", rank, 1)
        self.value_dtype = value_dtype
        self._dtype = wire_value_dtype(value_dtype)
        self.generator = private_generator(generator, seed)

    def __repr__(self) -> str:
        return f"ATOMO(rank={self.rank}, value_dtype={self.value_dtype!r})"

    def _dense(self, shape: tuple[int, ...]) -> bool:
        return uses_dense(shape, self.rank, extra_per_atom=1)

    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """SVD of the matrix view, then independent sampling of atoms (``seed``/``key`` unused)."""
        shape = tuple(int(s) for s in x.shape)
        meta = {"rank": self.rank, "value_dtype": self.value_dtype}
        if self._dense(shape):
            values = x.detach().reshape(-1).to(self._dtype, copy=True)
            return Payload(self.name, shape, {"values": values}, {**meta, "dense": True})
        n, m = matrix_view_shape(shape)
        mat = as_matrix(x.detach(), n, m)
        u, sigma, vh = torch.linalg.svd(mat, full_matrices=False)
        # Numerical rank: singular values at rounding level are zero atoms (never sampled).
        tol = float(sigma.max()) * max(n, m) * torch.finfo(sigma.dtype).eps if sigma.numel() else 0.0
        sigma = torch.where(sigma > tol, sigma, torch.zeros_like(sigma))
        p = atomo_probabilities(sigma, self.rank).to(sigma.device)
        draw = private_uniform(self.generator, sigma.numel(), sigma.device).to(torch.float64)
        keep = (draw < p).nonzero().squeeze(1)
        scales = (sigma.to(torch.float64)[keep] / p[keep]).to(torch.float32)
        arrays = {
            "u": u[:, keep].to(self._dtype).contiguous(),
            "v": vh[keep, :].t().to(self._dtype).contiguous(),
            "s": scales,
        }
        return Payload(self.name, shape, arrays, {**meta, "dense": False})

    def _check(self, payload: Payload) -> None:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        if self._dense(payload.shape):
            values = payload.arrays.get("values")
            if values is None or values.numel() != payload.numel:
                raise ValueError(f"atomo payload for shape {payload.shape} must be dense 'values'")
            return
        n, m = matrix_view_shape(payload.shape)
        u, v, s = (payload.arrays.get(a) for a in ("u", "v", "s"))
        if u is None or v is None or s is None:
            raise ValueError(f"atomo payload must hold u, v and s, got {sorted(payload.arrays)}")
        j = s.numel()
        if tuple(u.shape) != (n, j) or tuple(v.shape) != (m, j) or j > min(n, m):
            raise ValueError(
                f"atomo payload for shape {payload.shape}: u {tuple(u.shape)}, v {tuple(v.shape)}, "
                f"s ({j},); expected u ({n}, j), v ({m}, j) with j <= {min(n, m)}"
            )

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense float32 ``sum_i s_i u_i v_i^T`` (cropped to ``d``), or the dense values."""
        self._check(payload)
        if "values" in payload.arrays:
            return payload.arrays["values"].to(torch.float32).reshape(payload.shape)
        u = payload.arrays["u"].to(torch.float32)
        v = payload.arrays["v"].to(u.device, torch.float32)
        s = payload.arrays["s"].to(u.device, torch.float32)
        full = (u * s) @ v.t()
        return full.reshape(-1)[: payload.numel].reshape(payload.shape).clone()

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """Upper bound: ``d * value size`` when dense, else all ``min(n, m)`` atoms sampled."""
        size = torch.empty((), dtype=self._dtype).element_size()
        if self._dense(shape):
            return math.prod(shape) * size
        n, m = matrix_view_shape(shape)
        j = min(n, m)
        return (n + m) * j * size + 4 * j
