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
    passes every structure check :func:`decode_payloads` makes; its values then get the
    same :func:`~conef_fl.validation.check_values`. Anything else goes through
    :func:`decode_payloads`, which accepts it or says what is wrong.
    """

    def __init__(self, specs: Mapping[str, PayloadSpec]) -> None:
        self.specs = specs
        self._plan = _compile(specs)

    def decode(self, arrays: ArrayRecord, meta: ConfigRecord) -> dict[str, Payload]:
        """Validate and decode one reply (:class:`PayloadError` as :func:`decode_payloads`)."""
        out = self._decode_expected(arrays, meta) if self._plan is not None else None
        if out is None:
            return decode_payloads(arrays, meta, self.specs)
        check_values(out)
        return out

    def _decode_expected(self, arrays: ArrayRecord, meta: ConfigRecord) -> dict[str, Payload] | None:
        """The payloads if the reply is exactly the expected structure, else ``None`` (nothing refused here)."""
        plan = self._plan
        assert plan is not None
        if arrays.keys() != plan.keys or meta != plan.meta:
            return None
        out: dict[str, Payload] = {}
        for tensor, kind, shape, tensor_meta, items in plan.tensors:
            tensors: dict[str, torch.Tensor] = {}
            for name, wire_key, np_dtype, arr_shape, header, nbytes, bf16 in items:
                arr = arrays[wire_key]
                data = arr.data
                if arr.dtype != np_dtype or _shape_of(arr) != arr_shape or len(data) != nbytes \
                        or not data.startswith(header):
                    return None
                a = np.frombuffer(data, dtype=np_dtype, offset=len(header)).reshape(arr_shape).copy()
                t = torch.from_numpy(a)
                tensors[name] = t.view(torch.bfloat16) if bf16 else t
            out[tensor] = Payload(kind, shape, tensors, dict(tensor_meta))
        return out


class _Plan:
    """The exact structure of a reply: array keys, metadata record, per tensor its arrays' wire form."""

    __slots__ = ("keys", "meta", "tensors")

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.meta: dict[str, object] = {}
        self.tensors: list[tuple[str, str, tuple[int, ...], Mapping[str, object], list[tuple]]] = []


def _compile(specs: Mapping[str, PayloadSpec]) -> _Plan | None:
    """The :class:`_Plan` of ``specs``; ``None`` if any array has a variable dimension or an unknown dtype."""
    plan = _Plan()
    for tensor, spec in specs.items():
        if SEP in tensor:
            return None
        plan.meta[f"{tensor}{SEP}{KIND}"] = spec.kind
        for mk, mv in spec.meta.items():
            plan.meta[f"{tensor}{SEP}{mk}"] = mv
        items = []
        for name, aspec in spec.arrays.items():
            if None in aspec.shape or aspec.dtype not in _TORCH_TO_NUMPY and aspec.dtype != torch.bfloat16:
                return None
            bf16 = aspec.dtype == torch.bfloat16
            np_dtype = "int16" if bf16 else _TORCH_TO_NUMPY[aspec.dtype]
            if bf16:
                plan.meta[f"{tensor}{SEP}{BF16}{name}"] = True
            shape = tuple(int(d) for d in aspec.shape)  # type: ignore[arg-type]
            header = _npy_header(np_dtype, shape)
            wire_key = f"{tensor}{SEP}{name}"
            plan.keys.add(wire_key)
            items.append((name, wire_key, np_dtype, shape, header,
                          len(header) + math.prod(shape) * _itemsize(np_dtype), bf16))
        plan.tensors.append((tensor, spec.kind, spec.shape, spec.meta, items))
    return plan

