"""Dense bit packing of small unsigned integers into ``uint8`` bytes.

``pack_bits(values, bits)`` stores ``numel`` values of ``bits`` bits each in
``ceil(numel * bits / 8)`` bytes: eight 1-bit values per byte, eight 6-bit
values in six bytes, and so on. The bit stream is little-endian: value ``i``
occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit
first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``.

Both directions work on chunks of :data:`CHUNK` values (a multiple of 8) using
``uint8`` arithmetic only, so no full-length ``int64`` temporary is ever made.
Tensors stay on the device of the input.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "bits_of_bytes_table", "pack_bits", "pack_mask_into", "packed_nbytes", "unpack_bits"]

#: Values processed per chunk (a multiple of 8, so chunks map to whole bytes).
CHUNK = 1 << 18
#: Bit positions of eight 1-bit values within a byte (the 1-bit fast path).
_SHIFT8 = torch.arange(8, dtype=torch.uint8)
#: Row ``b``: the eight bits of byte ``b``, least significant first (the 1-bit unpacking table).
_BITS_OF_BYTE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.uint8)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is out of range; allowed: integers 1..8")
    return bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` returns for ``numel`` values of ``bits`` bits."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel={numel!r} is out of range; allowed: >= 0")
    return (numel * bits + 7) // 8


def _layout(bits: int) -> list[tuple[int, int, bool]]:
    """For value ``i`` of a group of 8: (byte index, shift within the byte, spills into next byte)."""
    out = []
    for i in range(8):
        pos = i * bits
        byte, shift = divmod(pos, 8)
        out.append((byte, shift, shift + bits > 8))
    return out


def _pack_chunk(v: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack ``v`` (uint8, length a multiple of 8) into ``out`` (uint8, ``len(v) * bits / 8``)."""
    if bits == 8:
        out.copy_(v)
        return
    if bits == 1:  # eight values per byte in two kernels: shift into place, sum (the bits never overlap)
        torch.sum(v.view(-1, 8) << _SHIFT8.to(v.device), dim=1, dtype=torch.uint8, out=out)
        return
    groups = v.view(-1, 8)
    dst = out.view(-1, bits)
    dst.zero_()
    for i, (byte, shift, spill) in enumerate(_layout(bits)):
        col = groups[:, i]
        dst[:, byte] |= col << shift if shift else col
        if spill:
            dst[:, byte + 1] |= col >> (8 - shift)


