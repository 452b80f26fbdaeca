"""Payloads ⇄ Flower records, in their wire dtypes.

One client reply carries an :class:`ArrayRecord` ``"payload"`` with one
:class:`Array` per wire array (key ``"<tensor>::<array>"``: int32 indices,
float16/float32 values, uint8 packed bits, exactly as the compressor produced
them; bfloat16 travels as its int16 bit pattern) and a :class:`ConfigRecord`
``"payload-meta"`` with the scalars (kind, seed, ``k``, ...).

Decoding checks every declared dtype and shape against the expected structure
*before* deserialising an array, so a hostile reply cannot make the server
allocate memory in proportion to a size it merely declares.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.constant import SType

from conef_fl.compressors.base import Payload
from conef_fl.validation import PayloadError, PayloadSpec, check_values, validate_structure

SEP = "::"
KIND = "__kind__"
BF16 = "__bf16__"

_TORCH_TO_NUMPY = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.bool: "bool",
}


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), True
    return t.numpy(), False


def encode_payloads(payloads: Mapping[str, Payload]) -> tuple[ArrayRecord, ConfigRecord]:
    """Records for a reply: wire arrays in an ArrayRecord, scalars in a ConfigRecord."""
    arrays: dict[str, Array] = {}
    meta: dict[str, int | float | str | bool] = {}
    for key, p in payloads.items():
        if SEP in key:
            raise ValueError(f"tensor name {key!r} must not contain {SEP!r}")
        meta[f"{key}{SEP}{KIND}"] = p.kind
        for name, t in p.arrays.items():
            arr, is_bf16 = _to_numpy(t)
            arrays[f"{key}{SEP}{name}"] = encode_array(arr)
            if is_bf16:
                meta[f"{key}{SEP}{BF16}{name}"] = True
        for mk, mv in p.meta.items():
            meta[f"{key}{SEP}{mk}"] = mv
    return ArrayRecord(arrays), ConfigRecord(meta)


@functools.lru_cache(maxsize=64)
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def encode_array(arr: np.ndarray) -> Array:
    """A Flower :class:`Array` of ``arr`` with exactly ``np.save``'s bytes, built with one allocation.

    ``Array.from_numpy_ndarray`` writes into a growing ``BytesIO`` and copies it out: about
    twice the array's bytes at its peak; this joins the cached header and the array's
    buffer into the final ``bytes`` directly (the server encodes every new model this way).
    """
    arr = np.ascontiguousarray(arr)
    header = _npy_header(str(arr.dtype), tuple(int(s) for s in arr.shape))
    data = b"".join((header, memoryview(arr).cast("B")))
    return Array(dtype=str(arr.dtype), shape=tuple(int(s) for s in arr.shape), stype=SType.NUMPY, data=data)


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The exact ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    from numpy.lib import format as npy_format

    bio = io.BytesIO()
    header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    try:
        npy_format.write_array_header_1_0(bio, header)
    except ValueError:  # header too long for version 1.0
        bio = io.BytesIO()
        npy_format.write_array_header_2_0(bio, header)
    return bio.getvalue()


def _read_npy(data: bytes, shape: tuple[int, ...], dtype: str, where: str) -> np.ndarray:
    """The array in ``data`` if it is exactly a C-ordered ``dtype``/``shape`` ``.npy``; else PayloadError.

    The bytes are compared with the header ``np.save`` writes for the expected dtype and
    shape and the body length is checked, *before* anything is allocated: ``numpy.load``
    on an in-memory buffer would allocate whatever a forged header declares. Anything
    else gets the slow path, which parses the header to say what is wrong.
    """
    header = _npy_header(dtype, shape)
    count = math.prod(shape)
    need = count * _itemsize(dtype)
    if len(data) == len(header) + need and data.startswith(header):
        return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape).copy()
    _explain_npy(data, shape, dtype, where)
    raise PayloadError(f"{where}: array bytes are not a plain C-ordered {dtype}{tuple(shape)} .npy")


def _explain_npy(data: bytes, shape: tuple[int, ...], dtype: str, where: str) -> None:
    """Raise a PayloadError saying how ``data`` differs from a ``dtype``/``shape`` ``.npy``."""
    from numpy.lib import format as npy_format

    bio = io.BytesIO(data)
    try:
        version = npy_format.read_magic(bio)
        if version == (1, 0):
            hshape, fortran, hdtype = npy_format.read_array_header_1_0(bio)
        elif version in ((2, 0), (3, 0)):
            hshape, fortran, hdtype = npy_format.read_array_header_2_0(bio)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:
        raise PayloadError(f"{where}: malformed array bytes ({exc})") from None
    if tuple(hshape) != tuple(shape) or str(hdtype) != dtype or fortran:
        raise PayloadError(
            f"{where}: array bytes declare {hdtype}{tuple(hshape)}{' fortran' if fortran else ''}, "
            f"expected {dtype}{tuple(shape)}"
        )
    body = len(data) - bio.tell()
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if body != need:
        raise PayloadError(f"{where}: array body is {body} bytes, {dtype}{tuple(shape)} needs {need}")


def _split(key: str, known: Mapping[str, object], what: str) -> tuple[str, str]:
    if SEP not in key:
        raise PayloadError(f"{what} key {key!r} is not of the form '<tensor>{SEP}<name>'")
    tensor, name = key.split(SEP, 1)
    if tensor not in known:
        raise PayloadError(f"{what} key {key!r} names an unknown tensor {tensor!r}")
    return tensor, name


def _shape_of(arr: Array) -> tuple[int, ...]:
    """``arr.shape`` as a tuple of ints (the Array's own tuple when it is one: no new tuple per array)."""
    shape = arr.shape
    if type(shape) is tuple and all(type(s) is int for s in shape):
        return shape
    return tuple(int(s) for s in shape)


def decode_payloads(
    arrays: ArrayRecord, meta: ConfigRecord, specs: Mapping[str, PayloadSpec]
) -> dict[str, Payload]:
    """Validate and decode a reply's payload records into one :class:`Payload` per tensor.

    Raises
    ------
    PayloadError
        On any unknown/missing tensor or array, wrong declared dtype/shape, wrong
        metadata, NaN/Inf values or out-of-range/duplicate indices.
    """
    grouped: dict[str, dict[str, Array]] = {k: {} for k in specs}
    for key, arr in arrays.items():
        tensor, name = _split(key, specs, "array")
        grouped[tensor][name] = arr
    metas: dict[str, dict[str, object]] = {k: {} for k in specs}
    bf16: dict[str, set[str]] = {k: set() for k in specs}
    kinds: dict[str, str] = {}
    for key, val in meta.items():
        tensor, name = _split(key, specs, "metadata")
        if name == KIND:
            kinds[tensor] = str(val)
        elif name.startswith(BF16):
            bf16[tensor].add(name[len(BF16) :])
        else:
            metas[tensor][name] = val
    out: dict[str, Payload] = {}
    for tensor, spec in specs.items():
        where = f"tensor {tensor!r}"
        if tensor not in kinds:
            raise PayloadError(f"{where}: missing from the reply")
        got, want = set(grouped[tensor]), set(spec.arrays)
        if got != want:
            raise PayloadError(f"{where}: arrays {sorted(got)}, expected {sorted(want)}")
        tensors: dict[str, torch.Tensor] = {}
        for name, aspec in spec.arrays.items():
            arr = grouped[tensor][name]
            want_np = "int16" if name in bf16[tensor] else _TORCH_TO_NUMPY.get(aspec.dtype, "?")
            if aspec.dtype == torch.bfloat16 and name not in bf16[tensor]:
                raise PayloadError(f"{where}: array {name!r} should be bfloat16 bits")
            if str(arr.dtype) != want_np:
                raise PayloadError(f"{where}: array {name!r} declares dtype {arr.dtype}, expected {want_np}")
            declared = _shape_of(arr)
            if len(declared) != len(aspec.shape) or any(
                (exp is not None and d != exp) or (exp is None and not 0 <= d <= aspec.max_dim)
                for d, exp in zip(declared, aspec.shape, strict=False)
            ):
                raise PayloadError(f"{where}: array {name!r} declares shape {declared}, expected {aspec.shape}")
            t = torch.from_numpy(_read_npy(arr.data, declared, want_np, f"{where}: array {name!r}"))
            if name in bf16[tensor]:
                t = t.view(torch.bfloat16)
            tensors[name] = t
        payload = Payload(kinds[tensor], spec.shape, tensors, metas[tensor])
        validate_structure(payload, spec, key=tensor)
        out[tensor] = payload
    check_values(out)  # NaN/Inf and indices of all tensors at once (the same checks as validate_payload)
    return out


class ReplyDecoder:
    """Decodes replies against one round's specs, with the structure checks compiled once.

    :meth:`decode` gives exactly what :func:`decode_payloads` gives and refuses exactly
    what it refuses. When a spec has no variable dimension (every Q but ATOMO), the
    expected reply is known in full: its array keys, each array's declared dtype, shape
    and ``.npy`` header, and its whole metadata record. A reply equal to that (one key-set
    and one dict comparison, then each array's declared dtype, shape, header and length)
    passes every structure check :func:`decode_payloads` makes. Anything else goes through
    :func:`decode_payloads`, which accepts it or says what is wrong.

    The arrays of such a reply are copied into one buffer per (array name, dtype) (all
    ``"values"`` of a reply side by side, all ``"indices"``, ...), and each payload's
    tensors are views of them; the value checks of
    :func:`~conef_fl.validation.check_values` then run once per buffer
    (:meth:`_values_ok`): NaN/Inf with one ``isfinite`` per float buffer, and all
    ``"indices"`` segments at once. Only when these fail does
    :func:`~conef_fl.validation.check_values` run, for the message that names the tensor.
    """

    def __init__(self, specs: Mapping[str, PayloadSpec]) -> None:
        self.specs = specs
        self._plan = _compile(specs)

    def decode(self, arrays: ArrayRecord, meta: ConfigRecord) -> dict[str, Payload]:
        """Validate and decode one reply (:class:`PayloadError` as :func:`decode_payloads`)."""
        return self.decode_sized(arrays, meta)[0]

    def decode_sized(self, arrays: ArrayRecord, meta: ConfigRecord) -> tuple[dict[str, Payload], int, int]:
        """:meth:`decode`, with the payloads' bytes (``Σ Payload.nbytes``) and the records' bytes.

        The records' bytes are ``arrays.count_bytes() + meta.count_bytes()`` (Flower's count);
        for a reply of the expected structure both sizes are known from the plan (each array's
        length is checked; of the metadata only the values that compare equal to 0 or 1 can
        differ in size: a ``bool`` counts 1 byte, a number 8).
        """
        decoded = self._decode_expected(arrays, meta) if self._plan is not None else None
        if decoded is None:
            out = decode_payloads(arrays, meta, self.specs)
            return out, sum(p.nbytes for p in out.values()), arrays.count_bytes() + meta.count_bytes()
        out, buffers = decoded
        if not self._values_ok(buffers):
            check_values(out)  # names the first bad tensor
            raise PayloadError("payload values are invalid (NaN/Inf or bad indices)")  # not reached
        plan = self._plan
        assert plan is not None
        if plan.meta_bytes is None:
            record_bytes = plan.array_bytes + meta.count_bytes()
        else:
            record_bytes = plan.array_bytes + plan.meta_bytes + sum(
                1 if isinstance(meta[k], bool) else 8 for k in plan.meta_01)
        return out, plan.payload_bytes, record_bytes

    def _decode_expected(
        self, arrays: ArrayRecord, meta: ConfigRecord
    ) -> tuple[dict[str, Payload], list[np.ndarray]] | None:
        """The payloads and their buffers if the reply is exactly the expected structure, else ``None``.

        Nothing is refused here: a reply that differs in anything goes to :func:`decode_payloads`.
        """
        plan = self._plan
        assert plan is not None
        if arrays.keys() != plan.keys or meta != plan.meta:
            return None
        buffers = [np.empty(count, dtype=dtype) for dtype, count in plan.buffers]
        items = plan.items
        for wire_key, arr in arrays.items():  # the keys are the plan's (checked above)
            np_dtype, arr_shape, header, nbytes, b, lo, hi = items[wire_key]
            data = arr.data
            if arr.dtype != np_dtype or (arr.shape != arr_shape and _shape_of(arr) != arr_shape) \
                    or len(data) != nbytes or not data.startswith(header):
                return None
            if hi > lo:
                buffers[b][lo:hi] = np.frombuffer(data, dtype=np_dtype, count=hi - lo, offset=len(header))
        return _payloads(plan, buffers), buffers

    def _values_ok(self, buffers: list[np.ndarray]) -> bool:
        """:func:`~conef_fl.validation.check_values`'s verdict on a reply decoded into ``buffers``.

        Float arrays: no NaN/Inf (float16/float32 buffers; a plan with float64 or bfloat16
        arrays, which ``check_values`` judges after a float32 conversion, asks it instead).
        ``"indices"`` segments: each in ``[0, numel)`` and strictly increasing exactly when
        every neighbour pair inside a segment increases, each segment's first index is
        ``>= 0`` and its last ``< numel``.
        """
        plan = self._plan
        assert plan is not None
        if plan.checks is None:
            return _checks_pass(plan, buffers)
        for b in plan.checks.floats:
            if not np.isfinite(buffers[b]).all():
                return False
        seg = plan.checks.indices
        if seg is not None:
            idx = buffers[seg.buffer]
            up = idx[1:] > idx[:-1]
            up[seg.joins] = True  # the pairs across two segments are not compared
            if not (up.all() and (idx[seg.firsts] >= 0).all() and (idx[seg.lasts] < seg.numels).all()):
                return False
        return True


def _payloads(plan: _Plan, buffers: list[np.ndarray]) -> dict[str, Payload]:
    """One :class:`Payload` per tensor whose arrays are views of ``buffers`` (one split per buffer)."""
    pieces = [torch.from_numpy(a).split_with_sizes(sizes) for a, sizes in zip(buffers, plan.splits, strict=True)]
    out: dict[str, Payload] = {}
    for tensor, kind, shape, tensor_meta, parts in plan.tensors:
        tensors: dict[str, torch.Tensor] = {}
        for name, b, j, arr_shape, bf16 in parts:
            t = pieces[b][j]
            if arr_shape is not None:
                t = t.view(arr_shape)
            tensors[name] = t.view(torch.bfloat16) if bf16 else t
        out[tensor] = Payload(kind, shape, tensors, dict(tensor_meta))
    return out


def _checks_pass(plan: _Plan, buffers: list[np.ndarray]) -> bool:
    """``check_values`` on the payloads of ``buffers`` (plans whose values the fused checks do not cover)."""
    try:
        check_values(_payloads(plan, buffers))
    except PayloadError:
        return False
    return True


def _meta_bytes(meta: Mapping[str, object]) -> tuple[int | None, list[str]]:
    """``ConfigRecord(meta).count_bytes()`` without the values equal to 0 or 1, and their keys.

    A value that compares equal to the expected one has the same size (an ``int`` and a
    ``float`` count 8 bytes, equal strings the same length) unless one is a ``bool`` (1 byte)
    and the other a number: possible only for 0 and 1. ``(None, [])`` if any value is not a
    plain scalar (each reply is then counted by Flower).
    """
    total, zero_one = 0, []
    for k, v in meta.items():
        total += len(k)
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (bool, int, float)):
            if v == 0 or v == 1:
                zero_one.append(k)
            else:
                total += 8
        else:
            return None, []
    return total, zero_one


