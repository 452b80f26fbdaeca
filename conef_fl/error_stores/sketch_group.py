"""Several small one-row count sketches read and updated as one (the layer-wise fast path).

A layer-wise model has many small tensors (ResNet-18: 40 batch-norm vectors of 64–512
values), each with its own :class:`~conef_fl.error_stores.sketch.CountSketch`. Per tensor,
one sketch call is a handful of torch calls whose Python and dispatch overhead (tens of
microseconds) dwarfs the work. :class:`SketchGroup` lays the sketches side by side: their
tables concatenated (``R`` entries), their vectors concatenated (``N`` elements), and one
element-level sparse matrix ``Pᵀ`` (CSR, ``R × N``, one non-zero per element) that is the
block-diagonal union of every sketch's own ``Pᵀ``. One sparse product then updates every
table, one gathers the estimate at any set of elements.

Results are bit-identical to the per-sketch calls: every table entry sums the same terms in
the same order (the units of its bucket in hash-position order, through the same sparse
kernel), and a tail unit is added after that sum, as :meth:`CountSketch.accumulate_` does.
The structures are a pure function of the sketches' seeds and geometries and live in the
process-wide hash cache (``hash_cache_info`` counts them): about 16 bytes per element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conef_fl.error_stores.sketch import _CACHE, CountSketch, _arange_i32, _csr

__all__ = ["SketchGroup", "GROUP_MAX_NUMEL"]

#: Largest tensor (elements) that joins a group: larger ones are bandwidth-bound, and the
#: group's per-element structures (16 bytes an element) would cost more than they save.
GROUP_MAX_NUMEL = 1 << 16


class _GroupHash:
    """Element-level structures of a group (built once per seeds and geometries).

    ``pt``: ``Pᵀ`` over the full units of every sketch (CSR, rows = table entries in
    order, columns = elements; within a row the units in hash-position order).
    ``entry[j]`` / ``sign[j]``: table entry and sign of element ``j`` (tail units too).
    ``tail_elem`` / ``tail_entry`` / ``tail_sign``: the tail units' elements, added after ``pt``.
    """

    __slots__ = ("numel", "table_numel", "pt", "entry", "sign", "tail_elem", "tail_entry", "tail_sign", "nbytes")

    def __init__(self, sketches: Sequence[CountSketch]) -> None:
        rows, cols, vals, entries, signs = [], [], [], [], []
        t_elem: list[int] = []
        t_entry: list[int] = []
        t_sign: list[float] = []
        eo = to = 0
        for sk in sketches:
            g = sk.geometry
            h = sk._hashes()[0]
            m, f = g.unit, g.full_units
            ar = torch.arange(m, dtype=torch.int64)
            perm = h.perm.to(torch.int64)
            pos_entry = (h.ubucket.index_select(0, perm).to(torch.int64) * m).unsqueeze(1).add(ar).reshape(-1)
            order = torch.argsort(pos_entry, stable=True)  # by entry, then hash position (the kernel's order)
            rows.append(pos_entry.index_select(0, order).add_(to))
            cols.append(((perm * m).unsqueeze(1) + ar).reshape(-1).index_select(0, order).add_(eo))
            vals.append(h.sign.repeat_interleave(m).index_select(0, order))
            entries.append((h.ubucket.to(torch.int64) * m).unsqueeze(1).add(ar).reshape(-1).add_(to))
            signs.append(h.usign.repeat_interleave(m))
            if g.tail:
                t_elem += [eo + f * m + c for c in range(g.tail)]
                t_entry += [to + h.tail_bucket * m + c for c in range(g.tail)]
                t_sign += [h.tail_sign] * g.tail
                entries.append(torch.tensor(t_entry[-g.tail :], dtype=torch.int64))
                signs.append(torch.full((g.tail,), h.tail_sign, dtype=torch.float32))
            eo += g.numel
            to += g.table_numel
        self.numel, self.table_numel = eo, to
        row = torch.cat(rows)
        crow = torch.zeros(to + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(row, minlength=to), 0, out=crow[1:])
        self.pt = _csr(crow.to(torch.int32), torch.cat(cols).to(torch.int32), torch.cat(vals), (to, eo))
        self.entry = torch.cat(entries).to(torch.int32)
        self.sign = torch.cat(signs)
        self.tail_elem = torch.tensor(t_elem, dtype=torch.int64)
        self.tail_entry = torch.tensor(t_entry, dtype=torch.int64)
        self.tail_sign = torch.tensor(t_sign, dtype=torch.float32)
        parts = (self.pt.crow_indices(), self.pt.col_indices(), self.pt.values(), self.entry, self.sign,
                 self.tail_elem, self.tail_entry, self.tail_sign)
        self.nbytes = sum(t.numel() * t.element_size() for t in parts)


class SketchGroup:
    """Count sketches of several tensors, updated and read in a few torch calls.

    Parameters
    ----------
    sketches:
        One-row float32 CPU count sketches with equal ``estimate_scale`` (at least one).

    Raises
    ------
    ValueError
        If a sketch has more than one row, another table dtype or device, or the
        estimate scales differ.
    """

    def __init__(self, sketches: Sequence[CountSketch]) -> None:
        if not sketches:
            raise ValueError("a sketch group needs at least one sketch")
        for sk in sketches:
            if not self.eligible(sk):
                raise ValueError(
                    f"sketch (rows={sk.geometry.rows}, dtype={sk.table.dtype}, device={sk.table.device}) cannot join "
                    "a group; allowed: one row, float32 table, CPU"
                )
        scales = {sk.estimate_scale for sk in sketches}
        if len(scales) != 1:
            raise ValueError(f"sketches of a group need one estimate_scale, got {sorted(scales)}")
        self.sketches = list(sketches)
        self.estimate_scale = scales.pop()
        self._key = ("group",) + tuple((sk._row_seeds[0], sk.geometry) for sk in self.sketches)
        self._sizes = [sk.geometry.table_numel for sk in self.sketches]

    @staticmethod
    def eligible(sk: object) -> bool:
        """Whether ``sk`` can join a group: a one-row float32 count sketch on the CPU."""
        return (isinstance(sk, CountSketch) and sk.geometry.rows == 1 and sk.table.dtype == torch.float32
                and sk.table.device.type == "cpu")

    @property
    def numel(self) -> int:
        """Elements of all the group's vectors together."""
        return sum(sk.geometry.numel for sk in self.sketches)

    def _hash(self) -> _GroupHash:
        return _CACHE.get_or_build(self._key, lambda: _GroupHash(self.sketches))

    def tables(self) -> torch.Tensor:
        """The tables side by side (a new float32 vector of ``R`` entries)."""
        return torch.cat([sk.table.view(-1) for sk in self.sketches])

    def store_tables_(self, tables: torch.Tensor) -> None:
        """Write ``tables`` (as from :meth:`tables`) back into the sketches."""
        dst = [sk.table.view(-1) for sk in self.sketches]
        torch._foreach_copy_(dst, list(torch.split(tables, self._sizes)))

    def estimate_at_add_(self, target: torch.Tensor, tables: torch.Tensor, elements: torch.Tensor,
                         alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê[elements]`` (``elements``: int64 indices into the concatenated vectors).

        Computed as each sketch's own recovery computes it (one signed table entry per element).
        """
        k = elements.numel()
        if k == 0:
            return target
        h = self._hash()
        p = _csr(_arange_i32(k + 1, tables.device), h.entry.index_select(0, elements), h.sign.index_select(0, elements),
                 (k, h.table_numel))
        target.view(k, 1).addmm_(p, tables.view(-1, 1), alpha=alpha * self.estimate_scale)
        return target

    def accumulate_(self, tables: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``tables += CS(x)`` for the concatenated vectors ``x`` (float32, ``numel`` elements)."""
        h = self._hash()
        if x.numel() != h.numel:
            raise ValueError(f"x has {x.numel()} elements, the group expects {h.numel}")
        tables.view(-1, 1).addmm_(h.pt, x.view(-1, 1))
        if h.tail_elem.numel():  # after the full units, as CountSketch.accumulate_ adds its tail
            tables.index_add_(0, h.tail_entry, x.index_select(0, h.tail_elem).mul_(h.tail_sign))
        return tables
