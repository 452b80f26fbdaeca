"""The server's fast paths (issue #13 target 5) give what the reference paths give, bit for bit.

* :class:`~conef_fl.flower.codec.ReplyDecoder` decodes a reply into one buffer per array
  kind and checks its values once per buffer: it accepts what ``decode_payloads`` accepts
  and refuses what it refuses, with the same message (bad indices at the edges of the
  segments, where the batched index check joins them; NaN/Inf in any tensor).
* :class:`~conef_fl.aggregate.DenseAccumulator` adds top-k and scaled-sign payloads with the
  receiver's fast paths: the same float32 sums as ``decompress_add_``.
* The wrapper's streamed FedAvg aggregate equals a reference sum built from
  ``decode_payloads`` and ``decompress_add_`` in node order, and a refused reply leaves it
  as if the reply had never come.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from conef_fl import native
from conef_fl.aggregate import SIGN_CHUNK, DenseAccumulator
from conef_fl.compressors import make_compressor
from conef_fl.compressors.base import Payload
from conef_fl.flower import ConEF
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import SEP, ReplyDecoder, decode_payloads, encode_payloads
from conef_fl.validation import PayloadError
from conef_fl.worker import CompressionWorker

#: Tensors of several sizes: one longer than SIGN_CHUNK and not a multiple of it or of 8.
SHAPES = {"a.weight": (7, 9), "a.bias": (7,), "b.weight": (SIGN_CHUNK + 4003,), "b.bias": (3,)}
NODES = list(range(1, 7))


def _strategy(method: str, **options) -> tuple[ConEF, int]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    strategy = ConEF(FedAvg(fraction_train=1.0, min_available_nodes=len(NODES)), method, seed=3, **options)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = NODES
    rng = np.random.default_rng(0)
    model = ArrayRecord({k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()})
    msgs = list(strategy.configure_train(1, model, ConfigRecord(), grid))
    return strategy, int(msgs[0].content["config"][P.ROUND_SEED_KEY])


def _encoded(strategy: ConEF, seed: int, n: int) -> list[tuple[ArrayRecord, ConfigRecord]]:
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        worker = CompressionWorker(strategy.method, SHAPES)
        out.append(encode_payloads(worker.step({k: torch.randn(s, generator=gen) * (1 + i) for k, s in SHAPES.items()},
                                               seed=seed)))
    return out


def _reply(node: int, arrays: ArrayRecord, meta: ConfigRecord, weight: float) -> Message:
    TaskIdentity.node_id = node
    metrics = MetricRecord({"num-examples": weight, **{k: 0 for k in P.CLIENT_METRICS}, P.M_ROUND: 1})
    return Message(RecordDict({P.PAYLOAD_RECORD: arrays, P.PAYLOAD_META_RECORD: meta, "metrics": metrics}),
                   dst_node_id=0, message_type="train")


def _with(arrays: ArrayRecord, key: str, value: np.ndarray) -> ArrayRecord:
    out = ArrayRecord({k: arrays[k] for k in arrays.keys()})
    out[key] = Array(value)
    return out


# ---------------------------------------------------------------------------------------------
# batched value checks: same verdict and message as decode_payloads
# ---------------------------------------------------------------------------------------------

def _index_mutations(idx: np.ndarray, numel: int) -> dict[str, np.ndarray]:
    """Bad indices where a check over joined segments could slip: first, last, neighbours."""
    cases = {}
    for name, pos, value in [("first -1", 0, -1), ("last = numel", -1, numel), ("last huge", -1, 2**31 - 1),
                             ("first = numel", 0, numel), ("min int32", 0, -(2**31))]:
        x = idx.copy()
        x[pos] = value
        cases[name] = x
    if idx.size >= 2:
        x = idx.copy()
        x[-1] = x[-2]
        cases["duplicate last"] = x
        x = idx.copy()
        x[0], x[1] = x[1], x[0]
        cases["swapped first two"] = x
    return cases


@pytest.mark.parametrize("options", [{}, {"value_dtype": "float16"}, {"k_ratio": 0.5}])
def test_bad_indices_at_every_segment_edge_are_refused_as_decode_payloads_does(options: dict) -> None:
    strategy, seed = _strategy("ef-topk", **options)
    specs = strategy.payload_specs(1)
    decoder = ReplyDecoder(specs)
    arrays, meta = _encoded(strategy, seed, 1)[0]
    for tensor, shape in SHAPES.items():
        key = f"{tensor}{SEP}indices"
        for case, bad in _index_mutations(arrays[key].numpy(), int(np.prod(shape))).items():
            mutated = _with(arrays, key, bad)
            with pytest.raises(PayloadError) as slow:
                decode_payloads(mutated, meta, specs)
            with pytest.raises(PayloadError) as fast:
                decoder.decode(mutated, meta)
            assert str(fast.value) == str(slow.value), (tensor, case)
            assert repr(tensor) in str(fast.value)


@pytest.mark.parametrize(("method", "options"), [("ef-topk", {}), ("ef-topk", {"value_dtype": "float16"}),
                                                 ("ef-sign", {}), ("conef-cs", {}), ("sgd", {}),
                                                 ("ef-topk", {"value_dtype": "bfloat16"})])
def test_nan_or_inf_in_any_array_is_refused_as_decode_payloads_does(method: str, options: dict) -> None:
    strategy, seed = _strategy(method, **options)
    specs = strategy.payload_specs(1)
    decoder = ReplyDecoder(specs)
    arrays, meta = _encoded(strategy, seed, 1)[0]
    for key in arrays.keys():
        x = arrays[key].numpy()
        if x.dtype.kind != "f":
            continue
        for pos in (0, x.size - 1):
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy().reshape(-1)
                y[pos] = bad
                mutated = _with(arrays, key, y.reshape(x.shape))
                with pytest.raises(PayloadError) as slow:
                    decode_payloads(mutated, meta, specs)
                with pytest.raises(PayloadError) as fast:
                    decoder.decode(mutated, meta)
                assert str(fast.value) == str(slow.value)
                assert repr(key.split(SEP)[0]) in str(fast.value)


@pytest.mark.parametrize(("method", "options"), [("ef-topk", {}), ("ef-topk", {"value_dtype": "bfloat16"}),
                                                 ("ef-sign", {}), ("conef-cs", {}), ("qsgd", {})])
def test_honest_replies_decode_to_the_same_payloads(method: str, options: dict) -> None:
    strategy, seed = _strategy(method, **options)
    specs = strategy.payload_specs(1)
    decoder = ReplyDecoder(specs)
    for arrays, meta in _encoded(strategy, seed, 2):
        fast, slow = decoder.decode(arrays, meta), decode_payloads(arrays, meta, specs)
        assert fast.keys() == slow.keys()
        for k, p in fast.items():
            q = slow[k]
            assert (p.kind, p.shape, p.meta) == (q.kind, q.shape, q.meta)
            assert p.arrays.keys() == q.arrays.keys()
            for n, t in p.arrays.items():
                assert t.dtype == q.arrays[n].dtype and t.shape == q.arrays[n].shape
                assert torch.equal(t.view(-1).view(torch.uint8), q.arrays[n].reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# DenseAccumulator: the same float32 sums as decompress_add_
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("name", ["scaled-sign", "top-k"])
@pytest.mark.parametrize("d", [1, 10, 8 * 1000, SIGN_CHUNK, SIGN_CHUNK + 8, 3 * SIGN_CHUNK + 4003])
def test_dense_accumulator_adds_bit_for_bit_as_decompress_add(name: str, d: int, kernels: bool) -> None:
    """With and without the compiled kernels, against the compressor's pure numpy/torch path."""
    if kernels and not native.available():
        pytest.skip("native kernels not built")
    q = make_compressor(name, **({"ratio": 0.1} if name == "top-k" else {}))
    gen = torch.Generator().manual_seed(d)
    start = torch.randn(d, generator=gen)
    ours, ref = start.clone(), start.clone()
    with native.use_native(kernels):
        dense = DenseAccumulator(q)
    for i, alpha in enumerate([1.0, 0.3, 1 / 7, 12.5]):
        p = q.compress(torch.randn(d, generator=gen) * (i + 1))
        dense.add_(p, ours, alpha=alpha)
        with native.use_native(False):
            q.decompress_add_(p, ref, alpha=alpha)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


