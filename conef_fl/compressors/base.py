"""Gradient (update) compressors ``Q``: the common interface and the wire payload.

A compressor is pure maths on tensors: it never talks to a network. ``compress``
returns a :class:`Payload` holding exactly the arrays that would go on the wire,
in their wire dtypes (int32 indices, fp16/fp32 values, uint8 packed bits), plus
metadata the receiver already knows or that travels as a config scalar (seed,
shape, ``k``). ``Payload.nbytes`` is the exact sum of the wire arrays' bytes.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from conef_fl.seeding import derive_seed, make_generator

MetaValue = int | float | str | bool

#: Indices per chunk of the per-index work of a :class:`Selection` (bounds its temporaries).
SELECTION_CHUNK = 1 << 12

_WIRE_VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_value_dtype(name: str) -> torch.dtype:
    """Map a value dtype name (``float32``, ``float16``, ``bfloat16``) to a torch dtype."""
    try:
        return _WIRE_VALUE_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"value_dtype={name!r} is not supported; allowed: {sorted(_WIRE_VALUE_DTYPES)}"
        ) from None


@dataclass(frozen=True)
class Payload:
    """What one worker sends for one tensor.

    Attributes
    ----------
    kind:
        Registry name of the compressor that produced it.
    shape:
        Shape of the original (uncompressed) tensor.
    arrays:
        The wire arrays, in their wire dtypes. Everything that differs between
        workers (values, indices, scales, norms, packed bits) lives here.
    meta:
        Scalars the receiver already knows or that travel as config values
        (the shared seed, ``k``, the number of levels, ...).
    """

    kind: str
    shape: tuple[int, ...]
    arrays: Mapping[str, torch.Tensor]
    meta: Mapping[str, MetaValue] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the wire arrays (the uplink cost of this payload)."""
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes a dense float32 tensor of the same shape would take."""
        return 4 * self.numel

    def to(self, device: torch.device | str) -> Payload:
        """Return a copy with all arrays moved to ``device``."""
        return Payload(
            self.kind, self.shape, {k: v.to(device) for k, v in self.arrays.items()}, dict(self.meta)
        )


class Compressor(ABC):
    """A gradient/update compressor ``Q``.

    Subclasses set the class attributes below and implement ``compress`` and
    ``decompress``. Shared randomness (random-k, random-block-k, rbSGD) comes
    from the explicit ``seed`` argument, never from the global RNG; private
    randomness (stochastic rounding in QSGD, ATOMO sampling) comes from the
    ``generator`` given to the constructor.
    """

    name: ClassVar[str] = ""
    #: Payloads of different workers with the same seed can be averaged without decompressing.
    all_reducible: ClassVar[bool] = False
    #: E[decompress(compress(x))] == x.
    unbiased: ClassVar[bool] = False
    #: ||Q(x) - x||^2 <= delta ||x||^2 with delta < 1 (deterministically or in expectation).
    contractive: ClassVar[bool] = False
    #: The compressor keeps state across calls (PowerSGD's warm start); keyed by ``key``.
    stateful: ClassVar[bool] = False

    @abstractmethod
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """Compress ``x`` (any shape, floating dtype). ``x`` is not modified."""

    @abstractmethod
    def decompress(self, payload: Payload) -> torch.Tensor:
        """Return the dense float32 reconstruction ``Q(x)`` with ``payload.shape``."""

    def decompress_add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha * decompress(payload)`` in place; sparse payloads avoid a dense temporary.

        ``target`` may be a flat view of the same number of elements.
        """
        target.view(-1).add_(self.decompress(payload).view(-1).to(target.dtype), alpha=alpha)
        return target

    def norm_sq(self, payload: Payload) -> float:
        """``||decompress(payload)||²`` in float64 (one dense float32 tensor, squared in bounded float64 chunks)."""
        dense = self.decompress(payload).reshape(-1)
        step = SELECTION_CHUNK << 4
        return math.fsum(float(torch.linalg.vector_norm(dense[i : i + step], dtype=torch.float64)) ** 2
                         for i in range(0, dense.numel(), step))

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """Weighted average of payloads **in compressed space** (all-reducible compressors only).

        Raises
        ------
        NotImplementedError
            If the compressor is not all-reducible.
        """
        raise NotImplementedError(f"compressor {self.name!r} is not all-reducible")

    def sum_into_(self, acc: Payload | None, payload: Payload, weight: float) -> Payload:
        """Running weighted sum **in compressed space**: ``acc + weight · payload`` (all-reducible Q only).

        ``acc=None`` starts a sum (float32 arrays owned by the sum); later calls add
        ``payload`` into ``acc``'s arrays in place and return ``acc``. Memory: one
        payload's worth of float32, whatever the number of payloads (streaming aggregation).

        Raises
        ------
        NotImplementedError
            If the compressor is not all-reducible.
        ValueError
            If ``payload`` cannot be added to ``acc`` (kind, shape or metadata differ).
        """
        raise NotImplementedError(f"compressor {self.name!r} is not all-reducible")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Persistent per-key state (empty for stateless compressors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"compressor {self.name!r} is stateless but got state keys {sorted(state)}")

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact payload bytes for a tensor of ``shape`` (used to validate replies)."""
        return self.compress(torch.zeros(shape), seed=0, key="__probe__").nbytes

    def payload_structure(self, shape: tuple[int, ...], *, seed: int = 0, key: str = "") -> Payload:
        """A payload with the kind, array dtypes and shapes and metadata that ``compress`` gives for ``shape``.

        Only its structure is meant (receivers validate replies against it). Default: the
        compression of zeros, given as a stride-0 view of one scalar (no input of the tensor's
        size; compressors never write into their input).
        """
        return self.compress(torch.zeros((), dtype=torch.float32).expand(shape), seed=seed, key=key)


def flat_target(payload: Payload, target: torch.Tensor) -> torch.Tensor:
    """``target`` as a flat view, after checking it has the payload's number of elements (``ValueError``)."""
    if target.numel() != payload.numel:
        raise ValueError(f"target has {target.numel()} elements, payload shape {payload.shape}")
    return target.view(-1)


