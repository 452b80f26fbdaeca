"""Top-k: the ``k`` entries of largest magnitude, sent as int32 indices and values.

For large tensors (at least :data:`FAST_MIN_NUMEL` elements, ``k <= d/4``) the
selection streams over the input in chunks and never holds anything of size
``d``: ``torch.topk`` over all entries is slow (279 ms at d = 10M on the
project's CPU) and its ``|x|`` copy alone is as large as the input.

1. A magnitude ``t0`` a little below the k-th largest ``|x|`` is estimated from
   a strided sample (about 64K entries); pass 1 counts the entries ``|x| >= t0``
   (a few % more than k).
2. Pass 2 writes those candidates (indices and values) in index order into
   arrays of exactly that count; a radix select on their float bit patterns
   (non-negative floats order like their int32 bits) gives the exact k-th largest
   value ``t`` and how many entries equal to ``t`` belong to the top k; a stable
   in-place compaction keeps exactly k and the arrays' storage is shrunk to k.
3. If the sample misled (fewer than k, or far more candidates) the radix select
   streams over the whole input instead (three histogram passes) and a last pass
   collects exactly the k entries.

The result is exactly a set of ``k`` largest ``|x|`` (ties broken towards lower
indices), indices sorted ascending. Beyond the payload: the candidates past k
(a few % of k), the 64K-entry sample and chunks of ``d/256`` elements (about
1 % of ``4·d`` bytes at d = 10M, k = 1 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from conef_fl.compressors.base import Compressor, DecompressByAdding, KeepsRatio, Payload, flat_target

__all__ = ["FAST_MIN_NUMEL", "TopK", "topk_indices", "topk_select"]

#: Tensors at least this large use the streaming selection.
FAST_MIN_NUMEL = 1 << 18
_INT32_MAX = 2**31 - 1
#: Entries of the strided sample that estimates the threshold.
_SAMPLE = 1 << 16
#: Radix-select levels over the 31 bits of a non-negative float32 pattern: (shift, bits).
_LEVELS = ((20, 11), (10, 10), (0, 10))
#: Most candidates beyond k that pass 2 collects (in units of k, plus 1024); else the radix streams.
_SLACK = 0.3
#: Candidates per chunk when ranking and compacting them (most are kept: bounds the temporaries).
_CAND_CHUNK = 1 << 13


def _chunk_size(d: int) -> int:
    """Elements per chunk of the streaming passes: ``d/256`` within [16K, 256K]."""
    return max(1 << 14, min(1 << 18, d // 256))


def _magnitudes(chunk: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``|chunk|`` as float32, written into ``scratch``."""
    a = scratch[: chunk.numel()]
    if chunk.dtype == torch.float32:
        torch.abs(chunk, out=a)
    else:
        a.copy_(chunk).abs_()
    return a


def _radix_select(bit_chunks: Callable[[], Iterator[torch.Tensor]], need: int) -> tuple[int, int]:
    """Bit pattern of the ``need``-th largest value and how many entries equal to it are needed.

    ``bit_chunks()`` yields the int32 bit patterns of all values (non-negative
    floats), chunk by chunk; it is called once per level.
    """
    prefix, prefix_shift = None, 31
    for shift, width in _LEVELS:
        bins = 1 << width
        counts = torch.zeros(bins, dtype=torch.int64)
        for bits in bit_chunks():
            if prefix is not None:
                bits = bits[(bits >> prefix_shift) == prefix]
            if bits.numel():
                counts += torch.bincount(((bits >> shift) & (bins - 1)).cpu(), minlength=bins)
        above = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,))  # entries in bins >= b
        b = int(torch.nonzero(above >= need).max())
        need -= int(above[b + 1]) if b + 1 < bins else 0
        prefix = b if prefix is None else (prefix << width) | b
        prefix_shift = shift
    assert prefix is not None
    return prefix, need


