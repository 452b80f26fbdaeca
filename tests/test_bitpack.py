"""conef_fl.bitpack: the bit packer's round trip, layout and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conef_fl.bitpack import CHUNK, pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 1001, CHUNK + 5])
def test_bitpack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out.to(torch.int64), values)


def test_bitpack_layout_matches_numpy_and_is_dense() -> None:
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.uint8)
    ref = np.packbits(bits.numpy(), bitorder="little")
    assert np.array_equal(pack_bits(bits, 1).numpy(), ref)
    # eight 6-bit values of all ones fill exactly six bytes of 0xFF
    assert pack_bits(torch.full((8,), 63, dtype=torch.int32), 6).tolist() == [255] * 6
    assert pack_bits(torch.tensor([True, False, True]), 1).tolist() == [0b101]


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bitpack_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_bitpack_bad_values_and_short_buffer() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="values"):
        pack_bits(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="too short"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)  # needs 3 bytes