class DecompressByAdding:
    """Mixin: ``decompress`` is ``decompress_add_`` into zeros (for Q whose add path is the kernel)."""

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense float32 reconstruction: ``decompress_add_`` into a new zero tensor on the payload's device."""
        device = next(iter(payload.arrays.values())).device
        out = torch.zeros(payload.numel, dtype=torch.float32, device=device)
        self.decompress_add_(payload, out)  # type: ignore[attr-defined]
        return out.view(payload.shape)


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Return ``weights / sum(weights)``; raise ``ValueError`` if empty, negative or all zero."""
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("weights must not be empty")
    if any((not math.isfinite(x)) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {w}")
    return [x / total for x in w]


@dataclass(frozen=True)
class Selection:
    """A seed-determined set of coordinates of a flat tensor.

    Either a contiguous block ``[start, start + k)`` that wraps around the end
    (``indices is None``), or an explicit index tensor (sorted, no repeats).
    """

    numel: int
    k: int
    start: int = 0
    indices: torch.Tensor | None = None

    def index_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The selected indices as an int64 tensor of length ``k``."""
        if self.indices is not None:
            return self.indices.to(device=device, dtype=torch.int64)
        idx = torch.arange(self.start, self.start + self.k, device=device, dtype=torch.int64)
        return idx.remainder_(self.numel)

    def slices(self) -> list[tuple[int, int]]:
        """For a block selection: the one or two ``(lo, hi)`` slices it covers."""
        if self.indices is not None:
            raise ValueError("slices() is only defined for block selections")
        end = self.start + self.k
        if end <= self.numel:
            return [(self.start, end)]
        return [(self.start, self.numel), (0, end - self.numel)]

    def index_chunks(self, device: torch.device | str) -> Iterator[tuple[int, torch.Tensor]]:
        """For an index selection: ``(offset, indices)`` in chunks of :data:`SELECTION_CHUNK` (int32 or int64).

        Chunks bound the temporaries of per-index work to a fixed size.
        """
        if self.indices is None:
            raise ValueError("index_chunks() is only defined for index selections")
        for off in range(0, self.k, SELECTION_CHUNK):
            yield off, self.indices[off : off + SELECTION_CHUNK].to(device)

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """Values of ``flat`` at the selection (a new tensor of ``k`` elements)."""
        if self.indices is None:
            parts = [flat[lo:hi] for lo, hi in self.slices()]
            return parts[0].clone() if len(parts) == 1 else torch.cat(parts)
        return flat.index_select(0, self.indices.to(flat.device))

    def scatter_(self, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``flat[selection] = values`` in place."""
        if self.indices is None:
            off = 0
            for lo, hi in self.slices():
                flat[lo:hi].copy_(values[off : off + hi - lo])
                off += hi - lo
            return flat
        for off, idx in self.index_chunks(flat.device):
            flat[idx] = values[off : off + idx.numel()].to(flat.dtype)
        return flat

    def add_(self, flat: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``flat[selection] += alpha * values`` in place (chunked: no k-sized temporary)."""
        if self.indices is None:
            off = 0
            for lo, hi in self.slices():
                flat[lo:hi].add_(values[off : off + hi - lo], alpha=alpha)
                off += hi - lo
            return flat
        for off, idx in self.index_chunks(flat.device):
            flat.index_add_(0, idx, values[off : off + idx.numel()].to(flat.dtype), alpha=alpha)
        return flat


class KeepsRatio:
    """Mixin of the compressors that keep a fraction of the entries, with values in a wire dtype.

    Parameters
    ----------
    ratio:
        Fraction of elements kept, ``0 < ratio <= 1``; ``k = max(1, min(d, round(ratio * d)))``.
    value_dtype:
        Wire dtype of the values: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
    """

    def __init__(self, ratio: float = 0.1, value_dtype: str = "float32") -> None:
        self.ratio = check_ratio(ratio)
        self.value_dtype = value_dtype
        self._dtype = wire_value_dtype(value_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, value_dtype={self.value_dtype!r})"

    def k_for(self, numel: int) -> int:
        """Number of values sent for a tensor of ``numel`` elements."""
        return k_for_ratio(numel, self.ratio)


class SelectiveCompressor(Compressor):
    """A compressor whose output is ``scale * x`` on a seed-determined :class:`Selection`.

    Error feedback uses this to avoid materialising ``p = u + e`` densely: only
    the ``k`` selected coordinates of ``p`` are ever needed.
    """

    @staticmethod
    def tensor_seed(seed: int, key: str) -> int:
        """The per-tensor seed that ``compress(x, seed=seed, key=key)`` passes to :meth:`select`.

        Callers that use :meth:`select` / :meth:`pack` directly (error feedback)
        must use this so that they pick the same coordinates as ``compress``.
        """
        return derive_seed(seed, key)

    #: :meth:`select` always returns a block (``indices is None``): random-block-k, rbSGD, identity.
    block_selection: ClassVar[bool] = False

    #: ``Q(x) = value_scale * x`` on the selection (1 for unscaled, d/k for rbSGD).
    def value_scale(self, numel: int) -> float:
        return 1.0

    @abstractmethod
    def select(self, numel: int, seed: int, device: torch.device | str = "cpu") -> Selection:
        """The coordinates chosen for a tensor of ``numel`` elements with ``seed``."""

    @abstractmethod
    def pack(
        self, values: torch.Tensor, selection: Selection, shape: tuple[int, ...], seed: int, *, owned: bool = False
    ) -> Payload:
        """Build the payload from the selected (unscaled) values of ``x``.

        With ``owned=True`` the caller hands ``values`` over: when it already has the
        wire dtype it becomes the payload array without a copy.
        """


# ---------------------------------------------------------------------------
# Small helpers shared by the concrete compressors.
# ---------------------------------------------------------------------------


def check_ratio(ratio: float) -> float:
    """Validate a fraction of elements ``0 < ratio <= 1``; return it as a float."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio={ratio!r} is out of range; allowed: 0 < ratio <= 1")
    return float(ratio)


def check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """Validate an integer argument ``low <= value (<= high)``; return it."""
    bad_type = isinstance(value, bool) or not isinstance(value, int)
    if bad_type or value < low or (high is not None and value > high):
        allowed = f"integers >= {low}" if high is None else f"integers {low}..{high}"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")
    return value


def k_for_ratio(numel: int, ratio: float) -> int:
    """Elements kept for a tensor of ``numel``: ``max(1, min(numel, round(ratio * numel)))`` (0 if empty)."""
    if numel <= 0:
        return 0
    return max(1, min(numel, round(ratio * numel)))


def private_generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    """``generator`` itself, or a fresh CPU generator seeded with ``seed`` (>= 0) when it is ``None``.

    The private randomness of a compressor (QSGD's rounding, ATOMO's sampling): never the global RNG.
    """
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return generator
    return make_generator(check_int("seed", seed, 0))


def private_uniform(generator: torch.Generator, n: int, device: torch.device | str) -> torch.Tensor:
    """``n`` uniform [0, 1) float32 draws from ``generator`` (never the global RNG), on ``device``.

    Drawn on the generator's own device and moved if that differs from ``device``.
    """
    return torch.rand(n, generator=generator, device=generator.device).to(device)
