"""LIEC-SGD as a PyTorch DDP communication hook: bidirectional compression with a virtual server.

LIEC-SGD (Cheng et al. 2024, arXiv 2402.11857, "local immediate error compensation")
compresses both directions of a parameter-server round: the workers' gradients on the
uplink and the server's aggregate on the downlink. The server keeps an error for its
downlink; a worker keeps **no** error between steps: it adds its own compression error
to the update it receives in the same step ("immediate"). The workers' models then
differ; they are averaged (and the server error reset) every ``H`` steps.

One line registers it (then one call after each optimizer step)::

    state = register_liec_hook(ddp, k_ratio=0.1, down_compressor="top-k", down_k_ratio=0.1,
                               average_every=32)
    ...
    loss.backward(); opt.step(); liec_average_(ddp, state)   # averages every H steps, else a no-op

The update rule (``compensation="immediate"``, the default), per segment (a parameter,
or a whole bucket with ``layerwise=False``) and step ``t``, on worker ``i`` of ``n``:

==========================  ==============================================================
uplink (worker i)           ``Δ_i = Q_up(g_i)`` with the shared step seed; ``δ_i = g_i − Δ_i``
                            (not stored: it is used in this step, below)
"server" (every rank)       ``v = mean_i Δ_i`` (one all-reduce of the ``k`` values);
                            ``p_s = v + e_s``; ``Δ̃ = Q_down(p_s)``; ``e_s ← p_s − Δ̃``
worker i's gradient         ``Δ̃ + δ_i`` (written into the bucket; the optimizer applies it)
every ``H`` steps           ``x_i ← mean_j x_j`` (all-reduce of the parameters,
                            :func:`liec_average_`), and ``e_s ← 0``
==========================  ==============================================================

``Q_up`` is all-reducible (random-block-k, random-k, identity, rbSGD: every rank picks the
same coordinates from the shared seed). The server step is the core's error feedback
(:mod:`conef_fl.feedback`) applied to ``v``: ``efsgd`` (dense ``e_s``, the paper), ``conef``
(``e_s`` in a count sketch, partial feedback ``β``) or ``none`` (no server memory).
``Q_down`` draws its coordinates from its own seed, derived from the step seed
(``derive_seed(step_seed, "liec-downlink")``), so it does not just re-send the uplink's block.
With ``shared_downlink_seed=True`` it uses the uplink's step seed instead: a random-block-k
downlink of the uplink's ratio then picks exactly the uplink's block, which holds all of
``v``, so ``e_s`` stays zero and the downlink is lossless at ``k`` values -- what a parameter
server can always do with an all-reducible uplink (the unidirectional hooks' downlink).

Why the worker error is not fed into the next uplink: it has already been applied. Summed
over the workers, the applied gradients are ``Σ_i (Δ̃ + g_i − Δ_i) = Σ_i g_i + n (e_s − e_s')``:
the mean model moves by the mean gradient, delayed only by the server error. Feeding
``δ_i`` into the next uplink as well (``p_i = g_i + e_i``) would apply every worker error
twice. The models drift apart because ``δ_i`` differs between workers; the periodic
average removes the drift. Resetting ``e_s`` follows the paper (it bounds the server
error); it drops the ``n·e_s`` that was still to be applied (``reset_server_error=False``
keeps it instead).

``compensation="delayed"`` is the classic alternative (DoubleSqueeze-style bidirectional
error feedback): the uplink runs the core's error feedback of ``uplink.feedback``
(``efsgd``, ``conef`` with a count sketch, ...), every worker applies ``Δ̃`` only, so the
models stay identical, and with a lossless downlink the hook is exactly
:func:`conef_fl.ddp_hook.conef_hook` (tested step for step).

The virtual server. DDP has no parameter server. Every rank receives ``v`` from the
all-reduce and runs the server's step itself, with its own copy of ``e_s``: the inputs,
the seed and the operations are the same on every rank, so the copies agree (bit for bit
on CPU; on CUDA a count-sketch ``e_s`` is updated with ``index_add_``, whose atomic adds
may round differently per rank: the drift is of rounding size and is removed at the next
average and reset). No byte moves for the downlink here; ``bytes_down`` counts what a
parameter server would send each worker (the payload of ``Δ̃``), ``bytes_sent`` what this
rank passed to the all-reduce (the uplink), as in :class:`conef_fl.ddp_hook.ConEFHookState`.

DDP and diverging parameters. DDP broadcasts rank 0's parameters once, at construction,
and afterwards only all-reduces gradients; it never checks that the ranks' parameters
agree. With this hook each rank receives a different gradient (``Δ̃ + δ_i``), so between
two averages the ranks' parameters differ, by design. Buffers (BatchNorm statistics)
are still broadcast from rank 0 by DDP (``broadcast_buffers=True``). Anything that
assumes identical replicas (saving rank 0's model, evaluating on rank 0) must run right
after an average: :func:`liec_average_` with ``force=True`` averages at any time.

Why averaging is a separate call. The average must come *after* the optimizer step of
the ``H``-th iteration; a communication hook runs during the backward pass, before it,
while the parameters are still in use by autograd. So the training loop calls
:func:`liec_average_` after every ``optimizer.step()``: it averages when ``H``
compressed steps have passed since the last average and returns ``False`` otherwise.
A hook that finds an average due and not done raises ``RuntimeError`` (on every rank
alike), so a forgotten call cannot silently turn the method into local SGD.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from conef_fl.compressors.base import Compressor, Payload
from conef_fl.config import MethodConfig
from conef_fl.ddp_hook import ALLREDUCE_COMPRESSORS
from conef_fl.errors.base import NonFiniteError
from conef_fl.feedback import ErrorFeedback, NoFeedback, make_compressor_for, make_feedback
from conef_fl.memory import persistent_bytes
from conef_fl.registry import method_config
from conef_fl.seeding import derive_seed, make_generator

__all__ = [
    "COMPENSATIONS",
    "DOWNLINK_COMPRESSORS",
    "DOWNLINK_FEEDBACKS",
    "UPLINK_COMPRESSORS",
    "LIECHookState",
    "default_downlink",
    "default_uplink",
    "liec_average_",
    "liec_hook",
    "register_liec_hook",
]

logger = logging.getLogger(__name__)

#: Uplink compressors: all-reducible (one all-reduce of the ``k`` values of every rank).
UPLINK_COMPRESSORS: tuple[str, ...] = ALLREDUCE_COMPRESSORS
#: Downlink compressors: deterministic given the server's input and the shared seed.
DOWNLINK_COMPRESSORS: tuple[str, ...] = ("identity", "random-block-k", "random-k", "rbsgd", "top-k", "scaled-sign")
#: Server error feedback: none, dense (the paper), count sketch / other core stores (ConEF).
DOWNLINK_FEEDBACKS: tuple[str, ...] = ("none", "efsgd", "conef")
#: ``immediate``: LIEC (worker error applied in the same step, no worker memory);
#: ``delayed``: the worker error is fed into the next uplink (bidirectional EF / ConEF).
COMPENSATIONS: tuple[str, ...] = ("immediate", "delayed")

_STATE_VERSION = 1
_SEED_HIGH = 1 << 62
_DOWN_PREFIX = "down_"


def default_uplink(**overrides: Any) -> MethodConfig:
    """The default uplink: random-block-k 10 %, no worker memory (``feedback="none"``)."""
    return MethodConfig(feedback="none", compressor="random-block-k").replace(**overrides)


def default_downlink(**overrides: Any) -> MethodConfig:
    """The default downlink: random-block-k 10 % with a dense server error (``feedback="efsgd"``)."""
    return MethodConfig(feedback="efsgd", compressor="random-block-k").replace(**overrides)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is out of range; allowed: integer >= 0")
    return value


def _as_config(value: str | MethodConfig | None, default: MethodConfig, what: str, **overrides: Any) -> MethodConfig:
    if value is None:
        value = default
    if isinstance(value, MethodConfig):
        # from_dict names unknown keys in a ValueError (dataclasses.replace would raise TypeError)
        return MethodConfig.from_dict({**value.to_dict(), **overrides}) if overrides else value
    if isinstance(value, str):
        return method_config(value, **overrides)
    raise ValueError(f"{what} must be a registry name, a MethodConfig or None, got {type(value).__name__}")


def _validate(
    uplink: object,
    downlink: object,
    compensation: object,
    average_every: object,
    warmup_steps: object,
    reset_server_error: object,
    shared_downlink_seed: object = False,
) -> None:
    for name, cfg in (("uplink", uplink), ("downlink", downlink)):
        if not isinstance(cfg, MethodConfig):
            raise ValueError(f"{name} must be a MethodConfig, got {type(cfg).__name__}")
    assert isinstance(uplink, MethodConfig) and isinstance(downlink, MethodConfig)
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation={compensation!r} is not valid; allowed: {', '.join(COMPENSATIONS)}")
    _check_count("warmup_steps", warmup_steps)
    _check_count("average_every", average_every)
    for flag, value in (("reset_server_error", reset_server_error), ("shared_downlink_seed", shared_downlink_seed)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag}={value!r} must be a bool")
    if compensation == "immediate" and average_every == 0:
        raise ValueError(
            "average_every=0 is out of range with compensation='immediate' (the models would drift apart "
            "for ever); allowed: integer >= 1"
        )
    if uplink.compressor not in UPLINK_COMPRESSORS:
        raise ValueError(
            f"uplink compressor={uplink.compressor!r} is not supported (it must be all-reducible); "
            f"allowed: {', '.join(UPLINK_COMPRESSORS)}"
        )
    if compensation == "immediate" and uplink.feedback != "none":
        raise ValueError(
            f"uplink feedback={uplink.feedback!r} keeps a worker error for the next step, which immediate "
            "compensation has already applied (it would be applied twice); allowed with "
            "compensation='immediate': 'none' (or use compensation='delayed')"
        )
    if downlink.compressor not in DOWNLINK_COMPRESSORS:
        raise ValueError(
            f"downlink compressor={downlink.compressor!r} is not supported; allowed: {', '.join(DOWNLINK_COMPRESSORS)}"
        )
    if downlink.feedback not in DOWNLINK_FEEDBACKS:
        raise ValueError(
            f"downlink feedback={downlink.feedback!r} is not supported (the server error); "
            f"allowed: {', '.join(DOWNLINK_FEEDBACKS)}"
        )
    if downlink.layerwise != uplink.layerwise:
        raise ValueError(
            f"downlink layerwise={downlink.layerwise} differs from uplink layerwise={uplink.layerwise}; "
            "both directions use the same segments, so they must be equal"
        )


# ---------------------------------------------------------------------------------------------
# Segments.
# ---------------------------------------------------------------------------------------------


class _Segment:
    """State of one compressed unit (a parameter, or a flat bucket with ``layerwise=False``).

    Attributes
    ----------
    key:
        Parameter name or ``bucket{i}``: seeds the selections and the sketches' hashes.
    names, sizes:
        Parameters covered and their numbers of elements, in flat order.
    uplink:
        The worker's :class:`~conef_fl.feedback.ErrorFeedback` (``NoFeedback`` with immediate
        compensation: the worker keeps no error).
    server:
        The virtual server's error feedback on the downlink (its error ``e_s``).
    down_nbytes:
        Bytes of one downlink payload (``Q_down.expected_nbytes``).
    last_down_nbytes:
        Bytes of the last downlink payload actually produced (for checks).
    """

    __slots__ = ("key", "names", "sizes", "uplink", "server", "down_nbytes", "last_down_nbytes")

    def __init__(
        self,
        key: str,
        names: tuple[str, ...],
        sizes: tuple[int, ...],
        uplink: ErrorFeedback,
        server: ErrorFeedback,
        down_nbytes: int,
    ) -> None:
        self.key = key
        self.names = names
        self.sizes = sizes
        self.uplink = uplink
        self.server = server
        self.down_nbytes = down_nbytes
        self.last_down_nbytes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        for s in self.__slots__:
            setattr(self, s, state[s])

    @property
    def numel(self) -> int:
        """Elements of the segment."""
        return sum(self.sizes)


class _Work:
    """One segment's flat view of the bucket buffer during one step."""

    __slots__ = ("seg", "vec", "payload", "bad")

    def __init__(self, seg: _Segment, vec: torch.Tensor) -> None:
        self.seg = seg
        self.vec = vec
        self.payload: Payload | None = None
        self.bad = False