class _Segments:
    """Where a reply's ``"indices"`` arrays lie in their buffer, for the batched index check."""

    __slots__ = ("buffer", "firsts", "lasts", "numels", "joins")

    def __init__(self, buffer: int, spans: list[tuple[int, int, int]]) -> None:
        spans = [(lo, hi, numel) for lo, hi, numel in spans if hi > lo]  # empty segments have nothing to check
        self.buffer = buffer
        self.firsts = np.array([lo for lo, _, _ in spans], dtype=np.intp)
        self.lasts = np.array([hi - 1 for _, hi, _ in spans], dtype=np.intp)
        self.numels = np.array([numel for _, _, numel in spans], dtype=np.int64)
        self.joins = self.lasts[:-1]  # index into the neighbour comparisons: last of one, first of the next


class _Checks:
    """The batched value checks of a plan: float buffers to test for NaN/Inf and the index segments."""

    __slots__ = ("floats", "indices")

    def __init__(self, floats: list[int], indices: _Segments | None) -> None:
        self.floats = floats
        self.indices = indices


class _Plan:
    """The exact structure of a reply: array keys, metadata record, and where each array goes.

    ``buffers``: (numpy dtype, length) per buffer; ``items``: per wire array key its dtype,
    shape, ``.npy`` header, total length and slot ``(buffer, lo, hi)``; ``splits``: per buffer
    the lengths of its arrays in order; ``tensors``: per tensor its kind, shape, metadata and
    arrays ``(name, buffer, position in the buffer's split, shape or None if 1-D, bfloat16)``;
    ``checks``: the batched value checks (``None``: :func:`~conef_fl.validation.check_values`).
    """

    __slots__ = ("keys", "meta", "tensors", "items", "buffers", "splits", "checks", "payload_bytes", "array_bytes",
                 "meta_bytes", "meta_01")

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.meta: dict[str, object] = {}
        self.tensors: list[tuple[str, str, tuple[int, ...], Mapping[str, object], list[tuple]]] = []
        self.items: dict[str, tuple] = {}
        self.buffers: list[tuple[str, int]] = []
        self.splits: list[list[int]] = []
        self.checks: _Checks | None = None
        #: ``Σ Payload.nbytes`` and ``ArrayRecord.count_bytes()`` of a reply of this structure
        self.payload_bytes = 0
        self.array_bytes = 0
        #: ``ConfigRecord.count_bytes()`` of ``meta`` without the values of the keys ``meta_01``
        #: (those equal to 0 or 1: a reply may send them as bool); ``None``: count each reply's
        self.meta_bytes: int | None = None
        self.meta_01: list[str] = []


