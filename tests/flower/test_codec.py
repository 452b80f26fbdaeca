"""codec.encode_array: the bytes np.save writes, built with one allocation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from conef_fl.flower.codec import encode_array


@pytest.mark.parametrize("arr", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.zeros((0,), np.int32),
    np.arange(7, dtype=np.uint8),
    np.linspace(-1, 1, 5, dtype=np.float16),
    np.ones((), np.float32),
    np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],  # not contiguous
])
def test_encode_array_equals_flowers_own_encoding(arr: np.ndarray) -> None:
    ours, theirs = encode_array(arr), Array.from_numpy_ndarray(np.ascontiguousarray(arr))
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (theirs.dtype, theirs.shape, theirs.stype, theirs.data)
    np.testing.assert_array_equal(ours.numpy(), arr)