def test_dense_accumulator_hands_what_it_does_not_recognise_to_decompress_add() -> None:
    q = make_compressor("scaled-sign")
    p = q.compress(torch.randn(100))
    dense = DenseAccumulator(q)
    bad = Payload(p.kind, p.shape, {"signs": p.arrays["signs"][:-1], "scale": p.arrays["scale"]}, {})
    target = torch.zeros(100)
    with pytest.raises(ValueError, match="sign bytes"):
        dense.add_(bad, target)
    with pytest.raises(ValueError, match="does not match"):
        dense.add_(Payload("top-k", p.shape, p.arrays, {}), target)
    assert not target.any()
    half = torch.zeros(100, dtype=torch.float16)  # not a float32 target: the compressor's own path
    assert torch.equal(dense.add_(p, half), q.decompress_add_(p, torch.zeros(100, dtype=torch.float16)))


# ---------------------------------------------------------------------------------------------
# the streamed FedAvg aggregate: the reference sum, and refused replies leave no trace
# ---------------------------------------------------------------------------------------------

def _reference(strategy: ConEF, replies: list[tuple[ArrayRecord, ConfigRecord, float]]) -> dict[str, np.ndarray]:
    """``x − Σ w_i Q⁻¹(p_i) / Σ w_i`` as the server computed it before its fast paths."""
    specs = strategy.payload_specs(1)
    assert strategy._global is not None
    acc = {k: torch.zeros(s) for k, s in SHAPES.items()}
    total = 0.0
    for arrays, meta, w in replies:
        for k, p in decode_payloads(arrays, meta, specs).items():
            strategy.compressor.decompress_add_(p, acc[k], alpha=w)
        total += w
    return {k: acc[k].div_(total).neg_().add_(g).numpy() for k, g in strategy._global.items()}


