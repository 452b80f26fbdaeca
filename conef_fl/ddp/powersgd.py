"""The ConEF hook's PowerSGD path: the core's PowerSGD phases with an all-reduce between them.

Per bucket: ``p = compensate_(u)`` per segment; all-reduce ``P = M Q`` (warm start) together
with the segments sent dense; orthogonalize; ``Q_i = Mᵀ P``; ``absorb_(p − P Q_iᵀ)`` (the
rank's own ``Δ_i``: a projection); all-reduce ``Q``; write ``P mean_i(Q_i)ᵀ``. The first
all-reduce is waited for inside the hook, so the second is issued from the same thread on
every rank. NaN/Inf is detected on the small factors (no pass over the gradient).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from conef_fl.compressors import powersgd as core
from conef_fl.compressors.base import wire_value_dtype
from conef_fl.ddp import comm
from conef_fl.ddp.segments import Work
from conef_fl.error_stores.base import NonFiniteError, check_finite
from conef_fl.seeding import derive_seed

if TYPE_CHECKING:
    from conef_fl.ddp.conef import ConEFHookState

#: Error feedback the PowerSGD path supports (the store is the core's error compressor C).
POWERSGD_FEEDBACKS: tuple[str, ...] = ("none", "efsgd", "conef")


def matrix_shape(shape: tuple[int, ...], rank: int, layerwise: bool) -> tuple[int, int, int] | None:
    """``(n, m, r)`` if PowerSGD compresses a segment of ``shape``, else None (sent dense: layer-wise
    vectors, as in torch's hook, and whenever the factors would not be smaller)."""
    if (layerwise and len(shape) < 2) or core.uses_dense(shape, rank):
        return None
    n, m = core.matrix_view_shape(shape)
    return n, m, min(rank, n, m)


def expected_nbytes(q: core.PowerSGD, shape: tuple[int, ...], layerwise: bool) -> int:
    """Bytes one segment of ``shape`` sends: the core's count, or dense for a layer-wise vector."""
    if layerwise and len(shape) < 2:
        return math.prod(shape) * wire_value_dtype(q.value_dtype).itemsize
    return q.expected_nbytes(shape)


def _finite(x: torch.Tensor) -> bool:
    try:
        check_finite(x, "")
    except NonFiniteError:
        return False
    return True


class _Matrix:
    """A segment compressed during one step: its ``n x m`` view of ``p`` and its slices of the wire buffers."""

    __slots__ = ("work", "n", "m", "r", "mat", "p", "p_at", "q_at")

    def __init__(self, work: Work, p: torch.Tensor, shape: tuple[int, int, int], p_at: int, q_at: int) -> None:
        self.work, (self.n, self.m, self.r), self.p_at, self.q_at = work, shape, p_at, q_at
        self.mat = core.as_matrix(p, self.n, self.m)  # a view of the bucket when it can be
        self.p: torch.Tensor | None = None

    def p_of(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.p_at : self.p_at + self.n * self.r].view(self.n, self.r)

    def q_of(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.q_at : self.q_at + self.m * self.r].view(self.m, self.r)

    def write_back(self) -> None:
        vec = self.work.vec
        if self.mat.data_ptr() != vec.data_ptr():
            vec.copy_(self.mat.view(-1)[: vec.numel()])


def powersgd_step(
    state: ConEFHookState, works: list[Work], seed: int, group: comm.ProcessGroup
) -> tuple[torch.futures.Future[Any], int]:
    """PowerSGD with the core's error feedback on one bucket; returns the future and the bytes sent."""
    cfg = state.config
    wire = wire_value_dtype(cfg.value_dtype)
    world = group.size()
    mats: list[_Matrix] = []
    dense: list[Work] = []
    p_len = q_len = 0
    for w in works:
        shape = matrix_shape(w.seg.shape, cfg.rank, cfg.layerwise)
        if shape is None:
            dense.append(w)
            continue
        assert w.seg.feedback is not None
        mats.append(_Matrix(w, w.seg.feedback.compensate_(w.vec, consume=True), shape, p_len, q_len))
        p_len += shape[0] * shape[2]
        q_len += shape[1] * shape[2]
    device = works[0].vec.device
    comm1 = torch.empty(p_len + sum(w.vec.numel() for w in dense), dtype=wire, device=device)
    for x in mats:
        q = core.warm_start(x.work.seg.q, x.m, x.r, derive_seed(seed, x.work.seg.key), device)
        p_local = x.p_of(comm1)
        p_local.copy_(x.mat @ q)
        if not _finite(p_local):
            state._mark_bad(x.work)
            p_local.fill_(float("nan"))
    off = p_len
    for w in dense:
        sl = comm1[off : off + w.vec.numel()]
        off += w.vec.numel()
        fb = w.seg.feedback
        assert fb is not None
        if not _finite(w.vec):
            state._mark_bad(w)
            sl.fill_(float("nan"))
        else:
            p = fb.compensate_(w.vec, consume=True)
            sl.copy_(p)
            if fb.stores():
                fb.absorb_(p.sub_(sl.to(torch.float32)))  # p − wire(p)
        sl.div_(world)
    sent = (comm1.numel() + q_len) * comm1.element_size()
    comm.allreduce_sum_(comm1, group)  # waited for: the next all-reduce must be issued from this thread
    off = p_len
    for w in dense:
        w.vec.copy_(comm1[off : off + w.vec.numel()])
        off += w.vec.numel()
    comm2 = torch.empty(q_len, dtype=wire, device=device)
    for x in mats:
        p_sum = x.p_of(comm1).to(torch.float32)
        q_local = x.q_of(comm2)
        if not _finite(p_sum):  # some rank sent NaN: the same decision on every rank
            q_local.fill_(float("nan"))
            continue
        x.p = core.orthogonalize(p_sum)
        if x.work.bad:
            q_local.fill_(float("nan"))
            continue
        q_local.copy_(core.project_back(x.mat, x.p))
        if not _finite(q_local):
            state._mark_bad(x.work)
            q_local.fill_(float("nan"))
            continue
        fb = x.work.seg.feedback
        if fb is not None and fb.stores():
            x.mat.addmm_(x.p, q_local.t().to(torch.float32), alpha=-1.0)  # M := p − P Q_iᵀ
            fb.absorb_(x.mat.view(-1)[: x.work.vec.numel()])
    fut = comm.mean_async(comm2, group)

    def decompress(f: torch.futures.Future[torch.Tensor]) -> None:
        q_all = f.value()
        for x in mats:
            if x.p is None:
                x.work.vec.fill_(float("nan"))
                continue
            q_avg = x.q_of(q_all).to(torch.float32)
            if _finite(q_avg):
                x.work.seg.q = q_avg.clone()  # the warm start, identical on every rank
            core.factor_product(x.p, q_avg, out=x.mat)
            x.write_back()

    return fut.then(decompress), sent
