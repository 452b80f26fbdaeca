"""Property-based fuzzing of the payload decoder and the strategy's validation (hypothesis).

Every hostile reply must be rejected with a clear reason, without allocating memory in
proportion to a size it declares, and the round must go on with the other clients.
"""

from __future__ import annotations

import math
import random
import tracemalloc
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conef_fl.flower import ConEF
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import SEP, decode_payloads, encode_payloads
from conef_fl.flower.wrapper import MAX_WEIGHT
from conef_fl.validation import PayloadError
from conef_fl.worker import CompressionWorker

SHAPES = {"fc.weight": (16, 24), "fc.bias": (16,)}
METHODS = ["conef-cs", "ef-topk", "ef-sign", "qsgd", "ef-powersgd", "atomo", "sgd"]
NODES = [1, 2, 3]

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _setup(method: str):
    strategy = ConEF(FedAvg(fraction_train=1.0, min_available_nodes=3), method, seed=1)
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = NODES
    rng = np.random.default_rng(0)
    arrays = ArrayRecord({k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    seed = int(msgs[0].content["config"][P.ROUND_SEED_KEY])
    good = []
    for i in range(3):
        w = CompressionWorker(strategy.method, SHAPES)
        g = torch.Generator().manual_seed(i)
        good.append(encode_payloads(w.step({k: torch.randn(s, generator=g) for k, s in SHAPES.items()}, seed=seed)))
    return strategy, good


_CACHE: dict[str, tuple] = {}


def setup(method: str):
    """The strategy and three honest payloads of ``method``, built once per process.

    Flower's node sampling draws from Python's global ``random``; the first
    build happens inside a hypothesis draw, so the global state is restored
    around it (hypothesis rejects strategies that consume ``random``).
    """
    if method not in _CACHE:
        state = random.getstate()
        try:
            _CACHE[method] = _setup(method)
        finally:
            random.setstate(state)
    return _CACHE[method]


def _reply(node: int, arrays: ArrayRecord, meta: ConfigRecord, n: float = 1.0) -> Message:
    TaskIdentity.node_id = node
    metrics = {"num-examples": n, **{k: 0 for k in P.CLIENT_METRICS}, P.M_ROUND: 1}
    return Message(RecordDict({P.PAYLOAD_RECORD: arrays, P.PAYLOAD_META_RECORD: meta,
                               "metrics": MetricRecord(metrics)}), dst_node_id=0, message_type="train")


BAD_DTYPES = ["float64", "int64", "int8", "float16", "int32", "uint8", "bool"]


@st.composite
def mutation(draw):
    method = draw(st.sampled_from(METHODS))
    strategy, good = setup(method)
    arrays, meta = good[0]
    keys = sorted(arrays.keys())
    key = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(["dtype", "shape", "nan", "inf", "truncate", "huge", "forged", "drop", "extra", "meta",
                                 "indices", "dup"]))
    return method, key, kind, draw(st.integers(0, 10**6)), draw(st.sampled_from(BAD_DTYPES))


def _mutate(arrays: ArrayRecord, meta: ConfigRecord, key: str, kind: str, r: int, bad_dtype: str):
    a = ArrayRecord({k: arrays[k] for k in arrays.keys()})
    m = ConfigRecord(dict(meta))
    nd = a[key].numpy()
    if kind == "dtype":
        if str(nd.dtype) == bad_dtype:
            bad_dtype = "float64"
        a[key] = Array(nd.astype(bad_dtype))
    elif kind == "shape":
        a[key] = Array(np.concatenate([nd.reshape(-1), nd.reshape(-1)[:1] if nd.size else np.zeros(1, nd.dtype)]))
    elif kind in ("nan", "inf"):
        if nd.dtype.kind != "f" or nd.size == 0:
            a[key] = Array(np.full(nd.shape, np.nan, dtype=np.float64))
        else:
            x = nd.copy().reshape(-1)
            x[r % x.size] = np.nan if kind == "nan" else -np.inf
            a[key] = Array(x.reshape(nd.shape))
    elif kind == "truncate":
        x = nd.reshape(-1)
        a[key] = Array(x[: max(0, x.size - 1 - r % max(1, x.size))].copy())
    elif kind == "huge":  # absurd declared size with tiny data
        a[key] = Array(dtype=str(nd.dtype), shape=(10**12 + r,), stype="numpy.ndarray", data=b"\x00" * 16)
    elif kind == "forged":  # declared shape is right, but the .npy header inside claims a huge array
        import io as _io

        from numpy.lib import format as npy_format

        bio = _io.BytesIO()
        npy_format.write_array_header_1_0(bio, {"descr": npy_format.dtype_to_descr(nd.dtype), "fortran_order": False,
                                                "shape": (10**11 + r,)})
        a[key] = Array(dtype=str(nd.dtype), shape=tuple(int(s) for s in nd.shape), stype="numpy.ndarray",
                       data=bio.getvalue() + b"\x00" * 64)
    elif kind == "drop":
        del a[key]
    elif kind == "extra":
        a[key.split(SEP)[0] + SEP + "surprise"] = Array(np.zeros(3, np.float32))
    elif kind == "meta":
        mk = next((k for k in m if k.startswith(key.split(SEP)[0] + SEP) and not k.endswith("__kind__")), None)
        if mk is None:
            m[key.split(SEP)[0] + SEP + "__kind__"] = "bogus"
        else:
            v = m[mk]
            m[mk] = (v + 1 + r) if isinstance(v, int) and not isinstance(v, bool) else "bogus"
    elif kind in ("indices", "dup"):
        tensor = key.split(SEP)[0]
        ik = tensor + SEP + "indices"
        if ik in a:
            idx = a[ik].numpy().copy()
            if kind == "indices":
                idx[r % idx.size] = 10**6 + r if r % 2 else -1 - r
            else:
                idx[:] = idx[0]
            a[ik] = Array(idx)
        else:  # no indices in this compressor: fall back to an unknown tensor name
            a["ghost" + SEP + "values"] = Array(np.zeros(2, np.float32))
    return a, m


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation())
def test_every_mutation_is_rejected_with_bounded_memory(case) -> None:
    method, key, kind, r, bad_dtype = case
    strategy, good = setup(method)
    arrays, meta = _mutate(*good[0], key, kind, r, bad_dtype)
    specs = strategy.payload_specs(1)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError) as info:
            decode_payloads(arrays, meta, specs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value)  # a reason is given
    # no allocation in proportion to a declared size: the whole model is a few KB
    assert peak < 2_000_000, (kind, peak)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation())
def test_round_goes_on_with_the_other_clients(case) -> None:
    method, key, kind, r, bad_dtype = case
    strategy, good = setup(method)
    bad = _mutate(*good[0], key, kind, r, bad_dtype)
    replies = [_reply(NODES[0], *bad), _reply(NODES[1], *good[1]), _reply(NODES[2], *good[2])]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["conef.rejected"] == 1 and metrics["conef.accepted"] == 2
    assert new is not None and all(np.isfinite(new[k].numpy()).all() for k in SHAPES)
    assert strategy.history[-1].rejections[0].startswith(f"node {NODES[0]}:")


@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["num-examples"]))
@settings(max_examples=40, deadline=None)
def test_num_examples_fuzz(n: float, _key: str) -> None:
    strategy, good = setup("conef-cs")
    replies = [_reply(NODES[0], *good[0], n=n), _reply(NODES[1], *good[1])]
    _, metrics = strategy.aggregate_train(1, replies)
    ok = math.isfinite(n) and 0 < n <= MAX_WEIGHT
    assert metrics["conef.accepted"] == (2 if ok else 1)