# ---------------------------------------------------------------------------------------------
# The state.
# ---------------------------------------------------------------------------------------------


class LIECHookState:
    r"""Settings, error state, shared randomness and statistics of :func:`liec_hook`.

    Parameters
    ----------
    process_group:
        Group to communicate in; ``None`` is the default (world) group.
    uplink:
        The workers' compression (:class:`~conef_fl.config.MethodConfig`): ``compressor`` in
        :data:`UPLINK_COMPRESSORS`, ``k_ratio``, ``value_dtype``, ``layerwise``, ``seed``; with
        ``compensation="delayed"`` also ``feedback`` and its error store (``efsgd``,
        ``conef`` + ``sketch_ratio``, ``beta``, ...). Default :func:`default_uplink`.
    downlink:
        The server's compression: ``compressor`` in :data:`DOWNLINK_COMPRESSORS` (with its
        ``k_ratio`` / ``value_dtype``) and ``feedback`` in :data:`DOWNLINK_FEEDBACKS`, the
        server error (``efsgd``: dense; ``conef``: count sketch with ``sketch_ratio``,
        ``beta``; ``none``). ``layerwise`` must equal the uplink's. Default
        :func:`default_downlink`. ``identity`` with ``none`` or ``efsgd`` is lossless.
    compensation:
        ``"immediate"`` (LIEC-SGD, see the module notes) or ``"delayed"``.
    average_every:
        ``H``: compressed steps between parameter averages (and server-error resets),
        done by :func:`liec_average_`. >= 1 with immediate compensation; 0 (never) is
        allowed with delayed compensation, whose models stay identical.
    warmup_steps:
        Iterations run with a plain dense all-reduce first (>= 0).
    reset_server_error:
        Zero the server error at each average (the paper's rule; default). ``False``
        keeps it, so nothing the workers sent is lost.
    shared_downlink_seed:
        ``Q_down`` uses the uplink's step seed (default ``False``: a seed of its own); see
        the module notes.

    Notes
    -----
    The shared step seed is drawn from the state's own ``torch.Generator``, seeded with
    ``derive_seed(uplink.seed, "ddp-hook")`` -- the same derivation as
    :class:`conef_fl.ddp_hook.ConEFHookState`, so both hooks pick the same uplink
    coordinates at the same step (the tests compare them step for step). The global RNG
    is never used. The state pickles without its process group.

    Attributes
    ----------
    iter, dense_steps, compressed_steps:
        Iterations done; of them warm-up (dense) and compressed.
    averages, steps_since_average, average_due:
        Parameter averages done; compressed steps since the last one; whether one is due
        (set by the hook after the ``H``-th step, cleared by :func:`liec_average_`).
    bytes_sent_total, last_bytes_sent:
        Uplink: bytes this rank passed to the gradient all-reduce (all steps / the last).
    bytes_down_total, last_bytes_down:
        Downlink: bytes of the compressed ``Δ̃`` a server would send to each worker.
    bytes_dense_total, last_bytes_dense:
        What a dense step moves in one direction (bucket numel x element size).
    bytes_average_total:
        Bytes this rank passed to the averaging all-reduces (parameters, optimizer state).
    nonfinite_segments:
        Segment steps this rank sent as NaN (its gradient had NaN/Inf).
    """

    __slots__ = [
        "process_group",
        "uplink",
        "downlink",
        "compensation",
        "average_every",
        "warmup_steps",
        "reset_server_error",
        "shared_downlink_seed",
        "rng",
        "iter",
        "step_seed",
        "segments",
        "dense_steps",
        "compressed_steps",
        "averages",
        "steps_since_average",
        "average_due",
        "bytes_sent_total",
        "bytes_down_total",
        "bytes_dense_total",
        "bytes_average_total",
        "last_bytes_sent",
        "last_bytes_down",
        "last_bytes_dense",
        "nonfinite_segments",
        "segments_created",
        # transient (not pickled)
        "_names_by_id",
        "_bound_names",
        "_seed_iter",
        "_used",
        "_cur_sent",
        "_cur_down",
        "_cur_dense",
        "_up_compressor",
        "_down_compressor",
    ]
    _TRANSIENT = frozenset(
        {
            "process_group",
            "_names_by_id",
            "_bound_names",
            "_seed_iter",
            "_used",
            "_cur_sent",
            "_cur_down",
            "_cur_dense",
            "_up_compressor",
            "_down_compressor",
        }
    )

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        uplink: MethodConfig | None = None,
        downlink: MethodConfig | None = None,
        *,
        compensation: str = "immediate",
        average_every: int = 32,
        warmup_steps: int = 0,
        reset_server_error: bool = True,
        shared_downlink_seed: bool = False,
    ) -> None:
        uplink = uplink if uplink is not None else default_uplink()
        downlink = downlink if downlink is not None else default_downlink(layerwise=uplink.layerwise)
        _validate(uplink, downlink, compensation, average_every, warmup_steps, reset_server_error, shared_downlink_seed)
        self.process_group = process_group
        self.uplink = uplink
        self.downlink = downlink
        self.compensation = compensation
        self.average_every = average_every
        self.warmup_steps = warmup_steps
        self.reset_server_error = reset_server_error
        self.shared_downlink_seed = shared_downlink_seed
        self.rng = make_generator(derive_seed(uplink.seed, "ddp-hook"))
        self.iter = 0
        self.step_seed = 0
        self.segments: dict[tuple[str, ...], _Segment] = {}
        self.dense_steps = 0
        self.compressed_steps = 0
        self.averages = 0
        self.steps_since_average = 0
        self.average_due = False
        self.bytes_sent_total = 0
        self.bytes_down_total = 0
        self.bytes_dense_total = 0
        self.bytes_average_total = 0
        self.last_bytes_sent = 0
        self.last_bytes_down = 0
        self.last_bytes_dense = 0
        self.nonfinite_segments = 0
        self.segments_created = 0
        self._reset_transient()
        logger.info(
            "LIEC hook: uplink %s, downlink %s, compensation=%s, average_every=%d, warmup_steps=%d",
            uplink, downlink, compensation, average_every, warmup_steps,
        )  # fmt: skip

    @classmethod
    def from_settings(
        cls,
        process_group: dist.ProcessGroup | None = None,
        *,
        uplink: str | MethodConfig | None = None,
        downlink: str | MethodConfig | None = None,
        compensation: str = "immediate",
        average_every: int = 32,
        warmup_steps: int = 0,
        reset_server_error: bool = True,
        shared_downlink_seed: bool = False,
        **overrides: Any,
    ) -> LIECHookState:
        """A state from registry names / configs and keyword overrides.

        ``overrides`` are :class:`~conef_fl.config.MethodConfig` fields of the uplink
        (``k_ratio=0.1``) or, prefixed ``down_``, of the downlink (``down_compressor="top-k"``,
        ``down_k_ratio=0.05``, ``down_feedback="conef"``, ``down_sketch_ratio=0.1``). Unless
        ``downlink`` is a ``MethodConfig`` (taken as it is), it inherits the uplink's
        ``layerwise`` and ``seed`` when they are not given. Registry names
        fix some fields (``"conef-cs"`` fixes the count sketch); a config fixes nothing.
        """
        up_over = {k: v for k, v in overrides.items() if not k.startswith(_DOWN_PREFIX)}
        down_over = {k[len(_DOWN_PREFIX) :]: v for k, v in overrides.items() if k.startswith(_DOWN_PREFIX)}
        up = _as_config(uplink, default_uplink(), "uplink", **up_over)
        if not isinstance(downlink, MethodConfig):  # an explicit config is taken as it is
            down_over.setdefault("layerwise", up.layerwise)
            down_over.setdefault("seed", up.seed)
        down = _as_config(downlink, default_downlink(), "downlink", **down_over)
        return cls(
            process_group,
            up,
            down,
            compensation=compensation,
            average_every=average_every,
            warmup_steps=warmup_steps,
            reset_server_error=reset_server_error,
            shared_downlink_seed=shared_downlink_seed,
        )

    def _reset_transient(self) -> None:
        self._names_by_id: dict[int, str] = {}
        self._bound_names = False
        self._seed_iter = -1
        self._used: set[tuple[str, ...]] = set()
        self._cur_sent = 0
        self._cur_down = 0
        self._cur_dense = 0
        self._up_compressor: Compressor = make_compressor_for(self.uplink)
        self._down_compressor: Compressor = make_compressor_for(self.downlink)

    # -- pickling -------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group and per-process bookkeeping."""
        state = {s: getattr(self, s) for s in self.__slots__ if s not in self._TRANSIENT}
        state["_version"] = _STATE_VERSION
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`__getstate__`; ``process_group`` becomes ``None`` (the default group)."""
        if state.get("_version") != _STATE_VERSION:
            raise ValueError(
                f"LIECHookState version={state.get('_version')!r} is not supported; allowed: {_STATE_VERSION}"
            )
        expected = [s for s in self.__slots__ if s not in self._TRANSIENT]
        missing = [s for s in expected if s not in state]
        if missing:
            raise ValueError(f"LIECHookState state is missing {missing}")
        _validate(
            state["uplink"],
            state["downlink"],
            state["compensation"],
            state["average_every"],
            state["warmup_steps"],
            state["reset_server_error"],
            state["shared_downlink_seed"],
        )
        for s in expected:
            setattr(self, s, state[s])
        self.process_group = None
        self._reset_transient()

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable dict (what ``pickle`` saves)."""
        return self.__getstate__()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` of a state with the same settings; keeps this state's process group.

        Raises
        ------
        ValueError
            If the saved uplink/downlink/compensation differ from this state's, or the dict is malformed.
        """
        for name in ("uplink", "downlink", "compensation", "shared_downlink_seed"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"state_dict has {name}={state.get(name)!r}, expected {getattr(self, name)!r}")
        group = self.process_group
        self.__setstate__(state)
        self.process_group = group

    # -- binding --------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> LIECHookState:
        """Name the segments after ``model``'s parameters (a DDP model or its module)."""
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if not isinstance(module, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self._names_by_id = {id(p): name for name, p in module.named_parameters()}
        self._bound_names = True
        return self

    def _name(self, param: torch.Tensor) -> str:
        name = self._names_by_id.get(id(param))
        if name is None:
            if self._bound_names:
                raise ValueError("a bucket holds a parameter that is not in the bound model; call bind(model)")
            name = f"param{len(self._names_by_id)}"
            self._names_by_id[id(param)] = name
        return name

    # -- accounting -----------------------------------------------------------------------------
    def group(self) -> dist.ProcessGroup:
        """The process group used (``process_group`` or the default group)."""
        if self.process_group is not None:
            return self.process_group
        world = dist.group.WORLD
        if world is None:
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        return world  # type: ignore[return-value]

    def worker_error_tensors(self) -> list[torch.Tensor]:
        """The workers' error state (empty with immediate compensation)."""
        return [t for s in self.segments.values() for t in s.uplink.persistent_tensors()]

    def server_error_tensors(self) -> list[torch.Tensor]:
        """The (virtual) server's error state ``e_s``, of which every rank holds a copy."""
        return [t for s in self.segments.values() for t in s.server.persistent_tensors()]

    def error_tensors(self) -> list[torch.Tensor]:
        """Every tensor of error state this rank keeps between steps (worker and server)."""
        return self.worker_error_tensors() + self.server_error_tensors()

    def worker_error_state_bytes(self) -> int:
        """Bytes of worker error state (0 with immediate compensation)."""
        return persistent_bytes(self.worker_error_tensors())

    def server_error_state_bytes(self) -> int:
        """Bytes of server error state (what a parameter server would keep)."""
        return persistent_bytes(self.server_error_tensors())

    def error_state_bytes(self) -> int:
        """Bytes of error state this rank keeps (worker + its copy of the server's)."""
        return persistent_bytes(self.error_tensors())

    def compressor_state_bytes(self) -> int:
        """Compressor state kept between steps (none: PowerSGD is not supported here)."""
        return 0

    def num_elements(self) -> int:
        """Elements covered by the segments."""
        return sum(s.numel for s in self.segments.values())

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-able dict (see the class attributes)."""

        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        return {
            "compensation": self.compensation,
            "average_every": self.average_every,
            "shared_downlink_seed": self.shared_downlink_seed,
            "iter": self.iter,
            "dense_steps": self.dense_steps,
            "compressed_steps": self.compressed_steps,
            "averages": self.averages,
            "average_due": self.average_due,
            "bytes_sent_total": self.bytes_sent_total,
            "bytes_down_total": self.bytes_down_total,
            "bytes_dense_total": self.bytes_dense_total,
            "bytes_average_total": self.bytes_average_total,
            "bytes_ratio_total": ratio(self.bytes_sent_total, self.bytes_dense_total),
            "bytes_down_ratio_total": ratio(self.bytes_down_total, self.bytes_dense_total),
            "bytes_up_with_average_ratio_total": ratio(
                self.bytes_sent_total + self.bytes_average_total, self.bytes_dense_total
            ),
            "last_bytes_sent": self.last_bytes_sent,
            "last_bytes_down": self.last_bytes_down,
            "last_bytes_dense": self.last_bytes_dense,
            "last_bytes_ratio": ratio(self.last_bytes_sent, self.last_bytes_dense),
            "last_bytes_down_ratio": ratio(self.last_bytes_down, self.last_bytes_dense),
            "worker_error_state_bytes": self.worker_error_state_bytes(),
            "server_error_state_bytes": self.server_error_state_bytes(),
            "error_state_bytes": self.error_state_bytes(),
            "segments": len(self.segments),
            "segments_created": self.segments_created,
            "nonfinite_segments": self.nonfinite_segments,
        }

    def _count(self, sent: int, down: int, dense: int) -> None:
        self._cur_sent += sent
        self._cur_down += down
        self._cur_dense += dense

    def _end_bucket(self, bucket: dist.GradBucket, compressed: bool) -> None:
        if not bucket.is_last():
            return
        self.last_bytes_sent, self.last_bytes_down = self._cur_sent, self._cur_down
        self.last_bytes_dense = self._cur_dense
        self.bytes_sent_total += self._cur_sent
        self.bytes_down_total += self._cur_down
        self.bytes_dense_total += self._cur_dense
        self._cur_sent = self._cur_down = self._cur_dense = 0
        self.iter += 1
        if not compressed:
            self.dense_steps += 1
            return
        self.compressed_steps += 1
        stale = [k for k in self.segments if k not in self._used]
        for k in stale:
            logger.info("LIEC hook: dropping the state of %s (no longer a bucket layout)", k)
            del self.segments[k]
        self._used = set()
        self.steps_since_average += 1
        if self.average_every and self.steps_since_average >= self.average_every:
            self.average_due = True

    def _seed(self) -> int:
        if self._seed_iter != self.iter:
            self.step_seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=self.rng).item())
            self._seed_iter = self.iter
        return self.step_seed

    # -- segments -------------------------------------------------------------------------------
    def _new_segment(self, key: str, names: tuple[str, ...], sizes: tuple[int, ...], device: torch.device) -> _Segment:
        numel = sum(sizes)
        shape = (numel,)
        if self.compensation == "immediate":
            up: ErrorFeedback = NoFeedback(shape, self._up_compressor, self.uplink, key, device)
        else:
            up = make_feedback(self.uplink, shape, key, compressor=self._up_compressor, device=device)
        server = make_feedback(self.downlink, shape, key, compressor=self._down_compressor, device=device)
        self.segments_created += 1
        return _Segment(key, names, sizes, up, server, self._down_compressor.expected_nbytes(shape))

    def _plan(self, bucket: dist.GradBucket, buffer: torch.Tensor) -> list[_Work]:
        params = bucket.parameters()
        grads = bucket.gradients()
        names = tuple(self._name(p) for p in params)
        device = buffer.device
        if self.uplink.layerwise:
            base = buffer.data_ptr()
            size = buffer.element_size()
            works = []
            for name, g in zip(names, grads, strict=True):
                key = (name,)
                seg = self.segments.get(key)
                if seg is None or seg.numel != g.numel():
                    seg = self.segments[key] = self._new_segment(name, key, (g.numel(),), device)
                self._used.add(key)
                works.append(_Work(seg, buffer.narrow(0, (g.data_ptr() - base) // size, g.numel())))
            return works
        sizes = tuple(int(g.numel()) for g in grads)
        seg = self.segments.get(names)
        if seg is None or seg.sizes != sizes:
            stale = [k for k in self.segments if set(k) & set(names)]
            if stale:
                logger.info("LIEC hook: bucket %d has a new layout; new error state", bucket.index())
                for k in stale:
                    del self.segments[k]
            seg = self.segments[names] = self._new_segment(f"bucket{bucket.index()}", names, sizes, device)
        self._used.add(names)
        return [_Work(seg, buffer)]


# ---------------------------------------------------------------------------------------------
# The hook.
# ---------------------------------------------------------------------------------------------


def _allreduce_dense(buffer: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.futures.Future[torch.Tensor]:
    buffer.div_(world)
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _uplink_payload(state: LIECHookState, w: _Work, seed: int) -> Payload:
    """The worker's uplink step on ``w.vec``; on NaN/Inf a same-shaped NaN payload (state untouched)."""
    fb = w.seg.uplink
    try:
        return fb.step(w.vec, seed=seed, consume=state.compensation == "delayed")
    except NonFiniteError:
        w.bad = True
        state.nonfinite_segments += 1
        logger.warning("LIEC hook: gradient of %s has NaN/Inf; sending NaN, error left untouched", w.seg.key)
        clean = torch.zeros(w.vec.numel(), dtype=torch.float32, device=w.vec.device)
        payload = fb.compressor.compress(clean, seed=seed, key=fb.key)
        for arr in payload.arrays.values():
            if arr.is_floating_point():
                arr.fill_(float("nan"))
        return payload


def liec_hook(state: LIECHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: LIEC-SGD's uplink all-reduce, virtual server and local compensation.

    Register with :func:`register_liec_hook` (or ``ddp.register_comm_hook(state, liec_hook)``)
    and call :func:`liec_average_` after every optimizer step. The returned future holds
    the bucket buffer, overwritten with this rank's gradient ``Δ̃ + δ_i`` (immediate) or
    ``Δ̃`` (delayed).

    Raises
    ------
    RuntimeError
        If a periodic average is due and :func:`liec_average_` was not called.
    """
    if state.average_due:
        raise RuntimeError(
            f"LIEC hook: a parameter average is due after {state.compressed_steps} compressed steps; "
            "call liec_average_(model, state) after every optimizer.step()"
        )
    with torch.no_grad():
        buffer = bucket.buffer()
        group = state.group()
        world = group.size()
        dense_bytes = buffer.numel() * buffer.element_size()
        if state.iter < state.warmup_steps:
            fut = _allreduce_dense(buffer, group, world)
            state._count(dense_bytes, dense_bytes, dense_bytes)
            state._end_bucket(bucket, compressed=False)
            return fut
        seed = state._seed()
        down_seed = seed if state.shared_downlink_seed else derive_seed(seed, "liec-downlink")
        immediate = state.compensation == "immediate"
        works = state._plan(bucket, buffer)
        values = []
        for w in works:
            w.payload = _uplink_payload(state, w, seed)
            vals = w.payload.arrays["values"]
            if vals.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                vals = vals.clone()  # never all-reduce (or overwrite) the bucket buffer through an alias
                w.payload = Payload(w.payload.kind, w.payload.shape, {"values": vals}, w.payload.meta)
            if immediate:
                # δ_i = g_i − Δ_i, in place (touches the k selected entries only); used in this step
                w.seg.uplink.compressor.decompress_add_(w.payload, w.vec, alpha=-1.0)
            values.append(vals)
        comm = values[0] if len(values) == 1 else torch.cat([v.reshape(-1) for v in values])
        comm.div_(world)
        sent = comm.numel() * comm.element_size()
        down = sum(w.seg.down_nbytes for w in works)
        fut = dist.all_reduce(comm, group=group, async_op=True).get_future()
        state._count(sent, down, dense_bytes)
        state._end_bucket(bucket, compressed=True)

        def finish(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            avg = f.value()[0]
            off = 0
            for w in works:
                assert w.payload is not None
                n = w.payload.arrays["values"].numel()
                averaged = Payload(w.payload.kind, w.payload.shape, {"values": avg[off : off + n]}, w.payload.meta)
                off += n
                _server_step(w, averaged, down_seed, immediate)
            return buffer

        return fut.then(finish)


# DDP compares the annotations with the real objects (``from __future__`` made them strings).
liec_hook.__annotations__ = {
    "state": LIECHookState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _server_step(w: _Work, averaged: Payload, down_seed: int, immediate: bool) -> None:
    """The virtual server on ``v = mean_i Δ_i``: ``Δ̃ = Q_down(v + e_s)``, then write this rank's gradient."""
    seg = w.seg
    vec = w.vec
    v = torch.zeros(seg.numel, dtype=torch.float32, device=vec.device)
    seg.uplink.compressor.decompress_add_(averaged, v)  # dense v (d/k-scaled for rbSGD)
    try:
        down = seg.server.step(v, seed=down_seed, consume=True)
    except NonFiniteError:  # some rank sent NaN: every rank gets here alike; e_s untouched
        vec.fill_(float("nan"))
        return
    del v
    seg.last_down_nbytes = down.nbytes
    if not immediate:
        vec.zero_()
    seg.server.compressor.decompress_add_(down, vec)  # Δ̃ (+ δ_i, already in vec)


# ---------------------------------------------------------------------------------------------
# Periodic averaging.
# ---------------------------------------------------------------------------------------------


def _allreduce_mean_(tensors: list[torch.Tensor], group: dist.ProcessGroup, world: int) -> int:
    """Average ``tensors`` in place over the ranks, one all-reduce per dtype (sum, then divide).

    Summing first makes the average of identical values exact for two ranks. Returns the
    bytes passed to the all-reduces.
    """
    sent = 0
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group_tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        off = 0
        for t in group_tensors:
            n = t.numel()
            t.detach().copy_(flat[off : off + n].view_as(t))
            off += n
        sent += flat.numel() * flat.element_size()
    return sent


def liec_average_(
    model: nn.Module,
    state: LIECHookState,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    force: bool = False,
) -> bool:
    """Periodic averaging: call on every rank after every ``optimizer.step()``.

    When an average is due (``state.average_every`` compressed steps since the last one)
    or ``force`` is set, the parameters of ``model`` (a DDP model or its module) are
    averaged over the ranks with ``torch.distributed.all_reduce`` (one call per dtype),
    and the server error is reset (``state.reset_server_error``). Worker errors are not
    touched (immediate compensation keeps none; with delayed compensation they are the
    uplink's error feedback, which the models' average does not change).

    Parameters
    ----------
    model:
        The model whose parameters are averaged.
    state:
        The hook's state.
    optimizer:
        If given, its floating-point state tensors (e.g. SGD's momentum buffers) are
        averaged too; by default only the parameters are (the paper's rule).
    force:
        Average now, whether due or not (e.g. before evaluating or saving rank 0's model);
        the ``H``-step count restarts.

    Returns
    -------
    bool
        Whether it averaged.
    """
    if not isinstance(state, LIECHookState):
        raise ValueError(f"state must be a LIECHookState, got {type(state).__name__}")
    if not (state.average_due or force):
        return False
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    group = state.group()
    world = group.size()
    with torch.no_grad():
        tensors = [p for p in module.parameters()]
        if optimizer is not None:
            tensors += [
                t
                for s in optimizer.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0
            ]
        state.bytes_average_total += _allreduce_mean_(tensors, group, world)
        if state.reset_server_error:
            for seg in state.segments.values():
                seg.server.reset()
    state.averages += 1
    state.steps_since_average = 0
    state.average_due = False
    return True


# ---------------------------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------------------------


def register_liec_hook(
    model: nn.parallel.DistributedDataParallel,
    *,
    uplink: str | MethodConfig | None = None,
    downlink: str | MethodConfig | None = None,
    compensation: str = "immediate",
    average_every: int = 32,
    warmup_steps: int = 0,
    reset_server_error: bool = True,
    shared_downlink_seed: bool = False,
    process_group: dist.ProcessGroup | None = None,
    state: LIECHookState | None = None,
    **overrides: Any,
) -> LIECHookState:
    """Register :func:`liec_hook` on a DDP model in one line and return its state.

    Parameters
    ----------
    model:
        The :class:`~torch.nn.parallel.DistributedDataParallel` model.
    uplink, downlink:
        Registry names or :class:`~conef_fl.config.MethodConfig` (defaults
        :func:`default_uplink`, :func:`default_downlink`), e.g. ``downlink="sgd"`` for a
        lossless downlink, ``downlink="conef-cs"`` for a server error in a count sketch.
    compensation, average_every, warmup_steps, reset_server_error, shared_downlink_seed:
        See :class:`LIECHookState`.
    process_group:
        Group to communicate in (``None``: the default group).
    state:
        A state to reuse (e.g. unpickled); the other settings are then ignored.
    **overrides:
        Uplink config fields (``k_ratio=0.1``), and downlink ones prefixed ``down_``
        (``down_compressor="top-k"``, ``down_k_ratio=0.05``, ``down_feedback="conef"``).

    Returns
    -------
    LIECHookState
        The registered state. Call :func:`liec_average_` after every optimizer step.

    Raises
    ------
    ValueError
        If ``model`` is not a DDP model, or for unknown names or invalid settings.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"model must be a DistributedDataParallel model, got {type(model).__name__}")
    if state is None:
        state = LIECHookState.from_settings(
            process_group,
            uplink=uplink,
            downlink=downlink,
            compensation=compensation,
            average_every=average_every,
            warmup_steps=warmup_steps,
            reset_server_error=reset_server_error,
            shared_downlink_seed=shared_downlink_seed,
            **overrides,
        )
    else:
        if not isinstance(state, LIECHookState):
            raise ValueError(f"state must be a LIECHookState, got {type(state).__name__}")
        if process_group is not None:
            state.process_group = process_group
    state.bind(model)
    model.register_comm_hook(state, liec_hook)
    return state