def _compile(specs: Mapping[str, PayloadSpec]) -> _Plan | None:
    """The :class:`_Plan` of ``specs``; ``None`` if any array has a variable dimension or an unknown dtype."""
    plan = _Plan()
    slots: dict[tuple[str, str], int] = {}  # (array name, numpy dtype) -> buffer
    sizes: list[int] = []
    spans: dict[int, list[tuple[int, int, int]]] = {}  # buffer -> (lo, hi, numel) of "indices" arrays
    fused = True
    for tensor, spec in specs.items():
        if SEP in tensor:
            return None
        plan.meta[f"{tensor}{SEP}{KIND}"] = spec.kind
        for mk, mv in spec.meta.items():
            plan.meta[f"{tensor}{SEP}{mk}"] = mv
        parts = []
        for name, aspec in spec.arrays.items():
            if None in aspec.shape or aspec.dtype not in _TORCH_TO_NUMPY and aspec.dtype != torch.bfloat16:
                return None
            bf16 = aspec.dtype == torch.bfloat16
            np_dtype = "int16" if bf16 else _TORCH_TO_NUMPY[aspec.dtype]
            if bf16:
                plan.meta[f"{tensor}{SEP}{BF16}{name}"] = True
            if bf16 or aspec.dtype == torch.float64:
                fused = False  # check_values judges these after a float32 conversion
            shape = tuple(int(d) for d in aspec.shape)  # type: ignore[arg-type]
            count = math.prod(shape)
            b = slots.setdefault((name, np_dtype), len(slots))
            if b == len(sizes):
                sizes.append(0)
                plan.splits.append([])
            plan.splits[b].append(count)
            lo, hi = sizes[b], sizes[b] + count
            sizes[b] = hi
            if name == "indices":
                spans.setdefault(b, []).append((lo, hi, math.prod(spec.shape)))
            header = _npy_header(np_dtype, shape)
            wire_key = f"{tensor}{SEP}{name}"
            plan.keys.add(wire_key)
            nbytes = len(header) + count * _itemsize(np_dtype)
            plan.items[wire_key] = (np_dtype, shape, header, nbytes, b, lo, hi)
            plan.payload_bytes += count * (2 if bf16 else _itemsize(np_dtype))
            plan.array_bytes += nbytes + len(wire_key)
            parts.append((name, b, len(plan.splits[b]) - 1, None if shape == (count,) else shape, bf16))
        plan.tensors.append((tensor, spec.kind, spec.shape, spec.meta, parts))
    plan.buffers = [(dtype, sizes[b]) for (_, dtype), b in slots.items()]
    plan.meta_bytes, plan.meta_01 = _meta_bytes(plan.meta)
    if fused and len(spans) <= 1:
        floats = [b for (_, dtype), b in slots.items() if np.dtype(dtype).kind == "f"]
        indices = next((_Segments(b, s) for b, s in spans.items()), None)
        plan.checks = _Checks(floats, indices)
    return plan
