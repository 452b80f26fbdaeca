"""The ConEF hook: the core's error feedback (ConEF, EFSGD, PowerSGD, ...) on each bucket of a DDP model.

Per segment, the gradient goes through the core's ``ErrorFeedback.step``; a bucket's payloads
travel in one collective (all-reduce, or all-gather for top-k / scaled sign), or two for
PowerSGD (:mod:`conef_fl.ddp.powersgd`). A rank whose gradient has NaN/Inf sends NaN and
leaves its error untouched. Use and design notes: ``docs/ddp.md``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from conef_fl.compressors.base import wire_value_dtype
from conef_fl.config import MethodConfig
from conef_fl.ddp import comm
from conef_fl.ddp.powersgd import POWERSGD_FEEDBACKS, expected_nbytes, powersgd_step
from conef_fl.ddp.segments import Segment, Work, plan, scatter_back
from conef_fl.ddp.state import HookState, check_count, raise_first, register
from conef_fl.feedback import make_compressor_for, make_feedback
from conef_fl.registry import method_config

logger = logging.getLogger(__name__)


def supported_compressors() -> tuple[str, ...]:
    """Compressors the hook supports: all-reducible ones, PowerSGD, and the all-gathered ones."""
    return (*comm.all_reducible(), "powersgd", *comm.GATHER_COMPRESSORS)


def _validate(config: object, warmup_steps: object, error_reset_every: object) -> None:
    if not isinstance(config, MethodConfig):
        raise ValueError(f"config must be a MethodConfig, got {type(config).__name__}")
    check_count("warmup_steps", warmup_steps)
    check_count("error_reset_every", error_reset_every)
    stores = make_feedback(config, (1,)).stores().values() if error_reset_every else ()  # a 1-element probe
    raise_first([
        (config.compressor not in supported_compressors(), f"compressor={config.compressor!r} is not supported by "
         f"the DDP hook; allowed: {', '.join(supported_compressors())}"),
        (config.compressor == "powersgd" and config.feedback not in POWERSGD_FEEDBACKS, f"feedback="
         f"{config.feedback!r} is not supported with compressor='powersgd'; allowed: {', '.join(POWERSGD_FEEDBACKS)}"),
        (bool(error_reset_every) and not (stores and all(s.linear for s in stores)), f"error_reset_every="
         f"{error_reset_every} needs a linear error store (feedback 'efsgd', or 'conef' with a linear "
         f"error_compressor); got feedback={config.feedback!r}, error_compressor={config.error_compressor!r}"),
    ])  # fmt: skip


class ConEFHookState(HookState):
    """The method, per-segment error state, shared randomness and statistics of :func:`conef_hook`.

    Parameters
    ----------
    config:
        The method; compressor in :func:`supported_compressors` (PowerSGD: feedback none,
        efsgd or conef).
    warmup_steps:
        Iterations of plain all-reduce before compression starts (>= 0).
    error_reset_every:
        Every this many compressed iterations the (linear) error stores are averaged over
        the ranks (the paper's ER; bytes in ``bytes_reset_total``); 0 disables it.
    """

    __slots__ = ("config", "error_reset_every", "bytes_reset_total", "compressor")
    _TRANSIENT = HookState._TRANSIENT | {"compressor"}
    _SETTINGS = ("config",)

    def __init__(
        self,
        process_group: comm.ProcessGroup | None = None,
        config: MethodConfig | None = None,
        *,
        warmup_steps: int = 2,
        error_reset_every: int = 0,
    ) -> None:
        config = config if config is not None else method_config("conef-cs")
        _validate(config, warmup_steps, error_reset_every)
        self.config, self.error_reset_every, self.bytes_reset_total = config, error_reset_every, 0
        super().__init__(process_group, config.seed, warmup_steps)
        logger.info("ConEF hook: %s (warmup_steps=%d, error_reset_every=%d)", config, warmup_steps, error_reset_every)

    @classmethod
    def from_method(
        cls,
        method: str | MethodConfig = "conef-cs",
        process_group: comm.ProcessGroup | None = None,
        *,
        warmup_steps: int = 2,
        error_reset_every: int = 0,
        **overrides: Any,
    ) -> ConEFHookState:
        """A state for registry name ``method`` with ``overrides``, or for a ``MethodConfig`` (``replace``-d)."""
        if isinstance(method, MethodConfig):
            config = method.replace(**overrides) if overrides else method
        elif isinstance(method, str):
            config = method_config(method, **overrides)
        else:
            raise ValueError(f"method must be a registry name or a MethodConfig, got {type(method).__name__}")
        return cls(process_group, config, warmup_steps=warmup_steps, error_reset_every=error_reset_every)

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self.compressor = make_compressor_for(self.config)

    def _validate(self) -> None:
        _validate(self.config, self.warmup_steps, self.error_reset_every)

    def _fill(self, seg: Segment, device: torch.device) -> None:
        seg.feedback = make_feedback(self.config, (seg.numel,), seg.key, compressor=self.compressor, device=device)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "bytes_reset_total": self.bytes_reset_total}


def conef_hook(state: ConEFHookState, bucket: comm.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress each segment with error feedback, average, decompress.

    The returned future holds the bucket buffer, overwritten with ``mean_i Δ_i``.
    """
    with torch.no_grad():
        buffer = bucket.buffer()
        group = state.group()
        cfg = state.config
        dense = buffer.numel() * buffer.element_size()
        compressed = state.iter >= state.warmup_steps
        if not compressed or (cfg.compressor == "identity" and cfg.feedback == "none"):
            wire = wire_value_dtype(cfg.value_dtype) if compressed else buffer.dtype
            fut, sent = comm.allreduce_dense(buffer, wire, group)
            state._count(bucket.index(), sent=sent, dense=dense)
            state._end_bucket(bucket, compressed)
            return fut
        seed = state._seed()
        works = plan(state, bucket, buffer, cfg.layerwise)
        step = powersgd_step if cfg.compressor == "powersgd" else _payload_step
        fut, sent = step(state, works, seed, group)
        state._count(bucket.index(), sent=sent, dense=dense)
        if state.error_reset_every and (state.compressed_steps + 1) % state.error_reset_every == 0:
            tensors = [t for w in works for t in w.seg.worker_tensors()]
            state.bytes_reset_total += sum(t.numel() * t.element_size() for t in tensors)
            fut = torch.futures.collect_all([fut, *(comm.mean_async(t, group) for t in tensors)])
        state._end_bucket(bucket, compressed=True)

        def finish(f: torch.futures.Future[Any]) -> torch.Tensor:
            for sub in f.value() if isinstance(f.value(), list) else ():  # error reset: surface errors
                if isinstance(sub, torch.futures.Future):
                    sub.value()
            scatter_back(works)
            return buffer

        return fut.then(finish)


comm.annotate_hook(conef_hook, ConEFHookState)


def _payload_step(
    state: ConEFHookState, works: list[Work], seed: int, group: comm.ProcessGroup
) -> tuple[torch.futures.Future[Any], int]:
    """The core's step per segment; payloads averaged by one all-reduce, or all-gathered and decompressed."""
    payloads = [state._payload(w, seed, consume=True) for w in works]
    gather = state.config.compressor in comm.GATHER_COMPRESSORS
    fut, sent = (comm.allgather_payloads if gather else comm.allreduce_payloads)(payloads, group)  # type: ignore[operator]

    def decompress(f: torch.futures.Future[Any]) -> None:
        per_rank = f.value() if gather else [f.value()]
        for w in works:
            w.vec.zero_()
        for received in per_rank:
            for w, p in zip(works, received, strict=True):
                state.compressor.decompress_add_(p, w.vec, alpha=1.0 / len(per_rank))

    return fut.then(decompress), sent


def register_conef_hook(
    model: nn.parallel.DistributedDataParallel,
    method: str | MethodConfig = "conef-cs",
    *,
    process_group: comm.ProcessGroup | None = None,
    warmup_steps: int = 2,
    error_reset_every: int = 0,
    state: ConEFHookState | None = None,
    **overrides: Any,
) -> ConEFHookState:
    """Register :func:`conef_hook` on a DDP model in one line and return its (picklable) state.

    ``method`` is a registry name or a ``MethodConfig``; ``overrides`` are ``MethodConfig``
    fields (``k_ratio``, ``sketch_ratio``, ``beta``, ``rank``, ``value_dtype``,
    ``layerwise``, ``seed``, ...). A ``state`` (e.g. unpickled) is reused as it is, and
    the other settings are then ignored. Bad arguments raise ``ValueError``.
    """
    if state is None:
        state = ConEFHookState.from_method(
            method, process_group, warmup_steps=warmup_steps, error_reset_every=error_reset_every, **overrides
        )
    return register(model, state, ConEFHookState, conef_hook, process_group)


def dense_error_bytes(model: nn.Module) -> int:
    """Bytes EFSGD (and torch's PowerSGD hook) would keep: 4 bytes per gradient element."""
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_bytes_per_step(state: ConEFHookState) -> int:
    """Bytes one compressed step sends for the current segments; ``ValueError`` before the first one."""
    if not state.segments:
        raise ValueError("the state has no segments yet: run at least one compressed step")
    cfg = state.config
    if cfg.compressor == "powersgd":
        return sum(expected_nbytes(state.compressor, s.shape, cfg.layerwise) for s in state.segments.values())
    return sum(state.compressor.expected_nbytes((s.numel,)) for s in state.segments.values())
