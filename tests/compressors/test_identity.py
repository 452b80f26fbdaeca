"""conef_fl.compressors.identity."""

from __future__ import annotations

import torch

from conef_fl.compressors import (
    Identity,
)

from .helpers import randn


def test_identity_payload_does_not_alias_input() -> None:
    x = randn(10)
    p = Identity().compress(x)
    x.add_(1.0)
    assert not torch.equal(p.arrays["values"], x)
