"""The hook-state base: slots, shared randomness, binding, pickling, byte counters, segments.

As ``torch``'s ``PowerSGDState``, it pickles without the process group (``None``, the
default group, after loading), so a checkpoint resumes in a new process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from conef_fl.compressors.base import Payload
from conef_fl.ddp import comm
from conef_fl.ddp.segments import Segment, Work
from conef_fl.error_stores.base import NonFiniteError
from conef_fl.measure import persistent_bytes
from conef_fl.seeding import derive_seed, make_generator

__all__ = ["HookState", "check_count", "register"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 2
_SEED_HIGH = 1 << 62


def ratio(a: int, b: int) -> float | None:
    """``a / b``, or None when ``b`` is 0."""
    return a / b if b else None


def raise_first(checks: Iterable[tuple[bool, str]]) -> None:
    """``ValueError`` with the message of the first failed check."""
    for failed, message in checks:
        if failed:
            raise ValueError(message)


def check_count(name: str, value: object) -> int:
    """``value`` if it is an integer >= 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is out of range; allowed: integer >= 0")
    return value


class HookState:
    """Per-segment state, the shared step seed and the statistics of a DDP communication hook.

    The step seed is drawn once per compressed iteration from the state's own generator
    (``derive_seed(seed, "ddp-hook")``), identically on every rank; never the global RNG.

    Attributes: ``iter``, ``dense_steps``, ``compressed_steps``; per byte channel ``c``
    (``sent``: what this rank passed to gradient collectives; ``dense``: what plain DDP
    would pass) ``bytes_<c>_total`` and ``last_bytes_<c>``; ``last_bucket_bytes`` (``(sent,
    dense)`` per bucket index); ``segments`` (by parameter names), ``segments_created``;
    ``nonfinite_segments`` (segment steps this rank sent as NaN).
    """

    __slots__ = (
        "process_group", "warmup_steps", "rng", "iter", "step_seed", "segments", "segments_created",
        "dense_steps", "compressed_steps", "nonfinite_segments", "bytes_sent_total", "bytes_dense_total",
        "last_bytes_sent", "last_bytes_dense", "last_bucket_bytes",
        "names_by_id", "bound", "ddp_iter", "seed_iter", "used", "cur", "cur_buckets",
    )  # fmt: skip
    #: Not pickled: the group and per-process bookkeeping.
    _TRANSIENT: ClassVar[frozenset[str]] = frozenset(
        {"process_group", "names_by_id", "bound", "ddp_iter", "seed_iter", "used", "cur", "cur_buckets"}
    )
    _CHANNELS: ClassVar[tuple[str, ...]] = ("sent", "dense")
    #: Settings a loaded ``state_dict`` must match.
    _SETTINGS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, process_group: comm.ProcessGroup | None, seed: int, warmup_steps: int) -> None:
        self.process_group = process_group
        self.warmup_steps = check_count("warmup_steps", warmup_steps)
        self.rng = make_generator(derive_seed(seed, "ddp-hook"))
        self.iter = self.step_seed = self.segments_created = self.nonfinite_segments = 0
        self.dense_steps = self.compressed_steps = 0
        self.segments: dict[tuple[str, ...], Segment] = {}
        for c in self._CHANNELS:
            setattr(self, f"bytes_{c}_total", 0)
            setattr(self, f"last_bytes_{c}", 0)
        self.last_bucket_bytes: dict[int, tuple[int, int]] = {}
        self._reset_transient()

    def _reset_transient(self) -> None:
        self.names_by_id: dict[int, str] = {}
        self.bound, self.ddp_iter, self.seed_iter = False, 0, -1
        self.used: set[tuple[str, ...]] = set()
        self.cur: dict[str, int] = {}  # this iteration's bytes per channel, and per bucket
        self.cur_buckets: dict[int, tuple[int, int]] = {}

    def _validate(self) -> None: ...  # the settings: ValueError (subclasses)

    def _fill(self, seg: Segment, device: torch.device) -> None: ...  # a new segment's feedback (subclasses)

    @classmethod
    def _saved(cls) -> list[str]:
        return [s for k in reversed(cls.__mro__) for s in getattr(k, "__slots__", ()) if s not in cls._TRANSIENT]

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group and per-process bookkeeping."""
        return {**{s: getattr(self, s) for s in self._saved()}, "_version": _STATE_VERSION}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`__getstate__` (validated); ``process_group`` becomes ``None``."""
        name, missing = type(self).__name__, [s for s in self._saved() if s not in state]
        raise_first([
            (state.get("_version") != _STATE_VERSION,
             f"{name} version={state.get('_version')!r} is not supported; allowed: {_STATE_VERSION}"),
            (bool(missing), f"{name} state is missing {missing}"),
        ])  # fmt: skip
        for s in self._saved():
            setattr(self, s, state[s])
        self._validate()
        self.process_group = None
        self._reset_transient()

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable dict (what ``pickle`` saves; tensors included)."""
        return self.__getstate__()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` of a state with the same settings; keeps this state's process group."""
        for name in self._SETTINGS:
            if state.get(name) != getattr(self, name):
                raise ValueError(f"state_dict has {name}={state.get(name)!r}, expected {getattr(self, name)!r}")
        group = self.process_group
        self.__setstate__(state)
        self.process_group = group

    def bind(self, model: nn.Module) -> HookState:
        """Name segments after ``model``'s parameters (a DDP model or its module); a new DDP model starts.

        Unbound, parameters are named ``param0, param1, ...`` in the order the hook first sees them.
        """
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if not isinstance(module, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.names_by_id = {id(p): name for name, p in module.named_parameters()}
        self.bound = True
        self.ddp_iter = 0
        return self

    def param_name(self, param: torch.Tensor) -> str:
        """The bound name of ``param`` (``ValueError`` if bound and unknown)."""
        name = self.names_by_id.get(id(param))
        if name is None:
            if self.bound:
                raise ValueError("a bucket holds a parameter that is not in the bound model; call bind(model)")
            name = self.names_by_id[id(param)] = f"param{len(self.names_by_id)}"
        return name

    def group(self) -> comm.ProcessGroup:
        """The process group used (``process_group`` or the default group)."""
        return comm.group_of(self.process_group)

    def new_segment(
        self, key: str, names: tuple[str, ...], sizes: tuple[int, ...], shape: tuple[int, ...], device: torch.device
    ) -> Segment:
        """Create and register the segment ``names`` (the planner calls this)."""
        seg = self.segments[names] = Segment(key, names, sizes, shape)
        self._fill(seg, device)
        self.segments_created += 1
        return seg

    def _seed(self) -> int:
        if self.seed_iter != self.iter:
            self.step_seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=self.rng).item())
            self.seed_iter = self.iter
        return self.step_seed

    def _mark_bad(self, w: Work) -> None:
        if not w.bad:
            w.bad = True
            self.nonfinite_segments += 1
            logger.warning("%s: gradient of %s has NaN/Inf; sending NaN, error left untouched", self, w.seg.key)

    def _payload(self, w: Work, seed: int, consume: bool) -> Payload:
        """The core's step on ``w.vec`` (never aliasing it); on NaN/Inf a same-shaped NaN payload, error untouched."""
        fb = w.seg.feedback
        assert fb is not None
        try:
            payload = fb.step(w.vec, seed=seed, consume=consume)
        except NonFiniteError:
            self._mark_bad(w)
            payload = fb.compressor.compress(torch.zeros(fb.shape, device=w.vec.device), seed=seed, key=fb.key)
            for arr in payload.arrays.values():
                if arr.is_floating_point():
                    arr.fill_(float("nan"))
            return payload
        ptr = w.vec.untyped_storage().data_ptr()
        arrays = {k: a.clone() if a.untyped_storage().data_ptr() == ptr else a for k, a in payload.arrays.items()}
        return Payload(payload.kind, payload.shape, arrays, payload.meta)

    def _count(self, index: int, **nbytes: int) -> None:
        for c, n in nbytes.items():
            self.cur[c] = self.cur.get(c, 0) + n
        s0, d0 = self.cur_buckets.get(index, (0, 0))
        self.cur_buckets[index] = (s0 + nbytes.get("sent", 0), d0 + nbytes.get("dense", 0))

    def _end_bucket(self, bucket: comm.GradBucket, compressed: bool) -> bool:
        """Close the iteration after its last bucket (counters, stale segments); returns whether it did."""
        if not bucket.is_last():
            return False
        for c in self._CHANNELS:
            n = self.cur.get(c, 0)
            setattr(self, f"last_bytes_{c}", n)
            setattr(self, f"bytes_{c}_total", getattr(self, f"bytes_{c}_total") + n)
        self.last_bucket_bytes, self.cur, self.cur_buckets = self.cur_buckets, {}, {}
        if compressed:
            self.compressed_steps += 1
            for k in [k for k in self.segments if k not in self.used]:
                logger.info("%s: dropping the state of %s (no longer a bucket layout)", self, k)
                del self.segments[k]
            self.used = set()
        else:
            self.dense_steps += 1
        self.iter += 1
        self.ddp_iter += 1
        if self.iter == self.warmup_steps > 0:
            logger.info("%s: compression starts after %d warm-up iterations", self, self.iter)
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(iter={self.iter}, segments={len(self.segments)})"

    def error_tensors(self) -> list[torch.Tensor]:
        """Every tensor of error state kept between steps."""
        return [t for s in self.segments.values() for t in s.worker_tensors() + s.server_tensors()]

    def error_state_bytes(self) -> int:
        """Bytes of error state kept between steps (measured storage, :func:`persistent_bytes`)."""
        return persistent_bytes(self.error_tensors())

    def compressor_state_bytes(self) -> int:
        """Bytes of compressor state kept between steps (PowerSGD's warm-start ``Q``)."""
        return persistent_bytes([s.q for s in self.segments.values() if s.q is not None])

    def num_elements(self) -> int:
        """Elements covered by the segments."""
        return sum(s.numel for s in self.segments.values())

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-able dict (see the attributes)."""
        out: dict[str, Any] = {
            "iter": self.iter,
            "dense_steps": self.dense_steps,
            "compressed_steps": self.compressed_steps,
            "error_state_bytes": self.error_state_bytes(),
            "compressor_state_bytes": self.compressor_state_bytes(),
            "segments": len(self.segments),
            "segments_created": self.segments_created,
            "nonfinite_segments": self.nonfinite_segments,
        }
        for c in self._CHANNELS:
            total, last = getattr(self, f"bytes_{c}_total"), getattr(self, f"last_bytes_{c}")
            out[f"bytes_{c}_total"], out[f"last_bytes_{c}"] = total, last
            if c != "dense":
                tag = "" if c == "sent" else f"{c}_"
                out[f"bytes_{tag}ratio_total"] = ratio(total, self.bytes_dense_total)
                out[f"last_bytes_{tag}ratio"] = ratio(last, self.last_bytes_dense)
        return out


def register(
    model: nn.parallel.DistributedDataParallel,
    state: HookState,
    cls: type[HookState],
    hook: Any,
    process_group: comm.ProcessGroup | None,
) -> Any:
    """Bind ``state`` (a ``cls``) to the DDP ``model`` and register ``hook`` with it."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"model must be a DistributedDataParallel model, got {type(model).__name__}")
    if not isinstance(state, cls):
        raise ValueError(f"state must be a {cls.__name__}, got {type(state).__name__}")
    if process_group is not None:
        state.process_group = process_group
    state.bind(model)
    model.register_comm_hook(state, hook)
    return state
