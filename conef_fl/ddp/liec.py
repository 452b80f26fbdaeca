"""LIEC-SGD (Cheng et al. 2024) as a DDP hook: bidirectional compression with a virtual server.

Per segment, on worker ``i``: ``Δ_i = Q_up(g_i)``, ``δ_i = g_i − Δ_i``; one all-reduce gives
``v = mean_i Δ_i``; every rank runs the server's error feedback (the core's ``step``) on ``v``,
giving ``Δ̃``; the bucket receives ``Δ̃ + δ_i`` (immediate) or ``Δ̃`` (delayed). Every ``H``
steps :func:`liec_average_` averages the parameters. The update rule and why: ``docs/ddp.md``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from conef_fl.compressors.base import Payload
from conef_fl.config import MethodConfig
from conef_fl.ddp import comm
from conef_fl.ddp.segments import Segment, Work, plan
from conef_fl.ddp.state import HookState, check_count, raise_first, ratio, register
from conef_fl.error_stores.base import NonFiniteError
from conef_fl.feedback import make_compressor_for, make_feedback
from conef_fl.measure import persistent_bytes
from conef_fl.registry import method_config
from conef_fl.seeding import derive_seed

logger = logging.getLogger(__name__)

#: Server error feedback: none, dense (the paper), a core store (ConEF).
DOWNLINK_FEEDBACKS: tuple[str, ...] = ("none", "efsgd", "conef")
#: ``immediate``: the worker error is applied in the same step; ``delayed``: in the next uplink.
COMPENSATIONS: tuple[str, ...] = ("immediate", "delayed")
_DOWN_PREFIX = "down_"
_OPTIONS = ("compensation", "average_every", "warmup_steps", "reset_server_error", "shared_downlink_seed")


def downlink_compressors() -> tuple[str, ...]:
    """Deterministic compressors (every rank's server agrees)."""
    return (*comm.all_reducible(), *comm.GATHER_COMPRESSORS)


def default_uplink(**overrides: Any) -> MethodConfig:
    """The default uplink: random-block-k 10 %, no worker memory (``feedback="none"``)."""
    return MethodConfig(feedback="none", compressor="random-block-k").replace(**overrides)


def default_downlink(**overrides: Any) -> MethodConfig:
    """The default downlink: random-block-k 10 % with a dense server error (``feedback="efsgd"``)."""
    return MethodConfig(feedback="efsgd", compressor="random-block-k").replace(**overrides)


def _as_config(value: str | MethodConfig | None, default: MethodConfig, what: str, **overrides: Any) -> MethodConfig:
    value = default if value is None else value
    if isinstance(value, MethodConfig):
        return value.replace(**overrides)
    if isinstance(value, str):
        return method_config(value, **overrides)
    raise ValueError(f"{what} must be a registry name, a MethodConfig or None, got {type(value).__name__}")


def _validate(s: LIECHookState) -> None:
    up, down = s.uplink, s.downlink
    if not (isinstance(up, MethodConfig) and isinstance(down, MethodConfig)):
        raise ValueError(f"uplink and downlink must be MethodConfigs, got {type(up).__name__}, {type(down).__name__}")
    if s.compensation not in COMPENSATIONS:
        raise ValueError(f"compensation={s.compensation!r} is not valid; allowed: {', '.join(COMPENSATIONS)}")
    check_count("warmup_steps", s.warmup_steps)
    check_count("average_every", s.average_every)
    for flag in ("reset_server_error", "shared_downlink_seed"):
        if not isinstance(getattr(s, flag), bool):
            raise ValueError(f"{flag}={getattr(s, flag)!r} must be a bool")
    immediate = s.compensation == "immediate"
    raise_first([
        (immediate and s.average_every == 0, "average_every=0 is out of range with compensation='immediate' "
         "(the models would drift apart for ever); allowed: integer >= 1"),
        (up.compressor not in comm.all_reducible(), f"uplink compressor={up.compressor!r} is not supported (it "
         f"must be all-reducible); allowed: {', '.join(comm.all_reducible())}"),
        (immediate and up.feedback != "none", f"uplink feedback={up.feedback!r} would be applied twice with "
         "compensation='immediate'; allowed: 'none' (or compensation='delayed')"),
        (down.compressor not in downlink_compressors(), f"downlink compressor={down.compressor!r} is not "
         f"supported; allowed: {', '.join(downlink_compressors())}"),
        (down.feedback not in DOWNLINK_FEEDBACKS, f"downlink feedback={down.feedback!r} is not supported (the "
         f"server error); allowed: {', '.join(DOWNLINK_FEEDBACKS)}"),
        (down.layerwise != up.layerwise, f"downlink layerwise={down.layerwise} differs from uplink layerwise="
         f"{up.layerwise}; both directions use the same segments"),
    ])  # fmt: skip


class LIECHookState(HookState):
    """Settings, worker and server error state, shared randomness and statistics of :func:`liec_hook`.

    Parameters
    ----------
    uplink, downlink:
        The workers' compression (an all-reducible Q; its error feedback with delayed
        compensation) and the server's (Q in :func:`downlink_compressors`, the server error in
        :data:`DOWNLINK_FEEDBACKS`). Defaults :func:`default_uplink`, :func:`default_downlink`.
    compensation:
        ``"immediate"`` (LIEC-SGD) or ``"delayed"``.
    average_every:
        ``H``, compressed steps between averages (>= 1 with immediate compensation; 0: never).
    reset_server_error:
        Zero the server error at each average (the paper's rule).
    shared_downlink_seed:
        ``Q_down`` uses the uplink's step seed, not ``derive_seed(seed, "liec-downlink")``.

    Beyond :class:`~conef_fl.ddp.state.HookState`'s attributes: ``averages``, ``average_due``,
    ``steps_since_average``, ``bytes_average_total`` and the ``down`` byte channel (what a
    parameter server would send each worker).
    """

    __slots__ = (
        "uplink", "downlink", "compensation", "average_every", "reset_server_error", "shared_downlink_seed",
        "averages", "steps_since_average", "average_due", "bytes_down_total", "last_bytes_down",
        "bytes_average_total", "up_compressor", "down_compressor",
    )  # fmt: skip
    _TRANSIENT = HookState._TRANSIENT | {"up_compressor", "down_compressor"}
    _CHANNELS = ("sent", "down", "dense")
    _SETTINGS = ("uplink", "downlink", "compensation", "shared_downlink_seed")

    def __init__(
        self,
        process_group: comm.ProcessGroup | None = None,
        uplink: MethodConfig | None = None,
        downlink: MethodConfig | None = None,
        *,
        compensation: str = "immediate",
        average_every: int = 32,
        warmup_steps: int = 0,
        reset_server_error: bool = True,
        shared_downlink_seed: bool = False,
    ) -> None:
        self.uplink = uplink if uplink is not None else default_uplink()
        self.downlink = downlink if downlink is not None else default_downlink(layerwise=self.uplink.layerwise)
        self.compensation, self.average_every, self.warmup_steps = compensation, average_every, warmup_steps
        self.reset_server_error, self.shared_downlink_seed = reset_server_error, shared_downlink_seed
        _validate(self)
        self.averages = self.steps_since_average = self.bytes_average_total = 0
        self.average_due = False
        super().__init__(process_group, self.uplink.seed, warmup_steps)
        logger.info(
            "LIEC hook: uplink %s, downlink %s, compensation=%s, average_every=%d, warmup_steps=%d",
            self.uplink, self.downlink, compensation, average_every, warmup_steps,
        )  # fmt: skip

    @classmethod
    def from_settings(
        cls,
        process_group: comm.ProcessGroup | None = None,
        *,
        uplink: str | MethodConfig | None = None,
        downlink: str | MethodConfig | None = None,
        **settings: Any,
    ) -> LIECHookState:
        """A state from names / configs; ``settings``: the constructor's keywords, uplink config fields
        and ``down_``-prefixed downlink ones (a downlink not given as a config inherits the
        uplink's ``layerwise`` and ``seed``)."""
        own = {k: settings.pop(k) for k in list(settings) if k in _OPTIONS}
        up_over = {k: v for k, v in settings.items() if not k.startswith(_DOWN_PREFIX)}
        down_over = {k[len(_DOWN_PREFIX) :]: v for k, v in settings.items() if k.startswith(_DOWN_PREFIX)}
        up = _as_config(uplink, default_uplink(), "uplink", **up_over)
        if not isinstance(downlink, MethodConfig):
            down_over.setdefault("layerwise", up.layerwise)
            down_over.setdefault("seed", up.seed)
        return cls(process_group, up, _as_config(downlink, default_downlink(), "downlink", **down_over), **own)

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self.up_compressor = make_compressor_for(self.uplink)
        self.down_compressor = make_compressor_for(self.downlink)

    def _validate(self) -> None:
        _validate(self)

    def _fill(self, seg: Segment, device: torch.device) -> None:
        shape = (seg.numel,)  # immediate compensation: uplink feedback "none", no worker memory
        seg.feedback = make_feedback(self.uplink, shape, seg.key, compressor=self.up_compressor, device=device)
        seg.server = make_feedback(self.downlink, shape, seg.key, compressor=self.down_compressor, device=device)
        seg.down_nbytes = self.down_compressor.expected_nbytes(shape)

    def _end_bucket(self, bucket: comm.GradBucket, compressed: bool) -> bool:
        ended = super()._end_bucket(bucket, compressed)
        if ended and compressed:
            self.steps_since_average += 1
            self.average_due = bool(self.average_every) and self.steps_since_average >= self.average_every
        return ended

    def worker_error_state_bytes(self) -> int:
        """Bytes of worker error state (0 with immediate compensation)."""
        return persistent_bytes([t for s in self.segments.values() for t in s.worker_tensors()])

    def server_error_tensors(self) -> list[torch.Tensor]:
        """The (virtual) server's error state ``e_s``, of which every rank holds a copy."""
        return [t for s in self.segments.values() for t in s.server_tensors()]

    def server_error_state_bytes(self) -> int:
        """Bytes of server error state (what a parameter server would keep)."""
        return persistent_bytes(self.server_error_tensors())

    def stats(self) -> dict[str, Any]:
        names = ("compensation", "average_every", "shared_downlink_seed", "averages", "average_due")
        up_and_average = self.bytes_sent_total + self.bytes_average_total
        return {
            **super().stats(),
            **{name: getattr(self, name) for name in (*names, "bytes_average_total")},
            "bytes_up_with_average_ratio_total": ratio(up_and_average, self.bytes_dense_total),
            "worker_error_state_bytes": self.worker_error_state_bytes(),
            "server_error_state_bytes": self.server_error_state_bytes(),
        }


def liec_hook(state: LIECHookState, bucket: comm.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: LIEC-SGD's uplink all-reduce, virtual server and local compensation.

    The future holds the bucket buffer, overwritten with ``Δ̃ + δ_i`` (immediate) or ``Δ̃``.
    ``RuntimeError`` if a periodic average is due and :func:`liec_average_` was not called.
    """
    if state.average_due:
        raise RuntimeError(
            f"LIEC hook: a parameter average is due after {state.compressed_steps} compressed steps; "
            "call liec_average_(model, state) after every optimizer.step()"
        )
    with torch.no_grad():
        buffer = bucket.buffer()
        group = state.group()
        dense = buffer.numel() * buffer.element_size()
        if state.iter < state.warmup_steps:
            fut, sent = comm.allreduce_dense(buffer, buffer.dtype, group)
            state._count(bucket.index(), sent=sent, down=dense, dense=dense)
            state._end_bucket(bucket, compressed=False)
            return fut
        seed = state._seed()
        down_seed = seed if state.shared_downlink_seed else derive_seed(seed, "liec-downlink")
        immediate = state.compensation == "immediate"
        works = plan(state, bucket, buffer, state.uplink.layerwise)
        payloads = [state._payload(w, seed, consume=not immediate) for w in works]
        if immediate:  # δ_i = g_i − Δ_i in place (the k selected entries); applied in this step only
            for w, p in zip(works, payloads, strict=True):
                state.up_compressor.decompress_add_(p, w.vec, alpha=-1.0)
        fut, sent = comm.allreduce_payloads(payloads, group)
        state._count(bucket.index(), sent=sent, down=sum(w.seg.down_nbytes for w in works), dense=dense)
        state._end_bucket(bucket, compressed=True)

        def finish(f: torch.futures.Future[list[Payload]]) -> torch.Tensor:
            for w, averaged in zip(works, f.value(), strict=True):
                _server_step(state, w, averaged, down_seed, immediate)
            return buffer

        return fut.then(finish)


comm.annotate_hook(liec_hook, LIECHookState)


def _server_step(state: LIECHookState, w: Work, averaged: Payload, down_seed: int, immediate: bool) -> None:
    """The virtual server on ``v = mean_i Δ_i``: ``Δ̃ = Q_down(v + e_s)``, then this rank's gradient."""
    seg = w.seg
    assert seg.server is not None
    v = torch.zeros(seg.numel, dtype=torch.float32, device=w.vec.device)
    state.up_compressor.decompress_add_(averaged, v)  # dense v (d/k-scaled for rbSGD)
    try:
        down = seg.server.step(v, seed=down_seed, consume=True)
    except NonFiniteError:  # some rank sent NaN: every rank gets here alike; e_s untouched
        w.vec.fill_(float("nan"))
        return
    del v
    seg.last_down_nbytes = down.nbytes
    if not immediate:
        w.vec.zero_()
    state.down_compressor.decompress_add_(down, w.vec)  # Δ̃ (+ δ_i, already in vec)


def liec_average_(
    model: nn.Module, state: LIECHookState, *, optimizer: torch.optim.Optimizer | None = None, force: bool = False
) -> bool:
    """Periodic averaging: call on every rank after every ``optimizer.step()``; returns whether it averaged.

    When an average is due (or ``force``), the parameters of ``model`` (a DDP model or its
    module), and with ``optimizer`` its floating-point state (momentum buffers), are
    averaged over the ranks, and the server error is reset (``state.reset_server_error``).
    """
    if not isinstance(state, LIECHookState):
        raise ValueError(f"state must be a LIECHookState, got {type(state).__name__}")
    if not (state.average_due or force):
        return False
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with torch.no_grad():
        opt_state = [t for s in optimizer.state.values() for t in s.values()] if optimizer is not None else []
        opt_state = [t for t in opt_state if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0]
        tensors = [*module.parameters(), *opt_state]  # no 0-d entries (Adam's step)
        state.bytes_average_total += comm.average_(tensors, state.group())
        if state.reset_server_error:
            for seg in state.segments.values():
                assert seg.server is not None
                seg.server.reset()
    state.averages, state.steps_since_average, state.average_due = state.averages + 1, 0, False
    return True


def register_liec_hook(
    model: nn.parallel.DistributedDataParallel,
    *,
    uplink: str | MethodConfig | None = None,
    downlink: str | MethodConfig | None = None,
    process_group: comm.ProcessGroup | None = None,
    state: LIECHookState | None = None,
    **settings: Any,
) -> LIECHookState:
    """Register :func:`liec_hook` on a DDP model in one line and return its state.

    ``settings``: :class:`LIECHookState`'s keywords (``average_every=32``, ...), uplink
    ``MethodConfig`` fields (``k_ratio=0.1``) and downlink ones prefixed ``down_``
    (``down_compressor="top-k"``). A ``state`` (e.g. unpickled) is reused as it is. Call
    :func:`liec_average_` after every optimizer step.
    """
    if state is None:
        state = LIECHookState.from_settings(process_group, uplink=uplink, downlink=downlink, **settings)
    return register(model, state, LIECHookState, liec_hook, process_group)