def _threshold_from_sample(flat: torch.Tensor, k: int) -> float:
    """A magnitude ``t0`` with ``k <= #{|x| >= t0} <= k·(1 + a few %)`` w.h.p., from a strided sample."""
    d = flat.numel()
    step = max(1, d // _SAMPLE)
    sample = flat[::step].abs()
    s = sample.numel()
    expect = k / d * s
    rank = min(s, max(1, int(math.ceil(expect + 3.0 * math.sqrt(expect) + 4))))
    return float(torch.topk(sample, rank, sorted=False).values.min())


def _as_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _collect(flat: torch.Tensor, above: Callable[[torch.Tensor], torch.Tensor], n: int, chunk: int,
             value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32, ascending) and values of the ``n`` entries where ``above(|x|)`` holds."""
    idx = torch.empty(n, dtype=torch.int32, device=flat.device)
    val = torch.empty(n, dtype=value_dtype, device=flat.device)
    scratch = torch.empty(min(chunk, flat.numel()), dtype=torch.float32, device=flat.device)
    w = 0
    for lo in range(0, flat.numel(), chunk):
        piece = flat[lo : lo + chunk]
        loc = above(_magnitudes(piece, scratch)).nonzero().squeeze(1)
        m = loc.numel()
        if m:
            idx[w : w + m] = loc + lo
            val[w : w + m] = piece.index_select(0, loc)
            w += m
    if w != n:  # cannot happen for finite input: NaN magnitudes compare false everywhere
        raise ValueError(f"top-k collected {w} entries instead of {n}: the input has NaN")
    return idx, val


def _keep_mask(a: torch.Tensor, t: float, ties: list[int]) -> torch.Tensor:
    """``a > t``, plus the first ``ties[0]`` entries equal to ``t`` (decremented in place)."""
    keep = a > t
    if ties[0]:
        eq = (a == t).nonzero().squeeze(1)
        if eq.numel():
            keep[eq[: ties[0]]] = True
            ties[0] -= min(ties[0], eq.numel())
    return keep


def _compact_(flat: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, t: float, ties: int, chunk: int) -> None:
    """Keep, in place and in order, the candidates with ``|x| > t`` and the first ``ties`` equal to ``t``."""
    left = [ties]
    w = 0
    for lo in range(0, idx.numel(), chunk):  # writes never pass reads
        a = flat.index_select(0, idx[lo : lo + chunk]).to(torch.float32).abs_()
        loc = _keep_mask(a, t, left).nonzero().squeeze(1)
        m = loc.numel()
        if m:
            keep_idx = idx[lo : lo + chunk].index_select(0, loc)
            keep_val = val[lo : lo + chunk].index_select(0, loc)
            idx[w : w + m] = keep_idx
            val[w : w + m] = keep_val
            w += m


def _shrink_(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` entries of the 1-D ``t`` with storage for exactly ``n`` (no second copy held)."""
    t.untyped_storage().resize_(n * t.element_size())
    return t.as_strided((n,), (1,), 0)


def topk_select(flat: torch.Tensor, k: int, value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32, sorted ascending) and values (``value_dtype``) of ``k`` largest ``|flat|``.

    Exact; ties are broken towards lower indices. Streams in chunks (no ``d``-sized
    temporary) when ``flat`` has at least :data:`FAST_MIN_NUMEL` elements and ``k <= d/4``.
    """
    d = flat.numel()
    dev = flat.device
    if k <= 0:
        return torch.empty(0, dtype=torch.int32, device=dev), torch.empty(0, dtype=value_dtype, device=dev)
    if d < FAST_MIN_NUMEL or k > d // 4:
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        return idx.to(torch.int32), flat.index_select(0, idx).to(value_dtype)
    chunk = _chunk_size(d)
    scratch = torch.empty(min(chunk, d), dtype=torch.float32, device=dev)
    t0 = _threshold_from_sample(flat, k)
    count = 0
    for lo in range(0, d, chunk):  # pass 1: how many reach t0 (a count: no compaction)
        count += int((_magnitudes(flat[lo : lo + chunk], scratch) >= t0).sum())
    if k <= count <= k + int(_SLACK * k) + 1024:
        # pass 2: every entry >= t0, in index order; then the exact k-th largest among them
        idx, val = _collect(flat, lambda a: a >= t0, count, chunk, value_dtype)

        def cand_bits() -> Iterator[torch.Tensor]:  # magnitudes from the input (exact, whatever the wire dtype)
            for lo in range(0, count, _CAND_CHUNK):
                yield flat.index_select(0, idx[lo : lo + _CAND_CHUNK]).to(torch.float32).abs_().view(torch.int32)

        t_bits, ties = _radix_select(cand_bits, k)
        del scratch
        _compact_(flat, idx, val, _as_float(t_bits), ties, _CAND_CHUNK)
        return _shrink_(idx, k), _shrink_(val, k)

    # the sample misled: radix select streaming over the whole input (bounded memory, more passes)
    def stream() -> Iterator[torch.Tensor]:
        for lo in range(0, d, chunk):
            yield _magnitudes(flat[lo : lo + chunk], scratch).view(torch.int32)

    t_bits, ties = _radix_select(stream, k)
    t, left = _as_float(t_bits), [ties]
    return _collect(flat, lambda a: _keep_mask(a, t, left), k, chunk, value_dtype)


def topk_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, sorted ascending) of ``k`` largest entries of the flat, non-negative ``magnitude``."""
    d = magnitude.numel()
    if k >= d:
        return torch.arange(d, dtype=torch.int64, device=magnitude.device)
    idx, _ = topk_select(magnitude.reshape(-1), k, magnitude.dtype)
    return idx.to(torch.int64)


class TopK(DecompressByAdding, KeepsRatio, Compressor):
    """Top-k: ``k`` int32 indices + ``k`` values of largest ``|x|``. Contractive (``delta = 1 - k/d``).

    Not all-reducible: workers pick different coordinates, the receiver sums
    sparse vectors (:meth:`decompress_add_` adds them without a dense temporary).
    Parameters: ``ratio`` (default 0.01) and ``value_dtype`` (:class:`~conef_fl.compressors.base.KeepsRatio`).
    """

    name = "top-k"
    contractive = True

    def __init__(self, ratio: float = 0.01, value_dtype: str = "float32") -> None:
        super().__init__(ratio, value_dtype)

    @torch.no_grad()
    def compress(self, x: torch.Tensor, *, seed: int = 0, key: str = "") -> Payload:
        """Pick the ``k`` largest ``|x|`` (deterministic; ``seed`` and ``key`` are unused)."""
        flat = x.reshape(-1)
        d = flat.numel()
        if d > _INT32_MAX:
            raise ValueError(f"tensor has {d} elements; top-k's int32 indices allow at most {_INT32_MAX}")
        k = self.k_for(d)
        if k >= d:
            idx = torch.arange(d, dtype=torch.int32, device=flat.device)
            values = flat.to(self._dtype, copy=True)
        else:
            idx, values = topk_select(flat, k, self._dtype)
        arrays = {"indices": idx, "values": values}
        return Payload(
            self.name, tuple(int(s) for s in x.shape), arrays, {"k": k, "value_dtype": self.value_dtype}
        )

    def payload_structure(self, shape: tuple[int, ...], *, seed: int = 0, key: str = "") -> Payload:
        """What :meth:`compress` sends for ``shape`` (arrays as stride-0 views: no selection is run)."""
        d = math.prod(shape)
        if d > _INT32_MAX:
            raise ValueError(f"tensor has {d} elements; top-k's int32 indices allow at most {_INT32_MAX}")
        k = self.k_for(d)
        n = d if k >= d else k
        arrays = {"indices": torch.zeros((), dtype=torch.int32).expand(n),
                  "values": torch.zeros((), dtype=self._dtype).expand(n)}
        return Payload(self.name, tuple(int(s) for s in shape), arrays, {"k": k, "value_dtype": self.value_dtype})

    def _check(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.kind != self.name:
            raise ValueError(f"payload kind {payload.kind!r} does not match compressor {self.name!r}")
        idx, values = payload.arrays["indices"], payload.arrays["values"]
        k = self.k_for(payload.numel)
        if idx.dtype != torch.int32 or idx.numel() != k or values.numel() != k:
            raise ValueError(
                f"top-k payload has {idx.numel()} {idx.dtype} indices and {values.numel()} values; "
                f"expected {k} int32 indices and values for shape {payload.shape}"
            )
        if k:
            a = idx.numpy() if idx.device.type == "cpu" else idx  # numpy: no torch call per reduction
            if int(a.min()) < 0 or int(a.max()) >= payload.numel:
                raise ValueError(f"top-k indices out of range [0, {payload.numel})")
        return idx, values

    def decompress_add_(self, payload: Payload, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha * Q(x)`` touching only the ``k`` sent entries (int32 indices, chunked)."""
        idx, values = self._check(payload)
        flat = flat_target(payload, target)
        step = 1 << 16
        if idx.numel() <= step and idx.device == flat.device and values.dtype == flat.dtype:
            flat.index_add_(0, idx, values, alpha=alpha)  # one call (a server adds many small payloads)
            return target
        for lo in range(0, idx.numel(), step):
            i = idx[lo : lo + step].to(flat.device)
            flat.index_add_(0, i, values[lo : lo + step].to(flat.device, flat.dtype), alpha=alpha)
        return target

    def expected_nbytes(self, shape: tuple[int, ...]) -> int:
        """``k * (4 + value size)`` bytes."""
        k = self.k_for(math.prod(shape))
        return k * (4 + torch.empty((), dtype=self._dtype).element_size())
