"""The communicator: every ``torch.distributed`` call of the DDP hooks (all-reduce, all-gather).

Averages divide before the sum, as DDP does, except :func:`average_`. Collectives are issued
only from the calling thread, never from a future's callback: every rank queues them in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from conef_fl.compressors import COMPRESSORS
from conef_fl.compressors.base import Payload

GradBucket = dist.GradBucket
ProcessGroup = dist.ProcessGroup
Future = torch.futures.Future

#: Compressors with fixed-size payloads that cannot be summed: sent by one all-gather.
GATHER_COMPRESSORS: tuple[str, ...] = ("top-k", "scaled-sign")


def all_reducible() -> tuple[str, ...]:
    """Registered compressors whose payloads are averaged by one all-reduce (``Compressor.all_reducible``)."""
    return tuple(sorted(name for name, cls in COMPRESSORS.items() if cls.all_reducible))


def annotate_hook(hook: Callable[..., object], state_cls: type) -> None:
    """Real annotations for DDP's check of a hook's signature (``from __future__`` made them strings)."""
    hook.__annotations__ = {"state": state_cls, "bucket": GradBucket, "return": Future[torch.Tensor]}


def group_of(process_group: ProcessGroup | None) -> ProcessGroup:
    """``process_group``, or the default group; ``RuntimeError`` before ``init_process_group``."""
    if process_group is not None:
        return process_group
    if dist.group.WORLD is None:
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
    return dist.group.WORLD  # type: ignore[return-value]


def mean_async(t: torch.Tensor, group: ProcessGroup) -> Future[torch.Tensor]:
    """``t := mean over the ranks`` (divided first), asynchronously; the future holds ``t``."""
    t.div_(group.size())
    return dist.all_reduce(t, group=group, async_op=True).get_future().then(lambda f: f.value()[0])


def allreduce_sum_(t: torch.Tensor, group: ProcessGroup) -> None:
    """``t := sum over the ranks``, waited for."""
    dist.all_reduce(t, group=group)


def allreduce_dense(buffer: torch.Tensor, wire: torch.dtype, group: ProcessGroup) -> tuple[Future[torch.Tensor], int]:
    """Average a whole bucket in ``wire`` dtype; returns the future (holding ``buffer``) and the bytes sent."""
    comm = buffer if wire == buffer.dtype else buffer.to(wire)
    fut = mean_async(comm, group)
    if comm is not buffer:
        fut = fut.then(lambda f: buffer.copy_(f.value()))
    return fut, comm.numel() * comm.element_size()


def allreduce_payloads(payloads: Sequence[Payload], group: ProcessGroup) -> tuple[Future[list[Payload]], int]:
    """Average all-reducible payloads (same selection on every rank) with one all-reduce of their values.

    The payloads' value arrays may be overwritten. Returns the future of the averaged
    payloads and the bytes sent.
    """
    values = [p.arrays["values"] for p in payloads]
    comm = values[0] if len(values) == 1 else torch.cat([v.reshape(-1) for v in values])
    sent = comm.numel() * comm.element_size()

    def split(f: Future[torch.Tensor]) -> list[Payload]:
        avg, off, out = f.value(), 0, []
        for p, v in zip(payloads, values, strict=True):
            out.append(Payload(p.kind, p.shape, {"values": avg[off : off + v.numel()]}, p.meta))
            off += v.numel()
        return out

    return mean_async(comm, group).then(split), sent


def allgather_payloads(payloads: Sequence[Payload], group: ProcessGroup) -> tuple[Future[list[list[Payload]]], int]:
    """Every rank's payloads (fixed sizes), by one all-gather of their bytes; and the bytes sent."""
    layout: list[list[tuple[str, torch.dtype, torch.Size, int]]] = []
    parts = []
    for p in payloads:
        entries = []
        for name in sorted(p.arrays):
            arr = p.arrays[name].contiguous()
            entries.append((name, arr.dtype, arr.shape, arr.numel() * arr.element_size()))
            parts.append(arr.reshape(-1).view(torch.uint8))
        layout.append(entries)
    blob = torch.cat(parts)
    gathered = [torch.empty_like(blob) for _ in range(group.size())]
    fut = dist.all_gather(gathered, blob, group=group, async_op=True).get_future()

    def unpack(f: Future[object]) -> list[list[Payload]]:
        f.value()
        out = []
        for blob_r in gathered:
            off, received = 0, []
            for p, entries in zip(payloads, layout, strict=True):
                arrays = {}
                for name, dtype, shape, nbytes in entries:
                    arrays[name] = blob_r[off : off + nbytes].clone().view(dtype).view(shape)
                    off += nbytes
                received.append(Payload(p.kind, p.shape, arrays, p.meta))
            out.append(received)
        return out

    return fut.then(unpack), blob.numel()


def average_(tensors: Sequence[torch.Tensor], group: ProcessGroup) -> int:
    """Average ``tensors`` in place (sum, then divide: exact for identical values on two ranks), one
    all-reduce per dtype and device; returns the bytes sent."""
    sent = 0
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for same in by_kind.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        flat.div_(group.size())
        off = 0
        for t in same:
            t.detach().copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()
        sent += flat.numel() * flat.element_size()
    return sent
