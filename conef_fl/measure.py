"""Measured memory: bytes really kept between steps, and peak transient bytes during a step.

Nothing here is computed from shapes. :func:`persistent_bytes` sums the storage
of the tensors an object keeps (each storage once, the whole storage even when
only a view is held). :func:`measure_transient` runs a function under the
PyTorch profiler with ``profile_memory=True`` and replays its allocation and
free events in time order (CPU), or reads the CUDA allocator's peak, to get
the largest amount of memory the function held at once beyond what existed
before it started.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def persistent_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


@dataclass(frozen=True)
class TransientMeasurement:
    """Result of :func:`measure_transient`."""

    #: Largest net bytes allocated at any moment during the call (relative to its start).
    peak_bytes: int
    #: Net bytes still allocated when the call returned (kept by its result or state).
    retained_bytes: int
    #: ``"profiler"`` (CPU allocation events) or ``"cuda-allocator"``.
    method: str


def measure_transient(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, TransientMeasurement]:
    """Run ``fn()`` and measure the peak of memory it allocated on ``device``.

    CPU: PyTorch profiler memory events (every allocation and free, in order).
    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        kept = torch.cuda.memory_allocated(dev) - base
        return out, TransientMeasurement(int(peak), int(kept), "cuda-allocator")
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort()
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return out, TransientMeasurement(int(peak), int(cur), "profiler")
