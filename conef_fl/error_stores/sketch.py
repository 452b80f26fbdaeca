"""A count sketch that keeps no d-sized table and creates no d-sized temporary.

Units of ``m`` elements are hashed to ``W`` buckets per row by a seeded balanced
permutation (scheme ``perm-v1``); update and recovery are sparse ±1 products, with
fp32 accumulation for fp16/bf16 tables; hash structures are a pure function of
(seed, geometry) and shared through a bounded process-wide cache that never changes
a result. The design and its reasons: ``docs/design.md``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conef_fl import native
from conef_fl.error_stores.base import ErrorStore
from conef_fl.seeding import derive_seed, make_generator

#: Name of the hash scheme; stored in ``state_dict`` (a table is meaningless under another scheme).
HASH_SCHEME = "perm-v1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_SPARSE_DTYPES = (torch.float32, torch.float64)
#: Target number of buckets per sketch row when choosing the unit width.
_TARGET_BUCKETS = 1024
#: Largest unit width (elements hashed together).
_MAX_UNIT = 4096
#: Coordinates per call of the per-coordinate (sparse) paths.
_SPARSE_CHUNK = 1 << 12
#: Scratch of the chunked paths: at most this fraction of the vector's float32 bytes ...
_SCRATCH_FRACTION = 1 / 256
#: ... and at least this many elements (one unit at the very least).
_SCRATCH_MIN = 1 << 12
#: float32 scratch of a 16-bit table's update, per block of buckets: this fraction of the vector's
#: elements (0.8 % of its float32 bytes; the sparse product has a large fixed cost per call, so
#: fewer, larger blocks are faster; bounded so that a step stays within 2 % of 4d).
_BLOCK_FRACTION = 1 / 128
#: float32/float64 tables use the compiled kernels (:mod:`conef_fl.native`) only for vectors of at
#: least this many elements, and only where a kernel saves a whole pass (the feedback factor fused
#: into the update, the finite check fused into the recovery): MKL's sparse product is as fast as
#: the kernels at 10M and up to 3× faster below a few million (L3-resident; docs/benchmarks.md).
#: 16-bit tables always use them (no torch kernel reads 16-bit rows and accumulates in float32).
NATIVE_WIDE_MIN_NUMEL = 1 << 22
#: ... except float32 sketches of at most this many elements (ResNet-18's 48 smallest tensors) use them
#: for the whole recovery (one call, :meth:`CountSketch.estimate_add_`) and the fused update: there
#: a call's fixed cost (Python, dispatch, MKL's setup) is most of the work.
NATIVE_SMALL_MAX_NUMEL = 1 << 16
#: Random sign bits drawn per int64 word.
_SIGN_BITS = 62
_SHIFTS = torch.arange(_SIGN_BITS, dtype=torch.int64)


def sketch_dtype(name: str | torch.dtype) -> torch.dtype:
    """Resolve a sketch storage dtype name (``float32``, ``float16``, ``bfloat16``, ``float64``)."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPE_NAMES:
            raise ValueError(f"sketch dtype {name} is not supported; allowed: {sorted(_DTYPES)}")
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"sketch dtype {name!r} is not supported; allowed: {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class SketchGeometry:
    """Shape of a count sketch over ``numel`` elements.

    ``rows`` (v) independent hash rows, ``buckets`` (W) buckets per row, each
    bucket a vector of ``unit`` (m) elements; the table has ``rows·buckets·unit``
    entries.
    """

    numel: int
    rows: int
    buckets: int
    unit: int

    @property
    def num_units(self) -> int:
        """Number of hashed units ``n = ceil(numel / unit)``."""
        return -(-self.numel // self.unit)

    @property
    def full_units(self) -> int:
        """Units of exactly ``unit`` elements (all but a shorter tail unit)."""
        return self.numel // self.unit

    @property
    def tail(self) -> int:
        """Elements of the shorter last unit (0 if ``unit`` divides ``numel``)."""
        return self.numel - self.full_units * self.unit

    @property
    def table_numel(self) -> int:
        """Entries in the sketch table."""
        return self.rows * self.buckets * self.unit

    def bucket_loads(self) -> list[int]:
        """Full units hashed to each bucket (the same for every row and seed: balanced hashing)."""
        f, w = self.full_units, self.buckets
        return [(b + 1) * f // w - b * f // w for b in range(w)]

    @staticmethod
    def for_ratio(numel: int, ratio: float, rows: int = 1, unit: int | None = None) -> SketchGeometry:
        """Geometry whose table holds about ``ratio · numel`` entries in total (all rows).

        Parameters
        ----------
        numel:
            Length of the sketched vector (>= 1).
        ratio:
            Table entries as a fraction of ``numel``, in (0, 1].
        rows:
            Hash rows v (>= 1; the paper recommends 1, or 3 with a median).
        unit:
            Elements hashed together (tensor trick). Default: chosen so that each
            row has about 1024 buckets, at most 4096 elements per unit.
        """
        if numel < 1:
            raise ValueError(f"numel={numel} must be >= 1")
        if not (0.0 < ratio <= 1.0) or not math.isfinite(ratio):
            raise ValueError(f"sketch ratio={ratio} must be in (0, 1]")
        if rows < 1:
            raise ValueError(f"sketch rows={rows} must be >= 1")
        per_row = max(1.0, ratio * numel / rows)
        if unit is None:
            unit = int(min(_MAX_UNIT, max(1, per_row // _TARGET_BUCKETS)))
        elif unit < 1:
            raise ValueError(f"sketch unit={unit} must be >= 1")
        unit = min(unit, numel)
        buckets = max(1, int(per_row // unit))  # floor: the table never exceeds ratio·numel (unless tiny)
        return SketchGeometry(numel=numel, rows=rows, buckets=buckets, unit=unit)


def _row_seed(seed: int, row: int) -> int:
    return derive_seed(seed, "count-sketch", HASH_SCHEME, row)


_SIGN_LUTS: dict[torch.dtype, torch.Tensor] = {}


def _sign_lut(dtype: torch.dtype) -> torch.Tensor:
    """``[+1, -1]`` in ``dtype`` (CPU; a constant, created once per dtype)."""
    lut = _SIGN_LUTS.get(dtype)
    if lut is None:
        lut = _SIGN_LUTS[dtype] = torch.tensor([1.0, -1.0], dtype=dtype)
    return lut


def _tail_hash(row_seed: int, buckets: int) -> tuple[int, float]:
    """Bucket and sign of the tail unit of one row (pure Python, no generator)."""
    v = derive_seed(row_seed, "tail")
    return v % buckets, (1.0 if (v >> 40) & 1 else -1.0)


class _RowHash:
    """The hash of one sketch row, built for one call (O(n) integers; never kept between calls).

    ``perm[p]`` is the full unit at position ``p``; positions
    ``[crow[b], crow[b+1])`` form bucket ``b``; ``sign[p]`` is the sign of the unit
    at position ``p``. ``(crow, perm, sign)`` is ``Pᵀ`` in CSR form.
    """

    __slots__ = ("full", "buckets", "perm", "sign", "crow", "tail_bucket", "tail_sign", "_i32", "_inv",
                 "_ubucket", "_usign", "_pt", "_p")

    def __init__(self, row_seed: int, g: SketchGeometry, device: torch.device, dtype: torch.dtype) -> None:
        f, w = g.full_units, g.buckets
        self.full, self.buckets = f, w
        #: positions and buckets fit int32 arithmetic (then no int64 copies are made)
        self._i32 = (f + 1) * (w + 1) < 2**31
        gen = make_generator(row_seed)
        perm = torch.randperm(f, generator=gen, dtype=torch.int32)
        words = torch.randint(0, 1 << _SIGN_BITS, (-(-f // _SIGN_BITS),), generator=gen)
        bits = (words.unsqueeze(1) >> _SHIFTS).bitwise_and_(1).view(-1)[:f]
        sign = _sign_lut(dtype).index_select(0, bits)  # bit 0 -> +1, bit 1 -> -1
        if self._i32:
            crow = torch.arange(0, (w + 1) * f, f, dtype=torch.int32).div_(w, rounding_mode="floor")
        else:
            crow = torch.arange(0, (w + 1) * f, f, dtype=torch.int64).div_(w, rounding_mode="floor").to(torch.int32)
        if device.type != "cpu":
            perm, sign, crow = perm.to(device), sign.to(device), crow.to(device)
        self.perm, self.sign, self.crow = perm, sign, crow
        self.tail_bucket, self.tail_sign = _tail_hash(row_seed, w)
        self._inv: torch.Tensor | None = None
        self._ubucket: torch.Tensor | None = None
        self._usign: torch.Tensor | None = None
        self._pt: torch.Tensor | None = None
        self._p: torch.Tensor | None = None

    def complete(self) -> _RowHash:
        """Build the per-unit buckets and signs, drop the positions (before the hash is cached and shared)."""
        _ = self.ubucket, self.usign
        self._inv = None  # only needed to build them: 16 bytes a unit stay (perm, sign, ubucket, usign)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the structures built so far."""
        ts = (self.perm, self.sign, self.crow, self._inv, self._ubucket, self._usign)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @property
    def inv(self) -> torch.Tensor:
        """Position of every full unit (int32)."""
        if self._inv is None:  # scatter (int64 index) is several times faster than index_put here
            ar = torch.arange(self.full, dtype=torch.int32, device=self.perm.device)
            self._inv = torch.empty_like(self.perm).scatter_(0, self.perm.to(torch.int64), ar)
        return self._inv

    @property
    def ubucket(self) -> torch.Tensor:
        """Bucket of every full unit (int32, or int64 for huge geometries)."""
        if self._ubucket is None:
            self._ubucket = self._bucket_of(self.inv)
        return self._ubucket

    @property
    def usign(self) -> torch.Tensor:
        """Sign of every full unit (in the hash's dtype)."""
        if self._usign is None:
            self._usign = self.sign.index_select(0, self.inv)
        return self._usign

    def _bucket_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Bucket of int32 positions (int32, or int64 for huge geometries): the largest ``b`` with ``crow[b] <= p``."""
        if self._i32 and pos.numel() <= 256:  # one call instead of four (a binary search: only for few)
            return torch.bucketize(pos, self.crow[1:], right=True, out_int32=True)
        p = pos + 1 if self._i32 else pos.to(torch.int64) + 1
        return p.mul_(self.buckets).sub_(1).div_(self.full, rounding_mode="floor")

    def unit_buckets(self, lo: int, hi: int) -> torch.Tensor:
        """Buckets (int32 or int64) of full units ``lo..hi-1`` (a view)."""
        return self.ubucket[lo:hi]

    def unit_signs(self, lo: int, hi: int) -> torch.Tensor:
        """Signs of full units ``lo..hi-1`` (a view)."""
        return self.usign[lo:hi]

    def unit(self, i: int) -> tuple[int, float]:
        """Bucket and sign of unit ``i`` (the tail unit is ``i == full``) as Python numbers."""
        if i >= self.full:
            return self.tail_bucket, self.tail_sign
        return int(self.ubucket[i]), float(self.usign[i])

    def lookup(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (int32, or int64 for huge geometries) and sign of any units (the tail unit is ``full``)."""
        if self.full:
            clamped = units.clamp(max=self.full - 1)
            b, s = self.ubucket.index_select(0, clamped), self.usign.index_select(0, clamped)
        else:
            b = torch.zeros(units.numel(), dtype=torch.int32, device=units.device)
            s = torch.zeros(units.numel(), dtype=self.sign.dtype, device=units.device)
        tail = units >= self.full
        if bool(tail.any()):
            b = torch.where(tail, torch.tensor(self.tail_bucket, dtype=b.dtype, device=b.device), b)
            s = torch.where(tail, torch.tensor(self.tail_sign, dtype=s.dtype, device=s.device), s)
        return b, s

    def p(self) -> torch.Tensor:
        """``P`` over all full units as one sparse CSR tensor (``full × buckets``; one non-zero a row)."""
        if self._p is None:
            col = self.ubucket if self.ubucket.dtype == torch.int32 else self.ubucket.to(torch.int32)
            self._p = _csr(_arange_i32(self.full + 1, self.perm.device), col, self.usign, (self.full, self.buckets))
        return self._p

    def pt(self) -> torch.Tensor:
        """``Pᵀ`` over all full units as one sparse CSR tensor (``buckets × full``; built once, no copies)."""
        if self._pt is None:
            self._pt = _csr(self.crow, self.perm, self.sign, (self.buckets, self.full))
        return self._pt

    def transposed(self, u0: int, u1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Pᵀ`` restricted to full units ``u0..u1-1`` as CSR parts (crow, col, values), columns from 0."""
        if u0 == 0 and u1 == self.full:
            return self.crow, self.perm, self.sign
        keep = (self.perm >= u0).logical_and_(self.perm < u1)
        col = self.perm[keep].sub_(u0)
        val = self.sign[keep]
        counts = torch.zeros(self.full + 1, dtype=torch.int32, device=self.perm.device)
        torch.cumsum(keep, 0, dtype=torch.int32, out=counts[1:])
        return counts.index_select(0, self.crow), col, val


#: Process-wide budget of the hash cache, bytes (0 disables it); see :func:`set_hash_cache_bytes`.
HASH_CACHE_BYTES = 64 << 20


class _HashCache:
    """LRU cache of complete :class:`_RowHash` objects, keyed by row seed, geometry, device and sign dtype."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[object, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row_seed: int, g: SketchGeometry, device: torch.device, dtype: torch.dtype) -> _RowHash:
        def build() -> _RowHash:
            return _RowHash(row_seed, g, device, dtype)

        return self.get_or_build((row_seed, g, str(device), dtype), build, _RowHash.complete)

    def get_or_build(self, key: tuple[object, ...], build: Callable[[], Any],
                     complete: Callable[[Any], Any] | None = None) -> Any:
        """The entry of ``key``, built by ``build()`` (and ``complete(entry)`` before it is kept) on a miss.

        Entries have an ``nbytes`` attribute; with the cache disabled (``max_bytes <= 0``) the
        built object is returned without ``complete``.
        """
        with self._lock:
            h = self._entries.get(key)
            if h is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return h
            self.misses += 1
        h = build()
        if self.max_bytes <= 0:
            return h
        if complete is not None:
            complete(h)
        size = h.nbytes
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return self._entries.get(key, h)
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
            self._entries[key] = h
            self.bytes += size
        return h

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            while self._entries and self.bytes > max(0, max_bytes):
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes


_CACHE = _HashCache(HASH_CACHE_BYTES)


def set_hash_cache_bytes(max_bytes: int) -> None:
    """Set the process-wide hash cache budget in bytes (``0`` disables the cache and empties it).

    Raises
    ------
    ValueError
        If ``max_bytes`` is negative.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes} is out of range; allowed: >= 0")
    _CACHE.resize(int(max_bytes))


def hash_cache_info() -> dict[str, int]:
    """The hash cache: ``bytes`` held, ``max_bytes``, ``entries``, ``hits`` and ``misses`` so far."""
    return {"bytes": _CACHE.bytes, "max_bytes": _CACHE.max_bytes, "entries": len(_CACHE._entries),
            "hits": _CACHE.hits, "misses": _CACHE.misses}


_CSR_QUIET = False


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    global _CSR_QUIET
    if _CSR_QUIET:  # torch warns once per process; later calls skip the (costly) warnings context
        return torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" (once per process)
        out = torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)
    _CSR_QUIET = True
    return out


class _FeedbackFactor:
    """A hash-cache entry: the per-bucket factor of ``S ← S − c·CS(ê)`` and its tail value (never written)."""

    __slots__ = ("factor", "tail", "nbytes")

    def __init__(self, factor: torch.Tensor, tail: float) -> None:
        self.factor, self.tail = factor, tail
        self.nbytes = factor.numel() * factor.element_size()


@functools.lru_cache(maxsize=256)
def _bucket_loads(buckets: int, full: int, device: str) -> torch.Tensor:
    """Full units per bucket as float32 (balanced hashing: a function of the geometry; shared, never written)."""
    crow = torch.arange(buckets + 1, dtype=torch.int64, device=device).mul_(full)
    crow = crow.div_(buckets, rounding_mode="floor")
    return (crow[1:] - crow[:-1]).to(torch.float32)


_ARANGE: dict[str, torch.Tensor] = {}


def _arange_i32(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` as int32: a slice of one shared, growing constant per device (never written)."""
    key = str(device)
    a = _ARANGE.get(key)
    if a is None or a.numel() < n:
        a = _ARANGE[key] = torch.arange(max(n, 1 << 14), dtype=torch.int32, device=device)
    return a[:n]


def _gather_kernel(kernels: Any, h: _RowHash, x_units: torch.Tensor, table: torch.Tensor, u0: int,
                   alpha: float) -> bool:
    """``x_units += alpha · P S`` for full units ``u0..`` through the compiled kernels; whether ``x_units`` was finite.

    A whole vector of at least :data:`NATIVE_WIDE_MIN_NUMEL` elements goes bucket by bucket
    through the CSR of ``Pᵀ`` (each bucket row read once: faster once the vector is out of
    cache); anything else unit by unit. Both compute the same value for every element.
    """
    n = x_units.shape[0]
    if u0 == 0 and n == h.full and h.perm.dtype == torch.int32 and x_units.numel() >= NATIVE_WIDE_MIN_NUMEL:
        return bool(kernels.sketch_gather_add_csr_(x_units, table, h.crow, h.perm, h.sign, alpha))
    return bool(kernels.sketch_gather_add_(x_units, table, h.unit_buckets(u0, u0 + n), h.unit_signs(u0, u0 + n),
                                           alpha))


def unit_hashes(
    seed: int, row: int, geometry: SketchGeometry, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket (int64) and sign (±1 float32) of every unit (tail unit last) of one hash row.

    A pure function of its arguments (the reference the sketch's kernels are tested against).
    """
    h = _RowHash(_row_seed(seed, row), geometry, torch.device(device), torch.float32)
    b, s = h.lookup(torch.arange(geometry.num_units, device=torch.device(device)))
    return b.to(torch.int64), s


class CountSketch(ErrorStore):
    """Count sketch of a flat vector of ``geometry.numel`` elements (the error compressor C).

    Parameters
    ----------
    geometry:
        Rows, buckets and unit width (see :meth:`SketchGeometry.for_ratio`).
    seed:
        Hash seed. Sketches can be added or averaged only with the same seed and geometry.
    dtype:
        Storage dtype of the table: ``float32`` (default), ``float16``, ``bfloat16``, ``float64``.
    device:
        Torch device of the table.
    estimate_scale:
        Factor applied to every recovered estimate (default 1: the unbiased estimate).
    combine:
        How rows are combined on recovery when ``rows > 1``: ``"median"`` or ``"mean"``.
    """

    linear = True
    name = "count-sketch"

    def __init__(
        self,
        geometry: SketchGeometry,
        *,
        seed: int = 0,
        dtype: str | torch.dtype = "float32",
        device: torch.device | str = "cpu",
        estimate_scale: float = 1.0,
        combine: str = "median",
    ) -> None:
        if combine not in ("median", "mean"):
            raise ValueError(f"combine={combine!r} must be 'median' or 'mean'")
        if not math.isfinite(estimate_scale):
            raise ValueError(f"estimate_scale={estimate_scale} must be finite")
        self.geometry = geometry
        self.seed = int(seed)
        self.estimate_scale = float(estimate_scale)
        self.combine = combine
        g = geometry
        self.table = torch.zeros((g.rows, g.buckets, g.unit), dtype=sketch_dtype(dtype), device=device)
        #: float32/float64 tables compute in their own dtype (sparse kernels); 16-bit ones in float32.
        self._cdtype = self.table.dtype if self.table.dtype in _SPARSE_DTYPES else torch.float32
        self._row_seeds = [_row_seed(self.seed, r) for r in range(g.rows)]
        self._memo: list[_RowHash] | None = None
        self._memo_depth = 0

    @property
    def numel(self) -> int:  # type: ignore[override]
        """Length of the sketched vector."""
        return self.geometry.numel

    # ------------------------------------------------------------------ accounting
    @property
    def nbytes(self) -> int:
        """Bytes kept between steps: the table's storage (the hashes are recomputed from the seed)."""
        return self.table.untyped_storage().nbytes()

    def persistent_tensors(self) -> list[torch.Tensor]:
        """Every tensor this object keeps between calls."""
        return [self.table]

    # ------------------------------------------------------------------ hashes
    def _hashes(self) -> list[_RowHash]:
        if self._memo is not None:
            return self._memo
        hashes = [_CACHE.get(rs, self.geometry, self.table.device, self._cdtype) for rs in self._row_seeds]
        if self._memo_depth:
            self._memo = hashes
        return hashes

    @contextlib.contextmanager
    def reuse_hashes(self) -> Iterator[CountSketch]:
        """Compute the hashes once for every call inside the block (released on exit)."""
        self._memo_depth += 1
        try:
            yield self
        finally:
            self._memo_depth -= 1
            if not self._memo_depth:
                self._memo = None

    def _scratch_units(self) -> int:
        """Units per chunk of the chunked paths (bounded scratch, at least one unit)."""
        g = self.geometry
        elems = max(_SCRATCH_MIN, int(g.numel * _SCRATCH_FRACTION))
        return max(1, min(max(1, g.full_units), elems // g.unit))

    def _use_sparse(self) -> bool:
        return self.table.dtype in _SPARSE_DTYPES

    def _native(self, *xs: torch.Tensor | None, fused: bool = False, min_numel: int | None = None) -> Any:
        """The compiled kernels (:mod:`conef_fl.native`) when they apply to ``xs``, else ``None``.

        They apply to a CPU table and contiguous CPU operands in the compute dtype; a
        float32/float64 table only for a ``fused`` operation on a vector of at least
        :data:`NATIVE_WIDE_MIN_NUMEL` elements. The results are bit-identical to the torch
        paths (``docs/design.md``, "Native kernels").
        """
        if self.table.device.type != "cpu":
            return None
        floor = NATIVE_WIDE_MIN_NUMEL if min_numel is None else min_numel
        if self._use_sparse() and (not fused or self.geometry.numel < floor):
            return None
        for x in xs:
            if x is not None and (x.dtype != self._cdtype or x.device.type != "cpu" or not x.is_contiguous()
                                  or x.requires_grad):
                return None
        return native.ops()

    def _block_split(self, start: int, k: int, what: str) -> tuple[int, int, list[tuple[int, int]]]:
        """Whole units ``[first, last)`` inside ``[start, start + k)`` and the partial pieces at its edges.

        Raises ``ValueError`` naming ``what`` if the range leaves ``[0, numel)``.
        """
        g = self.geometry
        if start < 0 or k < 0 or start + k > g.numel:
            raise ValueError(f"{what} [{start}, {start + k}) outside [0, {g.numel})")
        m, full = g.unit, g.full_units
        first = min(-(-start // m), full)  # first unit starting inside the range
        last = max(first, min((start + k) // m, full))  # units [first, last) lie inside
        if last > first:
            return first, last, [(start, first * m), (last * m, start + k)]
        return first, last, [(start, start + k)]

    def _unit_pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """Split ``[lo, hi)`` at unit boundaries: ``(unit, first column, last column)``."""
        m, full = self.geometry.unit, self.geometry.full_units
        pos = lo
        while pos < hi:
            i = min(pos // m, full)
            end = min(hi, (i + 1) * m) if i < full else hi
            yield i, pos - i * m, end - i * m
            pos = end

    # ------------------------------------------------------------------ kernels
    def _scatter(self, x_units: torch.Tensor, u0: int, alpha: float, tail: torch.Tensor | None = None) -> None:
        """``S += alpha · Pᵀ x`` for full units ``u0..`` given as rows of ``x_units`` (+ the tail unit)."""
        g = self.geometry
        u1 = u0 + x_units.shape[0]
        kernels = self._native(x_units, tail) if u1 > u0 else None
        for r, h in enumerate(self._hashes()):
            table = self.table[r]
            if kernels is not None:
                crow, col, val = (h.crow, h.perm, h.sign) if u0 == 0 and u1 == h.full else h.transposed(u0, u1)
                kernels.sketch_scatter_(table, x_units, crow, col, val, alpha, None, tail, h.tail_bucket,
                                        alpha * h.tail_sign, 0, 1.0, None, 0.0)
                continue
            if u1 > u0 and x_units.dtype != self._cdtype:
                self._scatter_index(table, h, x_units, u0, alpha)
            elif u1 > u0 and self._use_sparse():
                if u0 == 0 and u1 == h.full:  # the whole vector: the cached sparse structure
                    table.addmm_(h.pt(), x_units, alpha=alpha)
                else:
                    crow, col, val = h.transposed(u0, u1)
                    table.addmm_(_csr(crow, col, val, (g.buckets, u1 - u0)), x_units, alpha=alpha)
            elif u1 > u0:  # 16-bit table: float32 scratch per block of buckets, rounded into the table once
                self._scatter_blocks(table, h, x_units, u0, u1, alpha, tail)
                continue
            if tail is not None:
                table[h.tail_bucket, : tail.numel()].add_(tail, alpha=alpha * h.tail_sign)

    def _scatter_blocks(self, table: torch.Tensor, h: _RowHash, x_units: torch.Tensor, u0: int, u1: int,
                        alpha: float, tail: torch.Tensor | None) -> None:
        g = self.geometry
        crow, col, val = h.transposed(u0, u1)
        bounds = crow.tolist()
        nb = min(g.buckets, max(1, max(_SCRATCH_MIN, int(g.numel * _BLOCK_FRACTION)) // g.unit))
        scratch = torch.empty((nb, g.unit), dtype=torch.float32, device=table.device)
        for b0 in range(0, g.buckets, nb):
            b1 = min(g.buckets, b0 + nb)
            p0, p1 = bounds[b0], bounds[b1]
            has_tail = tail is not None and b0 <= h.tail_bucket < b1
            if p1 == p0 and not has_tail:
                continue
            s = scratch[: b1 - b0]
            s.copy_(table[b0:b1])
            if p1 > p0:
                part = _csr(crow[b0 : b1 + 1] - p0, col[p0:p1], val[p0:p1], (b1 - b0, u1 - u0))
                s.addmm_(part, x_units, alpha=alpha)
            if has_tail:
                assert tail is not None
                s[h.tail_bucket - b0, : tail.numel()].add_(tail, alpha=alpha * h.tail_sign)
            table[b0:b1].copy_(s)

    def _scatter_index(self, table: torch.Tensor, h: _RowHash, x_units: torch.Tensor, u0: int, alpha: float) -> None:
        """Fallback when ``x`` is not in the compute dtype: convert chunk by chunk, ``index_add_``."""
        step = self._scratch_units()
        for lo in range(0, x_units.shape[0], step):
            hi = min(x_units.shape[0], lo + step)
            b = h.unit_buckets(u0 + lo, u0 + hi)
            buf = x_units[lo:hi].to(self._cdtype) * h.unit_signs(u0 + lo, u0 + hi).unsqueeze(1)  # a new tensor
            table.index_add_(0, b, buf.to(table.dtype), alpha=alpha)

    def _gather(self, h: _RowHash, r: int, lo: int, hi: int) -> torch.Tensor:
        """Signed bucket contents of full units lo..hi-1 for row r (float32, (hi-lo)×m)."""
        est = self.table[r].index_select(0, h.unit_buckets(lo, hi)).to(torch.float32)
        return est.mul_(h.unit_signs(lo, hi).to(torch.float32).unsqueeze(1))

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Combine the rows' float32 estimates (consumes ``parts``)."""
        if len(parts) == 1:
            return parts[0]
        if self.combine == "mean":
            acc = parts[0]
            for p in parts[1:]:
                acc.add_(p)
            return acc.div_(len(parts))
        if len(parts) == 3:  # median of three with min/max (no sort, no stacking)
            a, b, c = parts
            lo_ab = torch.minimum(a, b)
            torch.maximum(a, b, out=a)  # a := max(a, b)
            torch.minimum(a, c, out=a)  # a := min(max(a, b), c)
            return torch.maximum(lo_ab, a, out=a)
        return torch.stack(parts).median(dim=0).values

    def _estimate_units_add_(self, x_units: torch.Tensor, u0: int, alpha: float) -> None:
        """``x_units += alpha · P S`` for full units ``u0..`` (rows of ``x_units``); rows combined."""
        g = self.geometry
        n = x_units.shape[0]
        if n == 0:
            return
        hashes = self._hashes()
        if g.rows == 1:
            kernels = self._native(x_units)
            if kernels is not None:
                _gather_kernel(kernels, hashes[0], x_units, self.table[0], u0, alpha)
                return
        if g.rows == 1 and self._use_sparse() and x_units.dtype == self.table.dtype and u0 == 0 and n == g.full_units:
            x_units.addmm_(hashes[0].p(), self.table[0], alpha=alpha)  # the whole vector: the cached structure
            return
        if g.rows == 1 and self._use_sparse() and x_units.dtype == self.table.dtype:
            h = hashes[0]
            crow = _arange_i32(n + 1, self.table.device)
            col = h.unit_buckets(u0, u0 + n)
            if col.dtype != torch.int32:
                col = col.to(torch.int32)
            p = _csr(crow, col, h.unit_signs(u0, u0 + n), (n, g.buckets))
            x_units.addmm_(p, self.table[0], alpha=alpha)
            return
        if g.rows == 1:  # gather bucket rows in the table's dtype into one buffer; signs, scale in float32
            h = hashes[0]
            buckets = h.unit_buckets(u0, u0 + n)
            signs = h.unit_signs(u0, u0 + n).to(torch.float32, copy=True).mul_(alpha).unsqueeze(1)
            # a 16-bit chunk is half the bytes: twice the units for the same scratch
            step = self._scratch_units() * (4 // self.table.element_size() if self.table.element_size() < 4 else 1)
            est = torch.empty((min(step, n), g.unit), dtype=self.table.dtype, device=self.table.device)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                torch.index_select(self.table[0], 0, buckets[lo:hi], out=est[: hi - lo])
                # mixed dtypes: widened inside the kernel (exact), one float32 rounding, no float32 copy
                x_units[lo:hi].addcmul_(est[: hi - lo], signs[lo:hi])
            return
        step = self._scratch_units()
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            est = self._combine([self._gather(h, r, u0 + lo, u0 + hi) for r, h in enumerate(hashes)])
            x_units[lo:hi].add_(est, alpha=alpha)
            del est

    def _add_piece_estimate_(self, target: torch.Tensor, unit: int, c0: int, c1: int, alpha: float) -> None:
        """``target += alpha · ê`` on columns ``c0..c1-1`` of one unit (few calls for one row)."""
        if self.geometry.rows == 1:
            b, s = self._hashes()[0].unit(unit)
            target.add_(self.table[0, b, c0:c1], alpha=alpha * s)
        else:
            target.add_(self._estimate_piece(unit, c0, c1).to(target.dtype), alpha=alpha)

    def _estimate_piece(self, unit: int, c0: int, c1: int) -> torch.Tensor:
        """Unscaled estimate of columns ``c0..c1-1`` of one unit (float32), rows combined."""
        parts = []
        for r, h in enumerate(self._hashes()):
            b, s = h.unit(unit)
            parts.append(self.table[r, b, c0:c1].to(torch.float32).mul(s))
        return self._combine(parts)

    def _index_dtype(self) -> torch.dtype:
        """int32 when every flat index of the vector and of the table fits (halves the temporaries)."""
        g = self.geometry
        return torch.int32 if max(g.numel, g.buckets * g.unit) < 2**31 else torch.int64

    def _split(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Units and columns of flat indices (new tensors, in :meth:`_index_dtype`)."""
        i = idx.to(self._index_dtype(), copy=True)
        units = torch.div(i, self.geometry.unit, rounding_mode="floor")
        return units, i.sub_(units * self.geometry.unit)

    # ------------------------------------------------------------------ public API
    def accumulate_(self, x: torch.Tensor, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · CS(x)`` in place (x: any shape with ``numel`` elements; not modified)."""
        g = self.geometry
        flat = x.reshape(-1)
        if flat.numel() != g.numel:
            raise ValueError(f"x has {flat.numel()} elements, sketch expects {g.numel}")
        full, m = g.full_units, g.unit
        tail = flat[full * m :] if g.tail else None
        self._scatter(flat[: full * m].view(full, m), 0, alpha, tail)
        return self

    def accumulate_block_(self, values: torch.Tensor, start: int, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · CS(z)`` where ``z`` is zero except ``z[start:start+len(values)] = values``.

        Costs O(len(values) + n): whole units through the sparse kernel, the partial
        units at the edges as slices.
        """
        g = self.geometry
        vals = values.reshape(-1)
        first, last, pieces = self._block_split(start, vals.numel(), "block")
        m = g.unit
        with self.reuse_hashes():
            if last > first:
                self._scatter(vals[first * m - start : last * m - start].view(last - first, m), first, alpha)
            hashes = self._hashes()
            for lo, hi in pieces:
                for unit, c0, c1 in self._unit_pieces(lo, hi):
                    off = unit * m + c0 - start
                    for r, h in enumerate(hashes):
                        b, s = h.unit(unit)
                        self.table[r, b, c0:c1].add_(vals[off : off + c1 - c0], alpha=alpha * s)
        return self

    def accumulate_sparse_(self, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · CS(z)`` with ``z`` zero except ``z[indices] = values`` (O(k + n))."""
        g = self.geometry
        idx_all = indices.reshape(-1).to(device=self.table.device)
        vals_all = values.reshape(-1).to(device=self.table.device)
        if idx_all.numel() != vals_all.numel():
            raise ValueError(f"{idx_all.numel()} indices but {vals_all.numel()} values")
        if idx_all.numel() == 0:
            return self
        hashes = self._hashes()
        for c in range(0, idx_all.numel(), _SPARSE_CHUNK):
            units, cols = self._split(idx_all[c : c + _SPARSE_CHUNK])
            vals = vals_all[c : c + _SPARSE_CHUNK].to(torch.float32)
            for r, h in enumerate(hashes):
                b, sg = h.lookup(units)
                flat_idx = b.to(cols.dtype).mul_(g.unit).add_(cols)
                add = vals * sg.to(torch.float32)
                self.table[r].view(-1).index_add_(0, flat_idx, add.to(self.table.dtype), alpha=alpha)
        return self

    def estimate_add_(self, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê`` in place (``target``: numel elements, float)."""
        g = self.geometry
        flat = target.view(-1)
        if flat.numel() != g.numel:
            raise ValueError(f"target has {flat.numel()} elements, sketch expects {g.numel}")
        a = alpha * self.estimate_scale
        if self._recover_small(flat, a) is not None:
            return target
        full, m = g.full_units, g.unit
        with self.reuse_hashes():
            self._estimate_units_add_(flat[: full * m].view(full, m), 0, a)
            if g.tail:
                self._add_piece_estimate_(flat[full * m :], full, 0, g.tail, a)
        return target

    def _recover_small(self, flat: torch.Tensor, a: float) -> bool | None:
        """``flat += a·P S`` (tail unit too) in one compiled call for a small one-row float32 sketch;
        whether ``flat`` was finite before, or ``None`` (nothing done)."""
        g = self.geometry
        if g.rows != 1 or g.numel > NATIVE_SMALL_MAX_NUMEL or self.table.dtype != torch.float32:
            return None
        kernels = self._native(flat, fused=True, min_numel=0)
        if kernels is None:
            return None
        h = self._hashes()[0]
        return bool(kernels.sketch_recover_(flat, self.table[0], h.ubucket, h.usign, a, h.tail_bucket, h.tail_sign))

    def estimate_add_finite_(self, target: torch.Tensor, alpha: float = 1.0) -> bool | None:
        """:meth:`estimate_add_` that also tells whether ``target`` held only finite values before.

        The compiled recovery kernel checks each value as it reads it (the finite check of an
        update fused into its first pass). ``None`` when the kernels do not apply (not built, a
        table of several rows, an operand not contiguous float32/float64 on the CPU): then
        nothing is done and the caller checks and adds separately. After ``False`` the
        target holds ``target + alpha·ê`` all the same; the table is never written.
        """
        g = self.geometry
        flat = target.view(-1)
        if flat.numel() != g.numel:
            raise ValueError(f"target has {flat.numel()} elements, sketch expects {g.numel}")
        small = self._recover_small(flat, alpha * self.estimate_scale)
        if small is not None:
            return small
        full, m = g.full_units, g.unit
        if g.rows != 1 or not full:
            return None
        units = flat[: full * m].view(full, m)
        kernels = self._native(units, fused=True)
        if kernels is None:
            return None
        a = alpha * self.estimate_scale
        with self.reuse_hashes():
            finite = _gather_kernel(kernels, self._hashes()[0], units, self.table[0], 0, a)
            if g.tail:
                tail = flat[full * m :]
                finite = finite and bool(torch.isfinite(tail).all())
                self._add_piece_estimate_(tail, full, 0, g.tail, a)
        return finite

    def estimate_at(self, indices: torch.Tensor) -> torch.Tensor:
        """ê at the given flat indices (float32, O(k·rows + n))."""
        g = self.geometry
        idx_all = indices.reshape(-1).to(device=self.table.device)
        out = torch.empty(idx_all.numel(), dtype=torch.float32, device=self.table.device)
        if idx_all.numel() == 0:
            return out
        hashes = self._hashes()
        for c in range(0, idx_all.numel(), _SPARSE_CHUNK):
            units, cols = self._split(idx_all[c : c + _SPARSE_CHUNK])
            parts = []
            for r, h in enumerate(hashes):
                b, sg = h.lookup(units)
                flat_idx = b.to(cols.dtype).mul_(g.unit).add_(cols)
                v = self.table[r].view(-1).index_select(0, flat_idx).to(torch.float32)
                parts.append(v.mul_(sg.to(torch.float32)))
            out[c : c + _SPARSE_CHUNK] = self._combine(parts)
        return out.mul_(self.estimate_scale)

    def estimate_block(self, start: int, length: int) -> torch.Tensor:
        """ê on the contiguous range ``[start, start+length)`` (float32, O(length + n))."""
        g = self.geometry
        if start < 0 or length < 0 or start + length > g.numel:
            raise ValueError(f"range [{start}, {start + length}) outside [0, {g.numel})")
        out = torch.zeros(length, dtype=torch.float32, device=self.table.device)
        return self.estimate_block_add_(out, start)

    def estimate_block_add_(self, target: torch.Tensor, start: int, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê[start : start + len(target)]``: whole units through the kernels."""
        g = self.geometry
        flat = target.view(-1)
        first, last, pieces = self._block_split(start, flat.numel(), "range")
        m = g.unit
        a = alpha * self.estimate_scale
        with self.reuse_hashes():
            if last > first:
                self._estimate_units_add_(flat[first * m - start : last * m - start].view(last - first, m), first, a)
            for lo, hi in pieces:
                for unit, c0, c1 in self._unit_pieces(lo, hi):
                    off = unit * m + c0 - start
                    self._add_piece_estimate_(flat[off : off + c1 - c0], unit, c0, c1, a)
        return target

    def estimate_span(self, source: torch.Tensor, lo: int, hi: int, alpha: float = 1.0) -> torch.Tensor | None:
        """``source[lo:hi] + alpha · ê[lo:hi]`` as a contiguous float32 view of a new buffer, or ``None``.

        One sparse product over the whole units that overlap ``[lo, hi)`` (the buffer holds
        those units: at most ``2·unit − 2`` values more than the range), with the same
        arithmetic as :meth:`estimate_block_add_` on a copy of ``source[lo:hi]``. ``None``
        (nothing computed) unless the table is one float32/float64 row, ``source`` has the
        table's dtype and the range ends before the tail unit.
        """
        g = self.geometry
        m = g.unit
        if (g.rows != 1 or not self._use_sparse() or source.dtype != self.table.dtype
                or not 0 <= lo < hi <= g.full_units * m or source.numel() != g.numel):
            return None
        f0, f1 = lo // m, -(-hi // m)
        h = self._hashes()[0]
        col = h.unit_buckets(f0, f1)
        if col.dtype != torch.int32:
            col = col.to(torch.int32)
        p = _csr(_arange_i32(f1 - f0 + 1, self.table.device), col, h.unit_signs(f0, f1), (f1 - f0, g.buckets))
        buf = source.reshape(-1)[f0 * m : f1 * m].clone()
        buf.view(f1 - f0, m).addmm_(p, self.table[0], alpha=alpha * self.estimate_scale)
        return buf[lo - f0 * m : hi - f0 * m]

    def decompress(self) -> torch.Tensor:
        """The full estimate ê as a new float32 vector (allocates ``numel`` floats; for tests/inspection)."""
        out = torch.zeros(self.geometry.numel, dtype=torch.float32, device=self.table.device)
        return self.estimate_add_(out)

    def scale_(self, factor: float) -> CountSketch:
        """``S ← factor · S`` in place."""
        self.table.mul_(factor)
        return self

    def subtract_estimate_feedback_(self, coeff: float) -> bool:
        """``S ← S − coeff · CS(ê)`` exactly, for one hash row: ``CS(ê) = scale · n_b · S[b]``.

        ``n_b`` is the number of units hashed to bucket ``b`` (the tail unit counts
        only on its own columns). Needs no hash at all (the loads are balanced and
        known from the geometry). Returns False (nothing done) when ``rows > 1``,
        where ``CS(median)`` has no closed form.
        """
        g = self.geometry
        if g.rows != 1:
            return False
        c = coeff * self.estimate_scale
        dev = self.table.device
        factor = self._feedback_factor(c)
        if g.tail:  # the tail unit adds load only on the first `tail` columns of its bucket
            b, _ = _tail_hash(self._row_seeds[0], g.buckets)
            fb = float(factor[b])
            self.table[0, b, : g.tail].mul_(fb - c)
            self.table[0, b, g.tail :].mul_(fb)
            factor[b] = 1.0
        if self._use_sparse():
            self.table[0].mul_(factor.unsqueeze(1).to(self.table.dtype))
            return True
        # 16-bit table: float32 factor, one rounding, per block of buckets (an in-place mixed-dtype mul_
        # would allocate float32 copies of the whole table)
        nb = min(g.buckets, self._scratch_units())
        scratch = torch.empty((nb, g.unit), dtype=torch.float32, device=dev)
        for b0 in range(0, g.buckets, nb):
            b1 = min(g.buckets, b0 + nb)
            s = scratch[: b1 - b0]
            s.copy_(self.table[0, b0:b1]).mul_(factor[b0:b1].unsqueeze(1))
            self.table[0, b0:b1].copy_(s)
        return True

    def _feedback_factor(self, c: float) -> torch.Tensor:
        """``1 − c·n_b`` per bucket (float32; ``n_b``: full units in bucket ``b``), a new tensor."""
        g = self.geometry
        return _bucket_loads(g.buckets, g.full_units, str(self.table.device)).mul(-c).add_(1.0)

    def _fused_factor(self, c: float) -> tuple[torch.Tensor, float]:
        """:meth:`_feedback_factor` (never written) and the tail unit's bucket's factor on the tail's columns
        (``factor[b] − c``; 1.0 without a tail unit), from the hash cache: the same every step."""
        g = self.geometry

        def build() -> _FeedbackFactor:
            factor = self._feedback_factor(c)
            tail = float(factor[_tail_hash(self._row_seeds[0], g.buckets)[0]]) - c if g.tail else 1.0
            return _FeedbackFactor(factor, tail)

        entry = _CACHE.get_or_build(("feedback-factor", self._row_seeds[0], g, str(self.table.device), c), build)
        return entry.factor, entry.tail

    def feedback_accumulate_(self, x: torch.Tensor, coeff: float) -> bool:
        """``S ← S − coeff · CS(ê) + CS(x)``: :meth:`subtract_estimate_feedback_` then :meth:`accumulate_`.

        With the compiled kernels both happen in one pass over the table, bit-identical to
        the two calls (the factor is applied and, for a 16-bit table, rounded first). Returns
        False (nothing done) when ``rows > 1``, like :meth:`subtract_estimate_feedback_`.
        """
        g = self.geometry
        if g.rows != 1:
            return False
        flat = x.reshape(-1)
        if flat.numel() != g.numel:
            raise ValueError(f"x has {flat.numel()} elements, sketch expects {g.numel}")
        if not self._fused_feedback(flat, coeff, None, 0.0):
            self.subtract_estimate_feedback_(coeff)
            self.accumulate_(x)
        return True

    def feedback_accumulate_signs_(self, x: torch.Tensor, coeff: float, signs: torch.Tensor, s: float) -> bool:
        """``S ← S − coeff · CS(ê) + CS(x ± s)`` in one pass where the compiled kernels apply, else nothing.

        ``x ± s`` is ``x`` after ``sign_add_(x, signs, s)`` (bit 1: ``+s``; the scaled sign's
        ``x − Δ`` with ``s = −scale``), computed on the fly: ``x`` is only read. Bit-identical
        to :meth:`ScaledSign.decompress_add_` then :meth:`feedback_accumulate_`. Returns
        whether it was done (``False``: one row required, a CPU table, the kernels built, and for
        a float32 table at most :data:`NATIVE_SMALL_MAX_NUMEL` or at least
        :data:`NATIVE_WIDE_MIN_NUMEL` elements). ConEF uses it for 16-bit tables; float32 tables
        take the whole step in one call (:meth:`sign_step_`).
        """
        flat = x.reshape(-1)
        if self.geometry.rows != 1 or flat.numel() != self.geometry.numel or self._cdtype != torch.float32:
            return False
        if signs.dtype != torch.uint8 or signs.numel() != (flat.numel() + 7) // 8 or not signs.is_contiguous():
            return False
        return self._fused_feedback(flat, coeff, signs, s)

    def sign_step_(self, x: torch.Tensor, coeff: float) -> tuple[bool, torch.Tensor, torch.Tensor] | None:
        """A whole ConEF step with the scaled sign in one compiled call, or ``None``.

        ``x`` (the update, a buffer that is overwritten) becomes ``p = x + coeff·ê``; the payload
        is ``Q(p)``; ``S ← S − coeff·CS(ê) + CS(p − Q(p))``. Returns ``(finite, signs, scale)``;
        when ``x`` held NaN/Inf, ``finite`` is ``False`` and the table is untouched. The same
        bits as :meth:`estimate_add_`, :meth:`ScaledSign.compress`, then
        :meth:`feedback_accumulate_signs_` (or the decode and :meth:`feedback_accumulate_`).
        ``None`` (nothing done) unless: one row, a float32 CPU table, a contiguous float32 ``x``,
        the kernels built. At every size it is faster than the separate calls (ResNet-18's 64 to
        2.4M-value tensors, and 10M: ``docs/benchmarks.md``), so it has no size limit.
        """
        g = self.geometry
        if g.rows != 1 or self.table.dtype != torch.float32 or x.numel() != g.numel:
            return None
        flat = x if x.dim() == 1 else x.reshape(-1)
        kernels = self._native(flat, fused=True, min_numel=0)
        if kernels is None:
            return None
        c = coeff * self.estimate_scale
        h = self._hashes()[0]
        factor, tail_factor = self._fused_factor(c)
        signs = torch.empty((g.numel + 7) // 8, dtype=torch.uint8)
        finite, scale = kernels.conef_sign_step_(flat, self.table[0], h.ubucket, h.usign, c, h.crow, h.perm, h.sign,
                                                 factor, h.tail_bucket, h.tail_sign, tail_factor, signs,
                                                 g.numel >= NATIVE_WIDE_MIN_NUMEL)  # recovery order: _gather_kernel's
        return bool(finite), signs, scale

    def _fused_feedback(self, flat: torch.Tensor, coeff: float, signs: torch.Tensor | None, s: float) -> bool:
        """The one-pass ``S ← S − coeff · CS(ê) + CS(flat [± s])`` through the kernels; ``False``: not applicable."""
        g = self.geometry
        full, m = g.full_units, g.unit
        units = flat[: full * m].view(full, m)
        tail = flat[full * m :] if g.tail else None
        floor = 0 if g.numel <= NATIVE_SMALL_MAX_NUMEL else None
        kernels = self._native(units, tail, fused=True, min_numel=floor) if full else None
        if kernels is None:
            return False
        factor, tail_factor = self._fused_factor(coeff * self.estimate_scale)
        h = self._hashes()[0]
        tail_cols = g.tail  # as subtract_estimate_feedback_: the tail's columns of its bucket get (n_b + 1)
        kernels.sketch_scatter_(self.table[0], units, h.crow, h.perm, h.sign, 1.0, factor, tail, h.tail_bucket,
                                h.tail_sign, tail_cols, tail_factor, signs, s)
        return True

    def assign_(self, x: torch.Tensor) -> CountSketch:
        """``S ← CS(x)``."""
        self.table.zero_()
        return self.accumulate_(x)

    def zero_(self) -> CountSketch:
        """Forget everything (error reset)."""
        self.table.zero_()
        return self

    def compatible_with(self, other: CountSketch) -> bool:
        """Same seed and geometry (so tables can be added/averaged)."""
        return self.seed == other.seed and self.geometry == other.geometry

    def add_sketch_(self, other: CountSketch, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · S_other`` (linearity; requires the same seed and geometry)."""
        if not self.compatible_with(other):
            raise ValueError(
                f"incompatible sketches: seed {self.seed} vs {other.seed}, "
                f"geometry {self.geometry} vs {other.geometry}"
            )
        self.table.add_(other.table.to(self.table.dtype), alpha=alpha)
        return self

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, object]:
        """Table plus everything needed to validate a reload."""
        g = self.geometry
        return {
            "kind": self.name,
            "hash": HASH_SCHEME,
            "table": self.table,
            "seed": self.seed,
            "numel": g.numel,
            "rows": g.rows,
            "buckets": g.buckets,
            "unit": g.unit,
            "dtype": _DTYPE_NAMES[self.table.dtype],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Load a table saved by :meth:`state_dict`, validating hash scheme, seed, geometry and dtype."""
        missing = {"table", "seed", "numel", "rows", "buckets", "unit", "dtype"} - set(state)
        if missing:
            raise ValueError(f"count-sketch state is missing keys {sorted(missing)}")
        if state.get("hash") != HASH_SCHEME:
            raise ValueError(
                f"count-sketch state has hash scheme {state.get('hash')!r}, expected {HASH_SCHEME!r} "
                f"(a table saved under another scheme means something else)"
            )
        g = self.geometry
        expect = {"seed": self.seed, "numel": g.numel, "rows": g.rows, "buckets": g.buckets, "unit": g.unit}
        for key, val in expect.items():
            if int(state[key]) != val:  # type: ignore[call-overload]
                raise ValueError(f"count-sketch state has {key}={state[key]}, expected {val}")
        if state["dtype"] != _DTYPE_NAMES[self.table.dtype]:
            want = _DTYPE_NAMES[self.table.dtype]
            raise ValueError(f"count-sketch state has dtype {state['dtype']}, expected {want}")
        table = state["table"]
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != tuple(self.table.shape):
            shape = getattr(table, "shape", None)
            raise ValueError(f"count-sketch table has shape {shape}, expected {tuple(self.table.shape)}")
        if table.dtype != self.table.dtype:
            raise ValueError(f"count-sketch table dtype {table.dtype}, expected {self.table.dtype}")
        if not bool(torch.isfinite(table).all()):
            raise ValueError("count-sketch table contains NaN or Inf")
        self.table.copy_(table)