def _unpack_chunk(b: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Inverse of :func:`_pack_chunk`: ``b`` holds ``len(out) * bits / 8`` bytes."""
    if bits == 8:
        out.copy_(b)
        return
    if bits == 1:  # one table lookup per byte
        torch.index_select(_BITS_OF_BYTE.to(b.device), 0, b.to(torch.int32), out=out.view(-1, 8))
        return
    src = b.view(-1, bits)
    dst = out.view(-1, 8)
    mask = (1 << bits) - 1
    for i, (byte, shift, spill) in enumerate(_layout(bits)):
        col = src[:, byte] >> shift if shift else src[:, byte].clone()
        if spill:
            col |= src[:, byte + 1] << (8 - shift)
        col &= mask
        dst[:, i] = col


def bits_of_bytes_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """A (256, 8) uint8 table: row ``b`` holds the bits of byte ``b``, least significant first."""
    return _BITS_OF_BYTE.to(device)


def pack_mask_into(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pack the flat bool ``mask`` (length a multiple of 8) into ``out`` (``len/8`` uint8 bytes).

    The layout of :func:`pack_bits` with ``bits=1``, without its checks and copies.
    """
    if mask.dtype != torch.bool or mask.numel() % 8 or out.dtype != torch.uint8 or out.numel() * 8 != mask.numel():
        raise ValueError(
            f"pack_mask_into needs a bool mask of 8·n values and n uint8 bytes, got {mask.numel()} "
            f"{mask.dtype} and {out.numel()} {out.dtype}"
        )
    torch.sum(mask.view(torch.uint8).view(-1, 8) << _SHIFT8.to(mask.device), dim=1, dtype=torch.uint8, out=out)
    return out


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` of ``bits`` bits each into a flat ``uint8`` tensor.

    Parameters
    ----------
    values:
        Integer (or bool) tensor of any shape; entries must lie in ``[0, 2**bits)``.
        It is read in flattened (row-major) order and never modified.
    bits:
        Bits per value, 1..8.

    Returns
    -------
    torch.Tensor
        ``uint8`` tensor of ``ceil(values.numel() * bits / 8)`` bytes on ``values.device``.

    Raises
    ------
    ValueError
        If ``bits`` is outside 1..8, ``values`` is not an integer tensor, or an
        entry is outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex():
        raise ValueError(f"values must be an integer or bool tensor, got dtype {values.dtype}")
    flat = values.reshape(-1)
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    hi = 1 << bits
    check = flat.dtype != torch.bool and not (flat.dtype == torch.uint8 and bits == 8)
    for lo in range(0, n, CHUNK):
        chunk = flat[lo : lo + CHUNK]
        if check:
            cmin, cmax = int(chunk.min()), int(chunk.max())
            if cmin < 0 or cmax >= hi:
                raise ValueError(
                    f"values must be in [0, 2**bits) = [0, {hi}) for bits={bits}, "
                    f"got entries in [{cmin}, {cmax}]"
                )
        c = chunk.numel()
        c8 = (c + 7) // 8 * 8
        if c8 == c:
            v = chunk.to(torch.uint8)
        else:
            v = torch.zeros(c8, dtype=torch.uint8, device=flat.device)
            v[:c] = chunk
        nbytes_full = c8 * bits // 8
        start = lo * bits // 8
        if c8 == c:
            _pack_chunk(v, bits, out[start : start + nbytes_full])
        else:  # the last, partial chunk: pack into scratch and keep only the needed bytes
            tmp = torch.empty(nbytes_full, dtype=torch.uint8, device=flat.device)
            _pack_chunk(v, bits, tmp)
            out[start:].copy_(tmp[: out.numel() - start])
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Unpack ``numel`` values of ``bits`` bits each from ``packed`` (inverse of :func:`pack_bits`).

    Parameters
    ----------
    packed:
        ``uint8`` tensor (any shape, read flattened) of at least ``ceil(numel * bits / 8)``
        bytes; extra trailing bytes are ignored.
    bits:
        Bits per value, 1..8.
    numel:
        Number of values to unpack (>= 0).

    Returns
    -------
    torch.Tensor
        Flat ``uint8`` tensor of ``numel`` values on ``packed.device``.

    Raises
    ------
    ValueError
        If ``bits`` is outside 1..8, ``numel`` is negative, ``packed`` is not
        ``uint8`` or is too short.
    """
    need = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    flat = packed.reshape(-1)
    if flat.numel() < need:
        raise ValueError(
            f"packed has {flat.numel()} bytes, too short for numel={numel} values of bits={bits}; "
            f"allowed: >= {need} bytes"
        )
    out = torch.empty(numel, dtype=torch.uint8, device=flat.device)
    for lo in range(0, numel, CHUNK):
        c = min(CHUNK, numel - lo)
        c8 = (c + 7) // 8 * 8
        start = lo * bits // 8
        nbytes_full = c8 * bits // 8
        if c8 == c:
            _unpack_chunk(flat[start : start + nbytes_full], bits, out[lo : lo + c])
        else:
            src = torch.zeros(nbytes_full, dtype=torch.uint8, device=flat.device)
            avail = min(nbytes_full, need - start)
            src[:avail] = flat[start : start + avail]
            tmp = torch.empty(c8, dtype=torch.uint8, device=flat.device)
            _unpack_chunk(src, bits, tmp)
            out[lo:].copy_(tmp[:c])
    return out
