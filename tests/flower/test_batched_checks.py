"""The batched value checks of a reply and the server's fast decode paths (issue #13, server aggregation).

Every value check that :func:`validate_payload` makes per tensor is made once per reply by
:func:`check_values`; these tests pin that both refuse exactly the same payloads with the same
message, and that the numpy path of the scaled-sign decode adds exactly what the torch path adds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conef_fl.compressors import make_compressor
from conef_fl.compressors.base import Payload
from conef_fl.compressors.sign import _add_signs_numpy
from conef_fl.validation import PayloadError, check_values, expected_spec, validate_payload

SHAPES = {"a": (40,), "b": (7, 9), "c": (1,), "d": (300,)}


def _topk_payloads(seed: int = 0) -> dict[str, Payload]:
    q = make_compressor("top-k", ratio=0.2)
    g = torch.Generator().manual_seed(seed)
    return {k: q.compress(torch.randn(s, generator=g)) for k, s in SHAPES.items()}


def _per_tensor_error(payloads: dict[str, Payload]) -> str | None:
    """The message of the first tensor that validate_payload refuses (None: all pass)."""
    q = make_compressor("top-k", ratio=0.2)
    for key, p in payloads.items():
        try:
            validate_payload(p, expected_spec(q, p.shape, seed=0, key=key), key=key)
        except PayloadError as exc:
            return str(exc)
    return None


def _batched_error(payloads: dict[str, Payload]) -> str | None:
    try:
        check_values(payloads)
    except PayloadError as exc:
        return str(exc)
    return None


def _with(payloads: dict[str, Payload], key: str, name: str, t: torch.Tensor) -> dict[str, Payload]:
    out = dict(payloads)
    p = payloads[key]
    out[key] = Payload(p.kind, p.shape, {**p.arrays, name: t}, dict(p.meta))
    return out


def test_honest_reply_passes_both() -> None:
    payloads = _topk_payloads()
    assert _per_tensor_error(payloads) is None
    assert _batched_error(payloads) is None


@pytest.mark.parametrize("key", list(SHAPES))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_value_is_refused_naming_the_tensor(key: str, bad: str) -> None:
    payloads = _topk_payloads()
    v = payloads[key].arrays["values"].clone()
    v[-1] = float(bad)
    payloads = _with(payloads, key, "values", v)
    msg = _batched_error(payloads)
    assert msg is not None and f"tensor {key!r}" in msg and "NaN or Inf" in msg
    assert msg == _per_tensor_error(payloads)


@pytest.mark.parametrize("key", list(SHAPES))
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("value", ["numel", "-1", "dup", "swap"])
def test_bad_indices_are_refused_naming_the_tensor(key: str, where: str, value: str) -> None:
    payloads = _topk_payloads()
    idx = payloads[key].arrays["indices"].clone()
    numel = math.prod(SHAPES[key])
    i = 0 if where == "first" else idx.numel() - 1
    if value == "numel":
        idx[i] = numel  # one past the end: lands on the next tensor's range after the shift
    elif value == "-1":
        idx[i] = -1  # lands on the previous tensor's range after the shift
    elif value == "dup":
        if idx.numel() < 2:
            pytest.skip("one index only")
        idx[i] = idx[1] if i == 0 else idx[i - 1]
    else:
        if idx.numel() < 2:
            pytest.skip("one index only")
        j = 1 if i == 0 else i - 1
        idx[i], idx[j] = idx[j].clone(), idx[i].clone()
    payloads = _with(payloads, key, "indices", idx)
    msg = _batched_error(payloads)
    assert msg is not None and f"tensor {key!r}" in msg
    assert msg == _per_tensor_error(payloads)


def test_int32_extremes_do_not_wrap() -> None:
    payloads = _topk_payloads()
    for extreme in (2**31 - 1, -(2**31)):
        idx = payloads["b"].arrays["indices"].clone()
        idx[0] = extreme
        assert _batched_error(_with(payloads, "b", "indices", idx)) is not None


def test_random_mutations_agree_with_per_tensor_validation() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        payloads = _topk_payloads(trial)
        key = list(SHAPES)[trial % len(SHAPES)]
        idx = payloads[key].arrays["indices"].clone()
        j = int(rng.integers(idx.numel()))
        idx[j] = int(rng.integers(-3, math.prod(SHAPES[key]) + 3))
        mutated = _with(payloads, key, "indices", idx)
        assert _batched_error(mutated) == _per_tensor_error(mutated), trial


@pytest.mark.parametrize("d", [1, 7, 8, 9, 8191, 8192, 70001])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37, 1e-30])
def test_sign_numpy_path_adds_exactly_what_the_torch_path_adds(d: int, alpha: float) -> None:
    g = torch.Generator().manual_seed(d)
    q = make_compressor("scaled-sign")
    p = q.compress(torch.randn(d, generator=g))
    base = torch.randn(d, generator=g)
    fast = base.clone()
    q.decompress_add_(p, fast, alpha=alpha)  # contiguous float32 CPU: the numpy path
    # the torch path's arithmetic: add_ of ±1 with alpha = scale·alpha
    pm = torch.from_numpy(np.unpackbits(p.arrays["signs"].numpy(), bitorder="little")[:d].astype(np.float32))
    ref = base.clone().add_(pm.mul_(2).sub_(1), alpha=float(p.arrays["scale"]) * alpha)
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


def test_sign_numpy_helper_matches_torch_on_strided_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=g)
    flat = torch.randn(40000, generator=g)
    ref = flat.clone()
    pm = torch.from_numpy(np.unpackbits(signs.numpy(), bitorder="little").astype(np.float32)).mul_(2).sub_(1)
    ref.add_(pm, alpha=0.123)
    _add_signs_numpy(signs, flat, 0.123)
    assert torch.equal(flat, ref)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("top-k", {}), ("top-k", {"ratio": 1.0}), ("top-k", {"ratio": 0.3, "value_dtype": "bfloat16"}),
    ("scaled-sign", {}), ("random-block-k", {}), ("random-k", {}), ("qsgd", {}), ("identity", {})])
def test_payload_structure_gives_the_spec_of_a_real_compression(name: str, kwargs: dict) -> None:
    """The probe (a stride-0 view of zeros, or top-k's own structure) describes what compress sends."""
    q = make_compressor(name, **kwargs)
    for shape in [(5,), (64, 33), (300000,)]:
        spec = expected_spec(q, shape, seed=3, key="w")
        dense = q.compress(torch.zeros(shape), seed=3, key="w")
        assert spec.kind == dense.kind and spec.meta == dense.meta
        assert {k: (a.dtype, a.shape) for k, a in spec.arrays.items()} == {
            k: (t.dtype, tuple(t.shape)) for k, t in dense.arrays.items()}


# ---------------------------------------------------------------------------------------------
# ReplyDecoder: the structure compiled once per round gives what decode_payloads gives
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402

from conef_fl.flower.codec import ReplyDecoder, decode_payloads  # noqa: E402
from tests.flower.test_codec_fuzz import METHODS, _mutate, mutation, setup  # noqa: E402


def _same_payloads(a: dict[str, Payload], b: dict[str, Payload]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].kind == b[k].kind and a[k].shape == b[k].shape and a[k].meta == b[k].meta
        and a[k].arrays.keys() == b[k].arrays.keys()
        and all(x.dtype == b[k].arrays[n].dtype and torch.equal(x, b[k].arrays[n]) for n, x in a[k].arrays.items())
        for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_reply_decoder_decodes_honest_replies_like_decode_payloads(method: str) -> None:
    strategy, good = setup(method)
    specs = strategy.payload_specs(1)
    decoder = ReplyDecoder(specs)
    for arrays, meta in good:
        assert _same_payloads(decoder.decode(arrays, meta), decode_payloads(arrays, meta, specs))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation())
def test_reply_decoder_refuses_every_mutation_with_the_same_reason(case) -> None:
    method, key, kind, r, bad_dtype = case
    strategy, good = setup(method)
    arrays, meta = _mutate(*good[0], key, kind, r, bad_dtype)
    specs = strategy.payload_specs(1)
    with pytest.raises(PayloadError) as slow:
        decode_payloads(arrays, meta, specs)
    with pytest.raises(PayloadError) as fast:
        ReplyDecoder(specs).decode(arrays, meta)
    assert str(fast.value) == str(slow.value)
