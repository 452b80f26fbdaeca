"""A count sketch that keeps no d-sized table and creates no d-sized temporary.

Design (the paper's *tensor trick*, Appendix G): the flat vector of ``d``
elements is viewed as ``n`` *units* of ``m`` contiguous elements (the last unit
may be shorter). Each sketch row ``r`` hashes whole units: unit ``i`` goes to
bucket ``h_r(i)`` with sign ``s_r(i)``, and the sketch keeps a table
``S[r] ∈ R^{W×m}``::

    S[r, h_r(i), :] += s_r(i) · x[i·m : (i+1)·m]
    ê[i·m : (i+1)·m] = median_r  s_r(i) · S[r, h_r(i), :]      (v = 1: a lookup)

Only ``n = d/m`` hashes are computed per row (Carter–Wegman hashing modulo the
Mersenne prime 2^31 − 1, seeded; never stored), so nothing of size ``d`` exists
besides the caller's own vectors. The sketch is linear: sketches with the same
seed and geometry can be added and averaged (error reset, all-reduce).

Kernels. Both scatter (sketch) and gather (recover) are products with a sparse
±1 matrix that has one non-zero per unit: ``S += Pᵀ X`` and ``X̂ = P S``
with ``P ∈ {0, ±1}^{n×W}``. For float32/float64 tables the products run as
sparse-CSR ``addmm_`` (one fused signed row-axpy per unit, no temporary: about
the cost of one ``add_`` over ``d`` floats). For float16/bfloat16 tables (which
sparse kernels do not support on CPU) a chunked ``index_add_``/``index_select``
path is used with a bounded scratch buffer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from conef_fl.errors.base import ErrorStore
from conef_fl.seeding import derive_seed

_PRIME = (1 << 31) - 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_SPARSE_DTYPES = (torch.float32, torch.float64)
#: Target number of buckets per sketch row when choosing the unit width.
_TARGET_BUCKETS = 1024
#: Largest unit width (elements hashed together).
_MAX_UNIT = 4096
#: Elements processed per chunk on the index path (256 KiB of float32 scratch).
_CHUNK_ELEMS = 1 << 16
#: Units per sparse-kernel call: bounds the hash/CSR temporaries (a few int64 per unit).
_UNIT_BLOCK = 16384
#: Coordinates per call of the per-coordinate (sparse) paths.
_SPARSE_CHUNK = 1 << 13


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
    def table_numel(self) -> int:
        """Entries in the sketch table."""
        return self.rows * self.buckets * self.unit

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


def _row_hash_params(seed: int, row: int) -> tuple[int, ...]:
    base = derive_seed(seed, "count-sketch", row)
    return tuple(derive_seed(base, j) % (_PRIME - 1) + 1 for j in range(6))


def _mix(i: torch.Tensor, a: int, b: int, c: int) -> torch.Tensor:
    """``F((a·i + b) mod p)``: a pairwise-independent affine hash followed by a fixed scrambler.

    Every product stays below 2^62, so int64 arithmetic never overflows on any device.
    The scrambler (xor-shifts and a modular multiply) breaks the arithmetic-progression
    pattern an affine hash leaves on consecutive unit indices.
    """
    x = (i * a + b).remainder_(_PRIME)
    x = x.bitwise_xor_(x >> 16).remainder_(_PRIME)
    x = (x * c).remainder_(_PRIME)
    return x.bitwise_xor_(x >> 13)


def unit_hashes(
    seed: int, row: int, buckets: int, lo: int, hi: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices (int64) and signs (±1 float32) of units ``lo..hi-1`` for hash row ``row``.

    Bucket and sign come from two independently seeded hashes
    ``F((a·i + b) mod p)`` with ``p = 2^31 − 1`` (see :func:`_mix`). Pure function
    of its arguments; nothing is stored.
    """
    a, b, c, d, e, f = _row_hash_params(seed, row)
    i = torch.arange(lo, hi, device=device, dtype=torch.int64)
    h = _mix(i, a, b, c).remainder_(buckets)
    s = _mix(i, d, e, f).bitwise_and_(1).mul_(-2).add_(1).to(torch.float32)
    return h, s


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

    @property
    def numel(self) -> int:  # type: ignore[override]
        """Length of the sketched vector."""
        return self.geometry.numel

    # ------------------------------------------------------------------ accounting
    @property
    def nbytes(self) -> int:
        """Bytes kept between steps: the table's storage (hash parameters are 4 Python ints per row)."""
        return self.table.untyped_storage().nbytes()

    def persistent_tensors(self) -> list[torch.Tensor]:
        """Every tensor this object keeps between calls."""
        return [self.table]

    # ------------------------------------------------------------------ kernels
    def _use_sparse(self) -> bool:
        return self.table.dtype in _SPARSE_DTYPES

    def _full_units(self) -> int:
        return self.geometry.numel // self.geometry.unit

    def _units_csr(self, row: int, lo: int, hi: int, transpose: bool) -> torch.Tensor:
        """Sparse CSR matrix mapping units ``lo..hi-1`` to buckets (``P``, or ``Pᵀ`` if transpose)."""
        g = self.geometry
        dev = self.table.device
        h, s = unit_hashes(self.seed, row, g.buckets, lo, hi, dev)
        n = hi - lo
        s = s.to(self.table.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not transpose:
                crow = torch.arange(n + 1, device=dev, dtype=torch.int64)
                return torch.sparse_csr_tensor(crow, h, s, size=(n, g.buckets), check_invariants=False)
            order = torch.argsort(h, stable=True)
            counts = torch.bincount(h, minlength=g.buckets)
            crow = torch.zeros(g.buckets + 1, device=dev, dtype=torch.int64)
            torch.cumsum(counts, 0, out=crow[1:])
            return torch.sparse_csr_tensor(
                crow, order, s.index_select(0, order), size=(g.buckets, n), check_invariants=False
            )

    def _chunks(self, lo_unit: int, hi_unit: int) -> Iterator[tuple[int, int]]:
        step = max(1, _CHUNK_ELEMS // self.geometry.unit)
        for lo in range(lo_unit, hi_unit, step):
            yield lo, min(hi_unit, lo + step)

    def _scatter_rows(self, x_units: torch.Tensor, lo: int, alpha: float) -> None:
        """table[r] += alpha · Pᵀ x_units for every row; ``x_units`` are units lo.. (2-D view)."""
        g = self.geometry
        hi = lo + x_units.shape[0]
        for r in range(g.rows):
            if self._use_sparse() and x_units.shape[1] == g.unit:
                for blo in range(lo, hi, _UNIT_BLOCK):
                    bhi = min(hi, blo + _UNIT_BLOCK)
                    pt = self._units_csr(r, blo, bhi, transpose=True)
                    self.table[r].addmm_(pt, x_units[blo - lo : bhi - lo].to(self.table.dtype), alpha=alpha)
                continue
            for clo, chi in self._chunks(lo, hi):
                h, s = unit_hashes(self.seed, r, g.buckets, clo, chi, self.table.device)
                xc = x_units[clo - lo : chi - lo]
                buf = xc.to(torch.float32) * (s * alpha).unsqueeze(1)
                width = xc.shape[1]
                if width == g.unit:
                    self.table[r].index_add_(0, h, buf.to(self.table.dtype))
                else:  # a partial unit: flat indices into the contiguous table (a strided 16-bit target
                    # would make index_add_ allocate a float32 copy of it)
                    idx = (h * g.unit).unsqueeze(1) + torch.arange(width, device=h.device)
                    self.table[r].view(-1).index_add_(0, idx.reshape(-1), buf.reshape(-1).to(self.table.dtype))

    def _gather_row(self, row: int, lo: int, hi: int, width: int) -> torch.Tensor:
        """Signed bucket contents of units lo..hi-1 for one row (float32, (hi-lo)×width)."""
        g = self.geometry
        h, s = unit_hashes(self.seed, row, g.buckets, lo, hi, self.table.device)
        out = self.table[row, :, :width].index_select(0, h).to(torch.float32)
        return out.mul_(s.unsqueeze(1))

    # ------------------------------------------------------------------ public API
    def accumulate_(self, x: torch.Tensor, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · CS(x)`` in place (x: any shape with ``numel`` elements; not modified)."""
        g = self.geometry
        flat = x.reshape(-1)
        if flat.numel() != g.numel:
            raise ValueError(f"x has {flat.numel()} elements, sketch expects {g.numel}")
        full = self._full_units()
        if full:
            self._scatter_rows(flat[: full * g.unit].view(full, g.unit), 0, alpha)
        tail = g.numel - full * g.unit
        if tail:
            self._scatter_rows(flat[full * g.unit :].view(1, tail), full, alpha)
        return self

    def accumulate_block_(self, values: torch.Tensor, start: int, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · CS(z)`` where ``z`` is zero except ``z[start:start+len(values)] = values``.

        Costs O(len(values)), in bounded chunks; used to subtract ``Δ`` on a block.
        """
        g = self.geometry
        k = values.numel()
        if start < 0 or start + k > g.numel:
            raise ValueError(f"block [{start}, {start + k}) outside [0, {g.numel})")
        vals = values.reshape(-1)
        m = g.unit
        first = min(-(-start // m), self._full_units())  # first unit starting inside the block
        last = max(first, min((start + k) // m, self._full_units()))  # units [first, last) lie inside
        if last > first:
            inner = vals[first * m - start : last * m - start].view(last - first, m)
            if inner.dtype != torch.float32:
                inner = inner.to(torch.float32)
            self._scatter_rows(inner, first, alpha)
            pieces = [(start, first * m), (last * m, start + k)]
        else:
            pieces = [(start, start + k)]
        for lo, hi in pieces:
            for c in range(lo, hi, _SPARSE_CHUNK):
                n = min(_SPARSE_CHUNK, hi - c)
                idx = torch.arange(c, c + n, device=self.table.device)
                self.accumulate_sparse_(idx, vals[c - start : c - start + n], alpha=alpha)
        return self

    def accumulate_sparse_(self, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> CountSketch:
        """``S ← S + alpha · CS(z)`` with ``z`` zero except ``z[indices] = values`` (O(k))."""
        g = self.geometry
        idx = indices.reshape(-1).to(device=self.table.device, dtype=torch.int64)
        vals = values.reshape(-1).to(device=self.table.device, dtype=torch.float32)
        if idx.numel() != vals.numel():
            raise ValueError(f"{idx.numel()} indices but {vals.numel()} values")
        if idx.numel() == 0:
            return self
        units = torch.div(idx, g.unit, rounding_mode="floor")
        cols = idx - units * g.unit
        lo, hi = int(units.min()), int(units.max()) + 1
        for r in range(g.rows):
            h, s = unit_hashes(self.seed, r, g.buckets, lo, hi, self.table.device)
            b = h.index_select(0, units - lo)
            sg = s.index_select(0, units - lo)
            flat = self.table[r].view(-1)
            flat.index_add_(0, b * g.unit + cols, (vals * sg * alpha).to(self.table.dtype))
        return self

    def estimate_add_(self, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê`` in place, chunk by chunk (``target``: numel elements, float)."""
        g = self.geometry
        flat = target.view(-1)
        if flat.numel() != g.numel:
            raise ValueError(f"target has {flat.numel()} elements, sketch expects {g.numel}")
        a = alpha * self.estimate_scale
        full = self._full_units()
        m = g.unit
        if g.rows == 1 and self._use_sparse() and flat.dtype == self.table.dtype and full:
            units = flat[: full * m].view(full, m)
            for blo in range(0, full, _UNIT_BLOCK):
                bhi = min(full, blo + _UNIT_BLOCK)
                p = self._units_csr(0, blo, bhi, transpose=False)
                units[blo:bhi].addmm_(p, self.table[0], alpha=a)
        else:
            for lo, hi in self._chunks(0, full):
                est = self._estimate_units(lo, hi, m)
                flat[lo * m : hi * m].view(hi - lo, m).add_(est.to(flat.dtype), alpha=a)
        tail = g.numel - full * m
        if tail:
            est = self._estimate_units(full, full + 1, tail)
            flat[full * m :].add_(est.view(-1).to(flat.dtype), alpha=a)
        return target

    def _estimate_units(self, lo: int, hi: int, width: int) -> torch.Tensor:
        """Unscaled estimate of units lo..hi-1 (float32, (hi-lo)×width), rows combined."""
        rows = self.geometry.rows
        if rows == 1:
            return self._gather_row(0, lo, hi, width)
        if self.combine == "mean":
            acc = self._gather_row(0, lo, hi, width)
            for r in range(1, rows):
                acc.add_(self._gather_row(r, lo, hi, width))
            return acc.div_(rows)
        if rows == 3:  # median of three with min/max (no sort, no stacking)
            a = self._gather_row(0, lo, hi, width)
            b = self._gather_row(1, lo, hi, width)
            c = self._gather_row(2, lo, hi, width)
            lo_ab = torch.minimum(a, b)
            torch.maximum(a, b, out=a)  # a := max(a, b)
            torch.minimum(a, c, out=a)  # a := min(max(a, b), c)
            return torch.maximum(lo_ab, a, out=a)
        stacked = torch.stack([self._gather_row(r, lo, hi, width) for r in range(rows)])
        return stacked.median(dim=0).values

    def estimate_at(self, indices: torch.Tensor) -> torch.Tensor:
        """ê at the given flat indices (float32, O(k·rows))."""
        g = self.geometry
        idx = indices.reshape(-1).to(device=self.table.device, dtype=torch.int64)
        if idx.numel() == 0:
            return torch.zeros(0, device=self.table.device)
        units = torch.div(idx, g.unit, rounding_mode="floor")
        cols = idx - units * g.unit
        lo, hi = int(units.min()), int(units.max()) + 1
        per_row = []
        for r in range(g.rows):
            h, s = unit_hashes(self.seed, r, g.buckets, lo, hi, self.table.device)
            b = h.index_select(0, units - lo)
            sg = s.index_select(0, units - lo)
            per_row.append(self.table[r].view(-1).index_select(0, b * g.unit + cols).to(torch.float32) * sg)
        if g.rows == 1:
            est = per_row[0]
        elif self.combine == "mean":
            est = torch.stack(per_row).mean(0)
        else:
            est = torch.stack(per_row).median(0).values
        return est.mul_(self.estimate_scale)

    def estimate_block(self, start: int, length: int) -> torch.Tensor:
        """ê on the contiguous range ``[start, start+length)`` (float32, O(length))."""
        g = self.geometry
        if start < 0 or length < 0 or start + length > g.numel:
            raise ValueError(f"range [{start}, {start + length}) outside [0, {g.numel})")
        out = torch.zeros(length, dtype=torch.float32, device=self.table.device)
        m = g.unit
        pos = start
        while pos < start + length:
            u0 = pos // m
            u1 = min(g.num_units, -(-(start + length) // m))
            u1 = min(u1, u0 + max(1, _CHUNK_ELEMS // m))
            full_end = min(u1, self._full_units())
            if full_end > u0:
                est = self._estimate_units(u0, full_end, m).view(-1)
                base = u0 * m
            else:  # the tail unit
                est = self._estimate_units(u0, u0 + 1, g.numel - u0 * m).view(-1)
                base = u0 * m
                full_end = u0 + 1
            lo = pos - base
            hi = min(est.numel(), start + length - base)
            out[pos - start : pos - start + hi - lo] = est[lo:hi]
            pos = base + hi
        return out.mul_(self.estimate_scale)

    def estimate_block_add_(self, target: torch.Tensor, start: int, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê[start : start + len(target)]``: whole units through the sparse kernel."""
        g = self.geometry
        flat = target.view(-1)
        k = flat.numel()
        if start < 0 or start + k > g.numel:
            raise ValueError(f"range [{start}, {start + k}) outside [0, {g.numel})")
        m, full = g.unit, self._full_units()
        first = min(-(-start // m), full)
        last = max(first, min((start + k) // m, full))
        pieces = [(start, start + k)]
        if last > first and g.rows == 1 and self._use_sparse() and flat.dtype == self.table.dtype:
            inner = flat[first * m - start : last * m - start].view(last - first, m)
            a = alpha * self.estimate_scale
            for blo in range(first, last, _UNIT_BLOCK):
                bhi = min(last, blo + _UNIT_BLOCK)
                inner[blo - first : bhi - first].addmm_(self._units_csr(0, blo, bhi, transpose=False), self.table[0],
                                                        alpha=a)
            pieces = [(start, first * m), (last * m, start + k)]
        for lo, hi in pieces:
            for c in range(lo, hi, _SPARSE_CHUNK):
                n = min(_SPARSE_CHUNK, hi - c)
                est = self.estimate_at(torch.arange(c, c + n, device=self.table.device))
                flat[c - start : c - start + n].add_(est.to(flat.dtype), alpha=alpha)
        return target

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
        only on its own columns). Returns False (nothing done) when ``rows > 1``,
        where ``CS(median)`` has no closed form.
        """
        g = self.geometry
        if g.rows != 1:
            return False
        c = coeff * self.estimate_scale
        full = self._full_units()
        h, _ = unit_hashes(self.seed, 0, g.buckets, 0, g.num_units, self.table.device)
        load = torch.bincount(h[:full], minlength=g.buckets).to(torch.float32)
        factor = 1.0 - c * load
        tail = g.numel - full * g.unit
        if tail:  # the tail unit adds load only on the first `tail` columns of its bucket
            b = int(h[full])
            self.table[0, b, :tail].mul_(1.0 - c * (float(load[b]) + 1.0))
            self.table[0, b, tail:].mul_(float(factor[b]))
            factor[b] = 1.0
        self.table[0].mul_(factor.to(self.table.dtype).unsqueeze(1))
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
            "table": self.table,
            "seed": self.seed,
            "numel": g.numel,
            "rows": g.rows,
            "buckets": g.buckets,
            "unit": g.unit,
            "dtype": _DTYPE_NAMES[self.table.dtype],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Load a table saved by :meth:`state_dict`, validating seed, geometry and dtype."""
        missing = {"table", "seed", "numel", "rows", "buckets", "unit", "dtype"} - set(state)
        if missing:
            raise ValueError(f"count-sketch state is missing keys {sorted(missing)}")
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