@pytest.mark.parametrize("method", ["ef-topk", "ef-sign"])
def test_streamed_aggregate_is_the_reference_sum_and_a_refused_reply_leaves_no_trace(method: str) -> None:
    strategy, seed = _strategy(method)
    encoded = _encoded(strategy, seed, len(NODES))
    weights = [3.0, 1.0, 7.5, 2.0, 11.0, 0.25]
    # node 3's reply is refused after two others were summed: its last tensor has a NaN
    bad_key = list(encoded[2][0].keys())[-1]
    x = encoded[2][0][bad_key].numpy().copy()
    if x.dtype.kind != "f":
        bad_key = f"{bad_key.split(SEP)[0]}{SEP}scale"
        x = encoded[2][0][bad_key].numpy().copy()
    x.reshape(-1)[-1] = np.nan
    encoded[2] = (_with(encoded[2][0], bad_key, x), encoded[2][1])
    replies = [_reply(n, a, m, w) for n, (a, m), w in zip(NODES, encoded, weights, strict=True)]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["conef.accepted"] == len(NODES) - 1 and metrics["conef.rejected"] == 1
    want = _reference(strategy, [(a, m, w) for i, ((a, m), w) in enumerate(zip(encoded, weights, strict=True))
                                 if i != 2])
    for k, v in want.items():
        assert new[k].numpy().tobytes() == v.tobytes(), k


@pytest.mark.parametrize(("method", "options"), [("ef-topk", {}), ("ef-topk", {"value_dtype": "bfloat16"}),
                                                 ("ef-sign", {}), ("conef-cs", {}), ("atomo", {})])
def test_decode_sized_counts_bytes_as_flower_and_the_payloads_do(method: str, options: dict) -> None:
    """The plan's byte counts equal ``count_bytes`` and ``Payload.nbytes``, also with ``True`` sent for a 1."""
    strategy, seed = _strategy(method, **options)
    decoder = ReplyDecoder(strategy.payload_specs(1))
    for arrays, meta in _encoded(strategy, seed, 2):
        metas = [meta]
        ones = [k for k, v in meta.items() if not isinstance(v, (bool, str)) and v == 1]
        if ones:  # equal to the expected 1, so accepted, but Flower counts a bool as 1 byte
            metas.append(ConfigRecord({**dict(meta), ones[0]: True}))
        for m in metas:
            payloads, payload_bytes, record_bytes = decoder.decode_sized(arrays, m)
            assert payload_bytes == sum(p.nbytes for p in payloads.values())
            assert record_bytes == arrays.count_bytes() + m.count_bytes()
