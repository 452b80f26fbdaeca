"""The segment planner: the compressed units of a DDP bucket and the flat vectors they work on.

A segment is a parameter (``layerwise``, keyed by its name) or a whole bucket (keyed by its
parameters' names, checked by size); see ``docs/ddp.md`` ("DDP's bucket rebuild").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from conef_fl.feedback import ErrorFeedback

if TYPE_CHECKING:
    from conef_fl.ddp.comm import GradBucket
    from conef_fl.ddp.state import HookState

__all__ = ["Segment", "Work", "plan", "scatter_back"]

logger = logging.getLogger(__name__)


class Segment:
    """The state of one compressed unit, kept between steps (pickled with the hook state).

    ``key`` (parameter name or ``bucket{i}``) seeds hashes, selections and PowerSGD's first
    ``Q``; ``names``, ``sizes``: the parameters covered, in flat order; ``shape``: the
    parameter's, or ``(numel,)``; ``feedback``: the worker's core error feedback. PowerSGD
    only: ``q``, the warm start. LIEC-SGD only: ``server``, the virtual server's error
    feedback, and ``down_nbytes`` / ``last_down_nbytes``, one downlink payload's bytes.
    """

    __slots__ = ("key", "names", "sizes", "shape", "feedback", "server", "q", "down_nbytes", "last_down_nbytes")

    def __init__(self, key: str, names: tuple[str, ...], sizes: tuple[int, ...], shape: tuple[int, ...]) -> None:
        self.key, self.names, self.sizes, self.shape = key, names, sizes, shape
        self.feedback: ErrorFeedback | None = None
        self.server: ErrorFeedback | None = None
        self.q: torch.Tensor | None = None
        self.down_nbytes = self.last_down_nbytes = 0

    @property
    def numel(self) -> int:
        """Elements of the segment."""
        return sum(self.sizes)

    def worker_tensors(self) -> list[torch.Tensor]:
        """The worker's error state."""
        return self.feedback.persistent_tensors() if self.feedback is not None else []

    def server_tensors(self) -> list[torch.Tensor]:
        """The (virtual) server's error state."""
        return self.server.persistent_tensors() if self.server is not None else []


class Work:
    """One segment's share of a bucket in one step: a view of the buffer, or (a saved flat segment
    met in a new DDP layout) a gathered copy that :func:`scatter_back` writes back."""

    __slots__ = ("seg", "vec", "scatter", "bad")

    def __init__(
        self, seg: Segment, vec: torch.Tensor, scatter: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> None:
        self.seg, self.vec, self.scatter, self.bad = seg, vec, scatter, False


def scatter_back(works: list[Work]) -> None:
    """Write gathered copies back into the bucket."""
    for w in works:
        for dst, src in w.scatter or ():
            dst.copy_(src)


def plan(state: HookState, bucket: GradBucket, buffer: torch.Tensor, layerwise: bool) -> list[Work]:
    """The segments of ``bucket`` (created or re-created as needed) and their flat vectors."""
    names = tuple(state.param_name(p) for p in bucket.parameters())
    grads = bucket.gradients()
    base, size = buffer.data_ptr(), buffer.element_size()
    pieces = {n: buffer.narrow(0, (g.data_ptr() - base) // size, g.numel()) for n, g in zip(names, grads, strict=True)}
    if layerwise:
        works = []
        for name, g in zip(names, grads, strict=True):
            seg = state.segments.get((name,))
            shape = tuple(int(s) for s in g.shape)
            if seg is None or seg.shape != shape:
                if seg is not None:
                    logger.warning("%s changed shape %s -> %s; new error state", name, seg.shape, shape)
                seg = state.new_segment(name, (name,), (g.numel(),), shape, buffer.device)
            state.used.add((name,))
            works.append(Work(seg, pieces[name]))
        return works
    sizes = tuple(int(g.numel()) for g in grads)
    seg = state.segments.get(names)
    if seg is None or seg.sizes != sizes:
        cover = _cover(state, names, pieces) if state.ddp_iter == 0 else None
        if cover is not None:
            return cover
        stale = [k for k in state.segments if set(k) & set(names)]
        if stale:
            logger.info("bucket %d has a new layout (%d elements); new error state", bucket.index(), buffer.numel())
            for k in stale:
                del state.segments[k]
        seg = state.new_segment(f"bucket{bucket.index()}", names, sizes, (buffer.numel(),), buffer.device)
    state.used.add(names)
    return [Work(seg, buffer)]


def _cover(state: HookState, layout: tuple[str, ...], pieces: Mapping[str, torch.Tensor]) -> list[Work] | None:
    """Saved flat segments that exactly partition this bucket's parameters (gathered copies), or None.

    A restored state meets DDP's *initial* layout in a new model's first iteration.
    """
    owner = {n: k for k in state.segments for n in k}
    keys: list[tuple[str, ...]] = []
    for name in layout:
        k = owner.get(name)
        if k is None:
            return None
        if k not in keys:
            keys.append(k)
    segs = [state.segments[k] for k in keys]
    if any(not set(k) <= set(layout) for k in keys) or any(
        pieces[n].numel() != s for seg in segs for n, s in zip(seg.names, seg.sizes, strict=True)
    ):
        return None
    works = []
    for k, seg in zip(keys, segs, strict=True):
        first = pieces[seg.names[0]]
        scratch = torch.empty(seg.numel, dtype=first.dtype, device=first.device)
        scatter, off = [], 0
        for n, s in zip(seg.names, seg.sizes, strict=True):
            scratch[off : off + s].copy_(pieces[n])
            scatter.append((pieces[n], scratch[off : off + s]))
            off += s
        state.used.add(k)
        works.append(Work(seg, scratch, scatter))
    logger.info("new DDP layout; running %d saved segment(s) on gathered copies", len(works))
    return works
