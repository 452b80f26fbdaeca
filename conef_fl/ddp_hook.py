"""A PyTorch DDP communication hook for ConEF, EFSGD and PowerSGD with compressed error memory.

One line registers it on a :class:`~torch.nn.parallel.DistributedDataParallel` model::

    state = register_conef_hook(ddp_model, "conef-cs", k_ratio=0.1, sketch_ratio=0.1, beta=0.9)

Per bucket the hook runs the core's error feedback (:mod:`conef_fl.feedback`) on the
bucket's flat gradient ``u = g`` (the optimizer applies the learning rate) and
communicates the compressed payload:

==================================  =====================================================
compressor (``config.compressor``)  communication per bucket
==================================  =====================================================
identity + ``feedback="none"``      plain all-reduce (``sgd``), optionally in fp16/bf16
random-block-k, random-k, rbsgd,    **one** all-reduce of the ``k`` values (every rank picks
identity                            the same coordinates from the shared step seed)
powersgd (rank ``r``)               two all-reduces: ``P = M Q`` (plus the vectors sent
                                    dense), orthogonalize, then ``Q = Mᵀ P``; warm start
top-k, scaled-sign                  one all-gather of every rank's payload bytes
==================================  =====================================================

The error is kept per *segment*: one per parameter when ``config.layerwise`` (the
default and the paper's practice; keys are parameter names, so the state does not
depend on DDP's bucket layout), or one per bucket (``layerwise=False``: the whole flat
bucket is compressed, key ``f"bucket{index}"``). For ConEF the segment keeps only a
count sketch (``sketch_ratio`` of its size); nothing of the segment's size is kept.

Bucket layouts. DDP rebuilds its buckets after the first iteration (the parameters
are re-ordered by the order their gradients became ready), so a bucket's index and
size alone do not identify its contents. Every segment is therefore keyed by the
tuple of its parameters' names and validated by size: in flat mode a bucket whose
layout changed gets a new segment (the old one is dropped, logged). (``torch``'s
PowerSGD hook keys its memories by bucket index only and relies on
``start_powerSGD_iter > 1`` to skip the first layout.) A state restored into a new DDP
model sees DDP's *initial* layout during that model's first iteration; the flat
segments saved in the rebuilt layout are then gathered from the bucket and scattered
back (one copy, that iteration only), so training continues exactly.

Collectives are only ever issued from the hook itself (never from a future's callback),
so every rank issues them in the same order. The PowerSGD path waits for its first
all-reduce inside the hook for that reason.

Non-finite gradients are not refused (that would desynchronise the ranks): a rank whose
segment has NaN/Inf sends NaN in the same collective and leaves its error untouched, so
every rank receives a non-finite average (which, e.g., ``torch.amp.GradScaler`` skips).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from conef_fl.compressors.base import Payload, wire_value_dtype
from conef_fl.compressors.powersgd import matrix_view_shape, uses_dense
from conef_fl.config import MethodConfig
from conef_fl.errors.base import DenseError, ErrorStore, NonFiniteError
from conef_fl.feedback import ErrorFeedback, make_compressor_for, make_error_store, make_feedback
from conef_fl.memory import persistent_bytes
from conef_fl.registry import method_config
from conef_fl.seeding import derive_seed, make_generator

__all__ = [
    "ALLREDUCE_COMPRESSORS",
    "GATHER_COMPRESSORS",
    "POWERSGD_FEEDBACKS",
    "SUPPORTED_COMPRESSORS",
    "ConEFHookState",
    "conef_hook",
    "dense_error_bytes",
    "expected_bytes_per_step",
    "register_conef_hook",
]

logger = logging.getLogger(__name__)

#: Compressors whose payloads of all ranks are averaged by one all-reduce of ``k`` values.
ALLREDUCE_COMPRESSORS: tuple[str, ...] = ("identity", "random-block-k", "random-k", "rbsgd")
#: Compressors sent by one all-gather (fixed-size payloads that cannot be summed).
GATHER_COMPRESSORS: tuple[str, ...] = ("top-k", "scaled-sign")
#: Every compressor the hook supports.
SUPPORTED_COMPRESSORS: tuple[str, ...] = ALLREDUCE_COMPRESSORS + ("powersgd",) + GATHER_COMPRESSORS
#: Error feedback the PowerSGD path supports (the store is the core's error compressor C).
POWERSGD_FEEDBACKS: tuple[str, ...] = ("none", "efsgd", "conef")
#: Keyword arguments of :func:`register_conef_hook` that configure the state, not the method.
STATE_OPTIONS: tuple[str, ...] = ("warmup_steps", "error_reset_every")

_STATE_VERSION = 1
_SEED_HIGH = 1 << 62


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is out of range; allowed: integer >= 0")
    return value


# ---------------------------------------------------------------------------------------------
# Segments: the unit of compression and of error state.
# ---------------------------------------------------------------------------------------------


class _Segment:
    """Error state of one compressed unit: a parameter (layer-wise) or a whole flat bucket.

    Attributes
    ----------
    key:
        Stable string that seeds hashes and selections (parameter name or ``bucket{i}``).
    names:
        Parameter names covered, in the segment's flat order.
    sizes:
        Number of elements of each parameter.
    shape:
        Shape the compressor sees: the parameter's shape (layer-wise) or ``(numel,)``.
    feedback:
        The core's :class:`~conef_fl.feedback.ErrorFeedback` (all paths except PowerSGD).
    store:
        PowerSGD only: the error store C (count sketch, dense, ...) or ``None`` without feedback.
    q_memory:
        PowerSGD only: the warm-start ``Q`` (``m x r``, float32) after the last all-reduce.
    """

    __slots__ = ("key", "names", "sizes", "shape", "feedback", "store", "q_memory")

    def __init__(
        self, key: str, names: tuple[str, ...], sizes: tuple[int, ...], shape: tuple[int, ...]
    ) -> None:
        self.key = key
        self.names = names
        self.sizes = sizes
        self.shape = shape
        self.feedback: ErrorFeedback | None = None
        self.store: ErrorStore | None = None
        self.q_memory: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        for s in self.__slots__:
            setattr(self, s, state[s])

    @property
    def numel(self) -> int:
        """Elements of the segment."""
        return sum(self.sizes)

    def error_tensors(self) -> list[torch.Tensor]:
        """Every tensor of error state (sketch tables, dense errors, quantized codes, ...).

        The compressors of the feedback path are stateless, so everything the core's
        feedback keeps is error state.
        """
        if self.feedback is not None:
            return self.feedback.persistent_tensors()
        return self.store.persistent_tensors() if self.store is not None else []

    def compressor_tensors(self) -> list[torch.Tensor]:
        """Warm-start state of the compressor (PowerSGD's ``Q``), not counted as error."""
        return [self.q_memory] if self.q_memory is not None else []


class _Work:
    """One segment's share of a bucket during one step: the flat vector it works on in place.

    ``vec`` is a view of the bucket buffer, or (after a layout change, see the module
    notes) a gathered copy whose pieces are written back by :func:`_scatter_back`.
    """

    __slots__ = ("seg", "vec", "scatter", "bad")

    def __init__(
        self, seg: _Segment, vec: torch.Tensor, scatter: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> None:
        self.seg = seg
        self.vec = vec
        self.scatter = scatter
        self.bad = False


def _scatter_back(works: list[_Work]) -> None:
    for w in works:
        if w.scatter:
            for dst, src in w.scatter:
                dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# The state.
# ---------------------------------------------------------------------------------------------


class ConEFHookState:
    r"""Hyperparameters, per-segment error state, shared randomness and statistics of :func:`conef_hook`.

    Parameters
    ----------
    process_group:
        Group to communicate in; ``None`` is the default (world) group.
    config:
        The method (:class:`~conef_fl.config.MethodConfig`, e.g. from
        :func:`conef_fl.registry.method_config`). Supported compressors:
        :data:`SUPPORTED_COMPRESSORS`; PowerSGD supports ``feedback`` in
        :data:`POWERSGD_FEEDBACKS`.
    warmup_steps:
        Iterations run with plain (dense, buffer-dtype) all-reduce before compression
        starts (>= 0). The first iterations are the most sensitive to compression;
        ``torch``'s PowerSGD hook requires at least 2 with error feedback.
    error_reset_every:
        Error reset (the paper's ER): every this many compressed iterations the error
        stores (count-sketch tables, dense errors; linear stores only) are averaged over
        the ranks with one all-reduce each. 0 disables it.

    Notes
    -----
    The shared step seed (block positions, random-k indices, PowerSGD's first ``Q``)
    is drawn from the state's own ``torch.Generator`` (seeded from ``config.seed``),
    once per compressed iteration, identically on every rank; the global RNG is never
    used. The state pickles without its process group (``__getstate__``); after
    unpickling, ``process_group`` is ``None`` (the default group) and the state can be
    registered on a new DDP model (:func:`register_conef_hook` with ``state=``).

    Attributes
    ----------
    iter:
        Completed iterations (warm-up included).
    bytes_sent_total, bytes_dense_total:
        Bytes this rank passed to gradient collectives, and what plain DDP would have
        passed (bucket numel x element size), summed over all iterations.
    last_bytes_sent, last_bytes_dense:
        The same for the last completed iteration; ``last_bucket_bytes`` per bucket index.
    bytes_reset_total:
        Bytes passed to error-reset all-reduces (not included in ``bytes_sent_total``).
    dense_steps, compressed_steps:
        Iterations run dense (warm-up) and compressed.
    segments_created:
        Segments created so far (more than the number of segments means a layout change).
    nonfinite_segments:
        Segment steps this rank skipped because its gradient had NaN/Inf.
    """

    __slots__ = [
        "process_group",
        "config",
        "warmup_steps",
        "error_reset_every",
        "rng",
        "iter",
        "step_seed",
        "segments",
        "bytes_sent_total",
        "bytes_dense_total",
        "bytes_reset_total",
        "last_bytes_sent",
        "last_bytes_dense",
        "last_bucket_bytes",
        "dense_steps",
        "compressed_steps",
        "segments_created",
        "nonfinite_segments",
        # transient (not pickled): per-process parameter names, per-iteration accumulators
        "_names_by_id",
        "_bound_names",
        "_ddp_iter",
        "_seed_iter",
        "_used",
        "_cur_sent",
        "_cur_dense",
        "_cur_buckets",
        "_compressor",
    ]
    _TRANSIENT = frozenset(
        {
            "process_group",
            "_names_by_id",
            "_bound_names",
            "_ddp_iter",
            "_seed_iter",
            "_used",
            "_cur_sent",
            "_cur_dense",
            "_cur_buckets",
            "_compressor",
        }
    )

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        config: MethodConfig | None = None,
        *,
        warmup_steps: int = 2,
        error_reset_every: int = 0,
    ) -> None:
        config = config if config is not None else method_config("conef-cs")
        _validate(config, warmup_steps, error_reset_every)
        self.process_group = process_group
        self.config = config
        self.warmup_steps = warmup_steps
        self.error_reset_every = error_reset_every
        self.rng = make_generator(derive_seed(config.seed, "ddp-hook"))
        self.iter = 0
        self.step_seed = 0
        self.segments: dict[tuple[str, ...], _Segment] = {}
        self.bytes_sent_total = 0
        self.bytes_dense_total = 0
        self.bytes_reset_total = 0
        self.last_bytes_sent = 0
        self.last_bytes_dense = 0
        self.last_bucket_bytes: dict[int, tuple[int, int]] = {}
        self.dense_steps = 0
        self.compressed_steps = 0
        self.segments_created = 0
        self.nonfinite_segments = 0
        self._reset_transient()
        logger.info(
            "ConEF hook: %s (warmup_steps=%d, error_reset_every=%d)", config, warmup_steps, error_reset_every
        )

    @classmethod
    def from_method(
        cls,
        method: str | MethodConfig = "conef-cs",
        process_group: dist.ProcessGroup | None = None,
        *,
        warmup_steps: int = 2,
        error_reset_every: int = 0,
        **overrides: Any,
    ) -> ConEFHookState:
        """A state for registry method ``method`` (see :func:`conef_fl.registry.available_methods`).

        ``method`` may also be a :class:`~conef_fl.config.MethodConfig` (``overrides`` are then
        applied with ``config.replace``); registry names fix some fields (e.g. ``conef-cs`` fixes
        the count sketch), a config fixes nothing.
        """
        if isinstance(method, MethodConfig):
            config = method.replace(**overrides) if overrides else method
        elif isinstance(method, str):
            config = method_config(method, **overrides)
        else:
            raise ValueError(f"method must be a registry name or a MethodConfig, got {type(method).__name__}")
        return cls(process_group, config, warmup_steps=warmup_steps, error_reset_every=error_reset_every)

    def _reset_transient(self) -> None:
        self._names_by_id: dict[int, str] = {}
        self._bound_names = False
        self._ddp_iter = 0
        self._seed_iter = -1
        self._used: set[tuple[str, ...]] = set()
        self._cur_sent = 0
        self._cur_dense = 0
        self._cur_buckets: dict[int, tuple[int, int]] = {}
        self._compressor = make_compressor_for(self.config) if self.config.compressor != "powersgd" else None

    # -- pickling -------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group and per-process bookkeeping (picklable, checkpointable)."""
        logger.info("ConEFHookState: the process group is not pickled; it is the default group after loading")
        state = {s: getattr(self, s) for s in self.__slots__ if s not in self._TRANSIENT}
        state["_version"] = _STATE_VERSION
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`__getstate__`; ``process_group`` becomes ``None`` (the default group)."""
        version = state.get("_version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"ConEFHookState version={version!r} is not supported; allowed: {_STATE_VERSION}"
            )
        expected = [s for s in self.__slots__ if s not in self._TRANSIENT]
        missing = [s for s in expected if s not in state]
        if missing:
            raise ValueError(f"ConEFHookState state is missing {missing}")
        if not isinstance(state["config"], MethodConfig):
            raise ValueError(
                f"ConEFHookState config must be a MethodConfig, got {type(state['config']).__name__}"
            )
        for s in expected:
            setattr(self, s, state[s])
        self.process_group = None
        self._reset_transient()

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable dict (what ``pickle`` saves; tensors included)."""
        return self.__getstate__()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` of a state with the same ``config``; keeps this state's process group.

        Raises
        ------
        ValueError
            If the saved config differs from this state's config, or the dict is malformed.
        """
        if state.get("config") != self.config:
            raise ValueError(f"state_dict has config {state.get('config')}, expected {self.config}")
        group = self.process_group
        self.__setstate__(state)
        self.process_group = group

    # -- binding --------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> ConEFHookState:
        """Use ``model``'s parameter names as segment keys (a DDP model or its module).

        Without it, parameters are named ``param0, param1, ...`` in the order the hook first
        sees them, which is also deterministic for a given model (DDP's initial layout).
        Also marks the start of a new DDP model (its buckets are not rebuilt yet).
        """
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if not isinstance(module, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self._names_by_id = {id(p): name for name, p in module.named_parameters()}
        self._bound_names = True
        self._ddp_iter = 0
        return self

    def _name(self, param: torch.Tensor) -> str:
        name = self._names_by_id.get(id(param))
        if name is None:
            if self._bound_names:
                raise ValueError(
                    "a bucket holds a parameter that is not in the bound model; call bind(model)"
                )
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

    def error_tensors(self) -> list[torch.Tensor]:
        """Every tensor of error state kept between steps."""
        return [t for s in self.segments.values() for t in s.error_tensors()]

    def error_state_bytes(self) -> int:
        """Bytes of error state kept between steps (measured storage, :func:`persistent_bytes`)."""
        return persistent_bytes(self.error_tensors())

    def compressor_state_bytes(self) -> int:
        """Bytes of compressor state kept between steps (PowerSGD's warm-start ``Q``)."""
        return persistent_bytes([t for s in self.segments.values() for t in s.compressor_tensors()])

    def num_elements(self) -> int:
        """Elements covered by the segments (the model's gradient size once compression has run)."""
        return sum(s.numel for s in self.segments.values())

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-able dict (see the class attributes)."""
        total_ratio = self.bytes_sent_total / self.bytes_dense_total if self.bytes_dense_total else None
        last_ratio = self.last_bytes_sent / self.last_bytes_dense if self.last_bytes_dense else None
        return {
            "iter": self.iter,
            "dense_steps": self.dense_steps,
            "compressed_steps": self.compressed_steps,
            "bytes_sent_total": self.bytes_sent_total,
            "bytes_dense_total": self.bytes_dense_total,
            "bytes_ratio_total": total_ratio,
            "last_bytes_sent": self.last_bytes_sent,
            "last_bytes_dense": self.last_bytes_dense,
            "last_bytes_ratio": last_ratio,
            "bytes_reset_total": self.bytes_reset_total,
            "error_state_bytes": self.error_state_bytes(),
            "compressor_state_bytes": self.compressor_state_bytes(),
            "segments": len(self.segments),
            "segments_created": self.segments_created,
            "nonfinite_segments": self.nonfinite_segments,
        }

    def _count(self, index: int, sent: int, dense: int) -> None:
        self._cur_sent += sent
        self._cur_dense += dense
        s0, d0 = self._cur_buckets.get(index, (0, 0))
        self._cur_buckets[index] = (s0 + sent, d0 + dense)

    def _end_bucket(self, bucket: dist.GradBucket, compressed: bool) -> None:
        if not bucket.is_last():
            return
        self.last_bytes_sent, self.last_bytes_dense = self._cur_sent, self._cur_dense
        self.last_bucket_bytes = dict(self._cur_buckets)
        self.bytes_sent_total += self._cur_sent
        self.bytes_dense_total += self._cur_dense
        self._cur_sent = self._cur_dense = 0
        self._cur_buckets = {}
        if compressed:
            self.compressed_steps += 1
            stale = [k for k in self.segments if k not in self._used]
            for k in stale:
                logger.info("ConEF hook: dropping the error state of %s (no longer a bucket layout)", k)
                del self.segments[k]
            self._used = set()
        else:
            self.dense_steps += 1
        self.iter += 1
        self._ddp_iter += 1
        if self.iter == self.warmup_steps and self.warmup_steps > 0:
            logger.info("ConEF hook: compression starts after %d warm-up iterations", self.iter)

    def _seed(self) -> int:
        if self._seed_iter != self.iter:
            self.step_seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=self.rng).item())
            self._seed_iter = self.iter
        return self.step_seed

    # -- segments -------------------------------------------------------------------------------
    def _new_segment(
        self,
        key: str,
        names: tuple[str, ...],
        sizes: tuple[int, ...],
        shape: tuple[int, ...],
        device: torch.device,
    ) -> _Segment:
        seg = _Segment(key, names, sizes, shape)
        cfg = self.config
        numel = sum(sizes)
        if cfg.compressor == "powersgd":
            if cfg.feedback == "efsgd":
                seg.store = DenseError(numel, device=device)
            elif cfg.feedback == "conef":
                seg.store = make_error_store(cfg, numel, key, device)
        else:
            seg.feedback = make_feedback(cfg, (numel,), key, compressor=self._compressor, device=device)
        self.segments_created += 1
        return seg

    def _plan(self, bucket: dist.GradBucket, buffer: torch.Tensor) -> list[_Work]:
        """The segments of ``bucket`` and the flat vectors they work on (created or re-created as needed)."""
        params = bucket.parameters()
        grads = bucket.gradients()
        names = tuple(self._name(p) for p in params)
        base = buffer.data_ptr()
        size = buffer.element_size()
        pieces: dict[str, torch.Tensor] = {}
        for name, g in zip(names, grads, strict=True):
            offset = (g.data_ptr() - base) // size
            pieces[name] = buffer.narrow(0, offset, g.numel())
        device = buffer.device
        if self.config.layerwise:
            works = []
            for name, g in zip(names, grads, strict=True):
                key = (name,)
                seg = self.segments.get(key)
                shape = tuple(int(s) for s in g.shape)
                if seg is None or seg.shape != shape:
                    if seg is not None:
                        logger.warning(
                            "ConEF hook: %s changed shape %s -> %s; new error state", name, seg.shape, shape
                        )
                    seg = self.segments[key] = self._new_segment(name, key, (g.numel(),), shape, device)
                self._used.add(key)
                works.append(_Work(seg, pieces[name]))
            return works
        layout = names
        sizes = tuple(int(g.numel()) for g in grads)
        seg = self.segments.get(layout)
        if seg is not None and seg.sizes == sizes:
            self._used.add(layout)
            return [_Work(seg, buffer)]
        if self._ddp_iter == 0:
            cover = self._cover(layout, pieces)
            if cover is not None:
                return cover
        stale = [k for k in self.segments if set(k) & set(layout)]
        if stale:
            logger.info(
                "ConEF hook: bucket %d has a new layout (%d parameters, %d elements); new error state",
                bucket.index(),
                len(layout),
                buffer.numel(),
            )
            for k in stale:
                del self.segments[k]
        numel = buffer.numel()
        seg = self.segments[layout] = self._new_segment(
            f"bucket{bucket.index()}", layout, sizes, (numel,), device
        )
        self._used.add(layout)
        return [_Work(seg, buffer)]

    def _cover(self, layout: tuple[str, ...], pieces: Mapping[str, torch.Tensor]) -> list[_Work] | None:
        """Saved flat segments that exactly partition this bucket's parameters (gathered copies), or None."""
        owner = {n: k for k in self.segments for n in k}
        keys: list[tuple[str, ...]] = []
        for name in layout:
            k = owner.get(name)
            if k is None:
                return None
            if k not in keys:
                keys.append(k)
        names = set(layout)
        if any(not set(k) <= names for k in keys):
            return None
        works = []
        for k in keys:
            seg = self.segments[k]
            if any(pieces[n].numel() != s for n, s in zip(seg.names, seg.sizes, strict=True)):
                return None
            first = pieces[seg.names[0]]
            scratch = torch.empty(seg.numel, dtype=first.dtype, device=first.device)
            scatter = []
            off = 0
            for n, s in zip(seg.names, seg.sizes, strict=True):
                scratch[off : off + s].copy_(pieces[n])
                scatter.append((pieces[n], scratch[off : off + s]))
                off += s
            self._used.add(k)
            works.append(_Work(seg, scratch, scatter))
        logger.info("ConEF hook: new DDP layout; running %d saved segment(s) on gathered copies", len(works))
        return works


def _validate(config: MethodConfig, warmup_steps: int, error_reset_every: int) -> None:
    if not isinstance(config, MethodConfig):
        raise ValueError(f"config must be a MethodConfig, got {type(config).__name__}")
    _check_count("warmup_steps", warmup_steps)
    _check_count("error_reset_every", error_reset_every)
    if config.compressor not in SUPPORTED_COMPRESSORS:
        raise ValueError(
            f"compressor={config.compressor!r} is not supported by the DDP hook; "
            f"allowed: {', '.join(SUPPORTED_COMPRESSORS)}"
        )
    if config.compressor == "powersgd" and config.feedback not in POWERSGD_FEEDBACKS:
        raise ValueError(
            f"feedback={config.feedback!r} is not supported with compressor='powersgd'; "
            f"allowed: {', '.join(POWERSGD_FEEDBACKS)}"
        )
    if error_reset_every:
        linear = config.feedback == "efsgd" or (
            config.feedback == "conef" and config.error_compressor in ("count-sketch", "identity")
        )
        if not linear:
            raise ValueError(
                f"error_reset_every={error_reset_every} needs a linear error store; got feedback="
                f"{config.feedback!r}, error_compressor={config.error_compressor!r}; "
                "allowed: feedback 'efsgd', "
                "or 'conef' with error_compressor 'count-sketch' or 'identity' (or error_reset_every=0)"
            )


# ---------------------------------------------------------------------------------------------
# The hook.
# ---------------------------------------------------------------------------------------------


def conef_hook(state: ConEFHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress each bucket's gradient with error feedback, average, decompress.

    Register with ``ddp_model.register_comm_hook(state, conef_hook)`` (or
    :func:`register_conef_hook`). The returned future holds the bucket buffer, overwritten
    with the average over ranks of the decompressed updates ``mean_i Δ_i``.

    Parameters
    ----------
    state:
        The :class:`ConEFHookState` (config, error state, statistics).
    bucket:
        DDP's gradient bucket (``bucket.buffer()`` is its flat gradient).

    Returns
    -------
    torch.futures.Future[torch.Tensor]
        Completes when the averaged update is in ``bucket.buffer()``.
    """
    with torch.no_grad():
        buffer = bucket.buffer()
        group = state.group()
        world = group.size()
        cfg = state.config
        dense_bytes = buffer.numel() * buffer.element_size()
        if state.iter < state.warmup_steps:
            fut = _allreduce_dense(buffer, buffer.dtype, group, world)
            state._count(bucket.index(), dense_bytes, dense_bytes)
            state._end_bucket(bucket, compressed=False)
            return fut
        if cfg.compressor == "identity" and cfg.feedback == "none":
            wire = wire_value_dtype(cfg.value_dtype)
            fut = _allreduce_dense(buffer, wire, group, world)
            state._count(
                bucket.index(), buffer.numel() * torch.empty((), dtype=wire).element_size(), dense_bytes
            )
            state._end_bucket(bucket, compressed=True)
            return fut
        seed = state._seed()
        works = state._plan(bucket, buffer)
        if cfg.compressor == "powersgd":
            fut, sent = _powersgd_step(state, works, seed, group, world)
        elif cfg.compressor in GATHER_COMPRESSORS:
            fut, sent = _gather_step(state, works, seed, group, world)
        else:
            fut, sent = _allreduce_step(state, works, seed, group, world)
        state._count(bucket.index(), sent, dense_bytes)
        if state.error_reset_every and (state.compressed_steps + 1) % state.error_reset_every == 0:
            fut = _error_reset(state, works, group, world, fut)
        state._end_bucket(bucket, compressed=True)

        def finish(f: torch.futures.Future[Any]) -> torch.Tensor:
            value = f.value()  # re-raises errors of the chain
            if isinstance(value, list):  # collect_all (error reset): surface the sub-futures' errors
                for sub in value:
                    if isinstance(sub, torch.futures.Future):
                        sub.value()
            _scatter_back(works)
            return buffer

        return fut.then(finish)


# DDP compares the annotations with the real objects, and ``from __future__ import annotations``
# made them strings.
conef_hook.__annotations__ = {
    "state": ConEFHookState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _allreduce_dense(
    buffer: torch.Tensor, wire: torch.dtype, group: dist.ProcessGroup, world: int
) -> torch.futures.Future[torch.Tensor]:
    """Plain averaging all-reduce of the whole bucket (in ``wire`` dtype, divided before the sum)."""
    if wire == buffer.dtype:
        buffer.div_(world)
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    comm = buffer.to(wire).div_(world)
    fut = dist.all_reduce(comm, group=group, async_op=True).get_future()

    def decompress(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        buffer.copy_(f.value()[0])
        return buffer

    return fut.then(decompress)


def _payload_or_poison(state: ConEFHookState, w: _Work, seed: int) -> Payload:
    """The core's error-feedback step on ``w.vec``; on NaN/Inf a same-shaped NaN payload (error untouched)."""
    fb = w.seg.feedback
    assert fb is not None
    try:
        return fb.step(w.vec, seed=seed, consume=True)
    except NonFiniteError:
        w.bad = True
        state.nonfinite_segments += 1
        logger.warning("ConEF hook: gradient of %s has NaN/Inf; sending NaN, error left untouched", w.seg.key)
        clean = torch.zeros(w.vec.numel(), dtype=torch.float32, device=w.vec.device)
        payload = fb.compressor.compress(clean.view(fb.shape), seed=seed, key=fb.key)
        for arr in payload.arrays.values():
            if arr.is_floating_point():
                arr.fill_(float("nan"))
        return payload


def _allreduce_step(
    state: ConEFHookState, works: list[_Work], seed: int, group: dist.ProcessGroup, world: int
) -> tuple[torch.futures.Future[Any], int]:
    """Selective compressors: one all-reduce of every segment's ``k`` values."""
    payloads = [_payload_or_poison(state, w, seed) for w in works]
    values = [p.arrays["values"] for p in payloads]
    if len(values) == 1:
        comm = values[0]
        if comm.data_ptr() == works[0].vec.data_ptr():  # never all-reduce the bucket buffer in place
            comm = comm.clone()
    else:
        comm = torch.cat([v.reshape(-1) for v in values])
    comm.div_(world)
    sent = comm.numel() * comm.element_size()
    fut = dist.all_reduce(comm, group=group, async_op=True).get_future()

    def decompress(f: torch.futures.Future[list[torch.Tensor]]) -> None:
        avg = f.value()[0]
        off = 0
        for w, p, v in zip(works, payloads, values, strict=True):
            n = v.numel()
            w.vec.zero_()
            averaged = Payload(p.kind, p.shape, {"values": avg[off : off + n]}, p.meta)
            w.seg.feedback.compressor.decompress_add_(averaged, w.vec)  # type: ignore[union-attr]
            off += n

    return fut.then(decompress), sent


def _gather_step(
    state: ConEFHookState, works: list[_Work], seed: int, group: dist.ProcessGroup, world: int
) -> tuple[torch.futures.Future[Any], int]:
    """Top-k / scaled sign: one all-gather of every rank's payload bytes, then the mean of decompressions."""
    payloads = [_payload_or_poison(state, w, seed) for w in works]
    layout: list[list[tuple[str, torch.dtype, torch.Size, int]]] = []
    parts = []
    for p in payloads:
        entries = []
        for name in sorted(p.arrays):
            arr = p.arrays[name].contiguous()
            nbytes = arr.numel() * arr.element_size()
            entries.append((name, arr.dtype, arr.shape, nbytes))
            parts.append(arr.reshape(-1).view(torch.uint8))
        layout.append(entries)
    blob = torch.cat(parts)
    sent = blob.numel()
    gathered = [torch.empty_like(blob) for _ in range(world)]
    fut = dist.all_gather(gathered, blob, group=group, async_op=True).get_future()

    def decompress(f: torch.futures.Future[Any]) -> None:
        f.value()
        for w in works:
            w.vec.zero_()
        for blob_r in gathered:
            off = 0
            for w, p, entries in zip(works, payloads, layout, strict=True):
                arrays = {}
                for name, dtype, shape, nbytes in entries:
                    arrays[name] = blob_r[off : off + nbytes].clone().view(dtype).view(shape)
                    off += nbytes
                received = Payload(p.kind, p.shape, arrays, p.meta)
                w.seg.feedback.compressor.decompress_add_(received, w.vec, alpha=1.0 / world)  # type: ignore[union-attr]

    return fut.then(decompress), sent


# -- PowerSGD -------------------------------------------------------------------------------------


class _Matrix:
    """A segment compressed by PowerSGD during one step: its ``n x m`` view and factors."""

    __slots__ = ("work", "n", "m", "r", "mat", "is_view", "p", "p_slice", "q_slice")

    def __init__(self, work: _Work, n: int, m: int, r: int) -> None:
        self.work = work
        self.n, self.m, self.r = n, m, r
        vec = work.vec
        self.is_view = n * m == vec.numel() and vec.dtype == torch.float32
        if self.is_view:
            self.mat = vec.view(n, m)
        else:  # zero-padded float32 copy (flat segments whose size is not n*m, or low-precision buffers)
            self.mat = torch.zeros(n * m, dtype=torch.float32, device=vec.device)
            self.mat[: vec.numel()].copy_(vec)
            self.mat = self.mat.view(n, m)
        self.p: torch.Tensor | None = None
        self.p_slice = (0, 0)
        self.q_slice = (0, 0)

    def write_back(self) -> None:
        if not self.is_view:
            vec = self.work.vec
            vec.copy_(self.mat.view(-1)[: vec.numel()])


def _matrix_shape(seg: _Segment, rank: int, layerwise: bool) -> tuple[int, int, int] | None:
    """``(n, m, r)`` if PowerSGD compresses this segment, else None (sent dense).

    Layer-wise: parameters with ``ndim >= 2`` (viewed as ``shape[0] x rest``), as torch's hook;
    vectors (biases, norm weights) go dense. Flat: the near-square view of the whole bucket.
    Dense whenever the factors would not be smaller than the segment (:func:`uses_dense`).
    """
    if layerwise and len(seg.shape) < 2:
        return None
    if uses_dense(seg.shape, rank):
        return None
    n, m = matrix_view_shape(seg.shape)
    return n, m, min(rank, n, m)


def _feedback_coeff(cfg: MethodConfig) -> tuple[float, float]:
    """``(1 − β, β)`` of the error rule: EFSGD is β = 0 with a dense store."""
    if cfg.feedback == "conef":
        return 1.0 - cfg.beta, cfg.beta
    return 1.0, 0.0


def _feedback_out(store: ErrorStore, residual: torch.Tensor, fb: float, beta: float) -> None:
    """Update the error from ``residual = p − Δ_i`` (``p = u + fb·ê``), exactly as ``ConEF._step_general``.

    Linear stores get the mass-conserving ``S ← S + C(u − Δ)``; others ``state ← C(ê + u − Δ)``.
    ``residual`` is overwritten.
    """
    if store.linear:
        if store.subtract_estimate_feedback_(fb):
            store.accumulate_(residual)
        else:
            store.estimate_add_(residual, alpha=-fb)
            store.accumulate_(residual)
    else:
        store.estimate_add_(residual, alpha=beta)
        store.assign_(residual)


def _orthonormal(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(p, mode="reduced").Q


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in ``x``: one fast reduction (NaN and Inf propagate into the sum), exact check if not.

    ``vector_norm(x, inf)`` and ``isfinite(x).all()`` cost 30-50 times a sum on this CPU.
    """
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())  # the sum may have overflowed with finite entries


def _mark_bad(state: ConEFHookState, w: _Work) -> None:
    if not w.bad:
        w.bad = True
        state.nonfinite_segments += 1
        logger.warning("ConEF hook: gradient of %s has NaN/Inf; sending NaN, error left untouched", w.seg.key)


def _powersgd_step(
    state: ConEFHookState, works: list[_Work], seed: int, group: dist.ProcessGroup, world: int
) -> tuple[torch.futures.Future[Any], int]:
    """PowerSGD with error feedback: all-reduce ``P`` (+ dense segments), orthogonalize, all-reduce ``Q``.

    The worker's own ``Δ_i = P Q_iᵀ`` (``P`` shared after the first all-reduce) defines its
    error ``p − Δ_i = (I − P Pᵀ) p``; the bucket receives ``P mean_i(Q_i)ᵀ``. The first
    all-reduce is waited for inside the hook so that collectives are issued in the same
    order on every rank.

    Non-finite gradients are detected on the small local factors (a NaN/Inf of ``M``
    reaches ``P = M Q`` or ``Q_i = Mᵀ P``), so no pass over the gradient is added; the error
    is updated only from finite factors.
    """
    cfg = state.config
    wire = wire_value_dtype(cfg.value_dtype)
    fb, beta = _feedback_coeff(cfg)
    device = works[0].vec.device
    mats: list[_Matrix] = []
    dense: list[tuple[_Work, tuple[int, int]]] = []
    p_len = q_len = 0
    for w in works:
        shape = _matrix_shape(w.seg, cfg.rank, cfg.layerwise)
        if shape is None:
            if not _all_finite(w.vec):  # small (vectors) or a tiny flat bucket
                _mark_bad(state, w)
            dense.append((w, (0, 0)))
        else:
            if w.seg.store is not None:
                w.seg.store.estimate_add_(w.vec, alpha=fb)  # vec := p = u + fb·ê (reads the store only)
            mat = _Matrix(w, *shape)  # its n x m view of p (a zero-padded copy if needed)
            mat.p_slice = (p_len, p_len + mat.n * mat.r)
            mat.q_slice = (q_len, q_len + mat.m * mat.r)
            p_len += mat.n * mat.r
            q_len += mat.m * mat.r
            mats.append(mat)
    d_len = sum(w.vec.numel() for w, _ in dense)
    comm1 = torch.empty(p_len + d_len, dtype=wire, device=device)
    for mat in mats:
        seg = mat.work.seg
        q = seg.q_memory
        if q is None or tuple(q.shape) != (mat.m, mat.r):
            gen = make_generator(derive_seed(seed, "powersgd-q0", seg.key))
            q = torch.randn(mat.m, mat.r, generator=gen).to(device)
        lo, hi = mat.p_slice
        p_local = comm1[lo:hi].view(mat.n, mat.r)
        p_local.copy_(mat.mat @ q)
        if not bool(torch.isfinite(p_local).all()):
            _mark_bad(state, mat.work)
            p_local.fill_(float("nan"))
    off = p_len
    for i, (w, _) in enumerate(dense):
        n = w.vec.numel()
        dense[i] = (w, (off, off + n))
        sl = comm1[off : off + n]
        if w.bad:
            sl.fill_(float("nan"))
        else:
            store = w.seg.store
            if store is not None:
                store.estimate_add_(w.vec, alpha=fb)  # vec := p
            sl.copy_(w.vec)
            if store is not None:
                residual = w.vec.to(torch.float32, copy=True).sub_(sl.to(torch.float32))  # p − wire(p)
                _feedback_out(store, residual, fb, beta)
        sl.div_(world)
        off += n
    sent = (comm1.numel() + q_len) * comm1.element_size()
    # First all-reduce, waited for here: the second one must be issued from this thread.
    dist.all_reduce(comm1, group=group)
    for w, (lo, hi) in dense:
        w.vec.copy_(comm1[lo:hi])
    comm2 = torch.empty(q_len, dtype=wire, device=device)
    for mat in mats:
        lo, hi = mat.p_slice
        p_sum = comm1[lo:hi].view(mat.n, mat.r).to(torch.float32)
        qlo, qhi = mat.q_slice
        q_local = comm2[qlo:qhi].view(mat.m, mat.r)
        if not bool(torch.isfinite(p_sum).all()):  # some rank sent NaN: identical decision everywhere
            mat.p = None
            q_local.fill_(float("nan"))
            continue
        mat.p = _orthonormal(p_sum)
        if mat.work.bad:
            q_local.fill_(float("nan"))
            continue
        q_local.copy_((mat.p.t() @ mat.mat).t())  # Q_i = Mᵀ P, computed the fast way round
        if not bool(torch.isfinite(q_local).all()):
            _mark_bad(state, mat.work)
            q_local.fill_(float("nan"))
            continue
        store = mat.work.seg.store
        if store is not None:
            mat.mat.addmm_(mat.p, q_local.t().to(torch.float32), alpha=-1.0)  # M := p − P Q_iᵀ
            _feedback_out(store, mat.mat.view(-1)[: mat.work.vec.numel()], fb, beta)
    comm2.div_(world)
    fut = dist.all_reduce(comm2, group=group, async_op=True).get_future()

    def decompress(f: torch.futures.Future[list[torch.Tensor]]) -> None:
        q_all = f.value()[0]
        for mat in mats:
            if mat.p is None:
                mat.work.vec.fill_(float("nan"))
                continue
            lo, hi = mat.q_slice
            q_avg = q_all[lo:hi].view(mat.m, mat.r).to(torch.float32)
            if bool(torch.isfinite(q_avg).all()):
                mat.work.seg.q_memory = q_avg.clone()  # warm start, identical on every rank
            torch.matmul(mat.p, q_avg.t(), out=mat.mat)
            mat.write_back()

    return fut.then(decompress), sent


# -- error reset ----------------------------------------------------------------------------------


def _error_reset(
    state: ConEFHookState,
    works: list[_Work],
    group: dist.ProcessGroup,
    world: int,
    fut: torch.futures.Future[Any],
) -> torch.futures.Future[Any]:
    """Average the (linear) error stores of this bucket's segments over the ranks (the paper's ER)."""
    tensors = [t for w in works for t in w.seg.error_tensors()]
    futs = [fut]
    for t in tensors:
        t.div_(world)
        futs.append(dist.all_reduce(t, group=group, async_op=True).get_future())
        state.bytes_reset_total += t.numel() * t.element_size()
    return torch.futures.collect_all(futs)


# ---------------------------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------------------------


def register_conef_hook(
    model: nn.parallel.DistributedDataParallel,
    method: str | MethodConfig = "conef-cs",
    *,
    process_group: dist.ProcessGroup | None = None,
    warmup_steps: int = 2,
    error_reset_every: int = 0,
    state: ConEFHookState | None = None,
    **overrides: Any,
) -> ConEFHookState:
    """Register :func:`conef_hook` on a DDP model in one line and return its state.

    Parameters
    ----------
    model:
        The :class:`~torch.nn.parallel.DistributedDataParallel` model.
    method:
        A registry name (``sgd``, ``efsgd``, ``conef-cs``, ``ef-powersgd``,
        ``conef-powersgd``, ``ef-topk``, ``ef-sign``, ``rbsgd``, ...) or a
        :class:`~conef_fl.config.MethodConfig`.
    process_group:
        Group to communicate in (``None``: the default group).
    warmup_steps, error_reset_every:
        See :class:`ConEFHookState`.
    state:
        A state to reuse (e.g. unpickled from a checkpoint); then ``method``,
        ``warmup_steps``, ``error_reset_every`` and ``overrides`` are ignored.
    **overrides:
        :class:`~conef_fl.config.MethodConfig` fields (``k_ratio``, ``sketch_ratio``,
        ``beta``, ``rank``, ``value_dtype``, ``layerwise``, ``seed``, ...).

    Returns
    -------
    ConEFHookState
        The registered state (statistics, error state; picklable).

    Raises
    ------
    ValueError
        If ``model`` is not a DDP model, or for an unknown method or invalid settings.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"model must be a DistributedDataParallel model, got {type(model).__name__}")
    if state is None:
        state = ConEFHookState.from_method(
            method, process_group, warmup_steps=warmup_steps, error_reset_every=error_reset_every, **overrides
        )
    else:
        if not isinstance(state, ConEFHookState):
            raise ValueError(f"state must be a ConEFHookState, got {type(state).__name__}")
        if process_group is not None:
            state.process_group = process_group
    state.bind(model)
    model.register_comm_hook(state, conef_hook)
    return state


def dense_error_bytes(model: nn.Module) -> int:
    """Bytes EFSGD (and torch's PowerSGD hook) would keep: 4 bytes per gradient element."""
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_bytes_per_step(state: ConEFHookState) -> int:
    """Bytes one compressed step sends for the current segments (for checks and reports).

    Raises
    ------
    ValueError
        Before the first compressed step (no segments yet).
    """
    if not state.segments:
        raise ValueError("the state has no segments yet: run at least one compressed step")
    cfg = state.config
    total = 0
    for seg in state.segments.values():
        if cfg.compressor == "powersgd":
            size = torch.empty((), dtype=wire_value_dtype(cfg.value_dtype)).element_size()
            shape = _matrix_shape(seg, cfg.rank, cfg.layerwise)
            total += size * (seg.numel if shape is None else (shape[0] + shape[1]) * shape[2])
        else:
            assert seg.feedback is not None
            total += seg.feedback.compressor.expected_nbytes((seg.numel,))
    return total
