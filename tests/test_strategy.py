"""ConEFStrategy with Mock(spec=Grid) and real Messages: aggregation, validation, configuration."""

from __future__ import annotations

import math
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from conef_fl.feedback import make_compressor_for
from conef_fl.flower.codec import encode_payloads
from conef_fl.flower.strategy import (
    METRICS_KEY,
    PAYLOAD_KEY,
    PAYLOAD_META_KEY,
    ConEFStrategy,
    method_from_config,
)
from conef_fl.registry import method_config
from conef_fl.worker import CompressionWorker

SHAPES = {"fc.weight": (12, 20), "fc.bias": (12,), "conv.weight": (4, 3, 3, 3)}
NODES = [11, 22, 33]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    yield
    TaskIdentity.node_id = 0


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grid(nodes=NODES) -> Mock:
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(nodes)
    return grid


def _reply(node: int, arrays: ArrayRecord, meta: ConfigRecord, n: float, loss: float = 1.0) -> Message:
    TaskIdentity.node_id = node
    content = RecordDict(
        {PAYLOAD_KEY: arrays, PAYLOAD_META_KEY: meta,
         METRICS_KEY: MetricRecord({"num-examples": n, "train-loss": loss, "error-state-bytes": 10})}
    )
    return Message(content, dst_node_id=0, message_type="train")


def _start(method: str, **kw):
    strategy = ConEFStrategy(
        method_config(method, **kw), method_name=method, fraction_train=1.0, min_available_nodes=3,
        min_train_nodes=3, seed=5,
    )
    g = _global()
    msgs = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), _grid()))
    return strategy, g, msgs


def _client_payloads(msg: Message, seed: int):
    cfg = msg.content["config"]
    method = method_from_config(cfg)
    worker = CompressionWorker(method, SHAPES)
    gen = torch.Generator().manual_seed(seed)
    u = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return worker.step(u, seed=int(cfg["round-seed"])), method


METHODS = [
    ("sgd", {}),
    ("efsgd", {}),
    ("conef-cs", {}),
    ("conef-cs", {"compressor": "random-k"}),
    ("conef-cs", {"value_dtype": "float16"}),
    ("conef-cs", {"value_dtype": "bfloat16"}),
    ("ef-topk", {}),
    ("ef-sign", {}),
    ("ef-powersgd", {}),
    ("qsgd", {}),
    ("rbsgd", {}),
    ("atomo", {}),
    ("conef-q", {}),
    ("iconef-v2", {}),
    ("hefsgd", {}),
    ("conef-cs", {"layerwise": False}),
]


@pytest.mark.parametrize("method,kw", METHODS)
def test_aggregation_equals_dense_numpy_reference(method: str, kw: dict) -> None:
    strategy, g, msgs = _start(method, **kw)
    assert [m.metadata.dst_node_id for m in msgs] == NODES
    q = make_compressor_for(strategy.method)
    replies, dense, weights = [], [], [3.0, 1.0, 6.0]
    for i, (node, msg) in enumerate(zip(NODES, msgs, strict=True)):
        payloads, _ = _client_payloads(msg, seed=i)
        dense.append({k: q.decompress(p).numpy().astype(np.float64) for k, p in payloads.items()})
        arrays, meta = encode_payloads(payloads)
        replies.append(_reply(node, arrays, meta, weights[i]))
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["accepted"] == 3 and metrics["rejected"] == 0
    w = np.array(weights) / sum(weights)
    if kw.get("layerwise", True):
        ref = {k: g[k] - sum(wi * d[k] for wi, d in zip(w, dense, strict=True)) for k in SHAPES}
    else:
        flat = sum(wi * d["__flat__"] for wi, d in zip(w, dense, strict=True)).reshape(-1)
        ref, off = {}, 0
        for k, s in SHAPES.items():
            n = math.prod(s)
            ref[k] = g[k] - flat[off : off + n].reshape(s)
            off += n
    for k in SHAPES:
        np.testing.assert_allclose(new[k].numpy(), ref[k], rtol=1e-5, atol=1e-5)


def test_all_reducible_path_aggregates_in_compressed_space(monkeypatch) -> None:
    strategy, g, msgs = _start("conef-cs")
    calls = {"aggregate": 0, "decompress_add_": 0}
    q = strategy.compressor
    orig_agg = q.aggregate

    def spy_agg(*a, **k):
        calls["aggregate"] += 1
        return orig_agg(*a, **k)

    monkeypatch.setattr(q, "aggregate", spy_agg)
    monkeypatch.setattr(q, "decompress_add_", lambda *a, **k: calls.__setitem__("decompress_add_", 1))
    replies = []
    for i, (node, msg) in enumerate(zip(NODES, msgs, strict=True)):
        payloads, _ = _client_payloads(msg, seed=i)
        replies.append(_reply(node, *encode_payloads(payloads), n=1.0))
    strategy.aggregate_train(1, replies)
    assert calls["aggregate"] == len(SHAPES) and calls["decompress_add_"] == 0


def test_configure_train_sends_seed_and_settings_without_mutating_caller_config() -> None:
    strategy = ConEFStrategy(method_config("conef-cs", beta=0.95), method_name="conef-cs", fraction_train=0.5,
                             min_available_nodes=4, min_train_nodes=2, seed=9, train_config={"local-lr": 0.1})
    caller = ConfigRecord({"custom": 1})
    before = dict(caller)
    arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    msgs = list(strategy.configure_train(3, arrays, caller, _grid([1, 2, 3, 4])))
    assert dict(caller) == before
    assert len(msgs) == 2
    cfg = msgs[0].content["config"]
    assert cfg["round-seed"] == strategy.round_seed(3) and cfg["server-round"] == 3 and cfg["custom"] == 1
    assert cfg["local-lr"] == 0.1
    assert method_from_config(cfg) == strategy.method
    again = list(ConEFStrategy(method_config("conef-cs", beta=0.95), fraction_train=0.5, min_available_nodes=4,
                               seed=9).configure_train(3, arrays, ConfigRecord(), _grid([1, 2, 3, 4])))
    assert [m.metadata.dst_node_id for m in again] == [m.metadata.dst_node_id for m in msgs]  # seeded sampling


def test_waits_for_expected_nodes_before_sampling(monkeypatch) -> None:
    """Round 1 must not undersample: sampling waits until min_available_nodes are connected."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.side_effect = [[1], [1, 2], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    monkeypatch.setattr("conef_fl.flower.strategy.time.sleep", lambda s: None)
    strategy = ConEFStrategy(method_config("conef-cs"), fraction_train=0.5, min_available_nodes=4, min_train_nodes=1)
    msgs = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in _global().items()}),
                                         ConfigRecord(), grid))
    assert len(msgs) == 2


def _good_replies(strategy, msgs, weights=(1.0, 1.0, 1.0)):
    out = []
    for i, (node, msg) in enumerate(zip(NODES, msgs, strict=True)):
        payloads, _ = _client_payloads(msg, seed=i)
        out.append((node, payloads, weights[i]))
    return out


def _tamper_values(payloads, fn):
    key = next(iter(payloads))
    p = payloads[key]
    arrays = dict(p.arrays)
    fn(arrays, p)
    payloads[key] = type(p)(p.kind, p.shape, arrays, dict(p.meta))
    return payloads


MALFORMED = {
    "wrong dtype": lambda a, p: a.__setitem__("values", a["values"].double()),
    "wrong shape": lambda a, p: a.__setitem__("values", torch.cat([a["values"], a["values"][:1]])),
    "nan": lambda a, p: a.__setitem__("values", a["values"].clone().fill_(float("nan"))),
    "inf": lambda a, p: a.__setitem__("values", a["values"].clone().fill_(float("inf"))),
    "extra array": lambda a, p: a.__setitem__("indices", torch.zeros(3, dtype=torch.int32)),
    "missing array": lambda a, p: a.pop("values"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_payload_is_rejected_and_round_continues(case: str, caplog) -> None:
    strategy, g, msgs = _start("conef-cs")
    good = _good_replies(strategy, msgs)
    replies = []
    for i, (node, payloads, w) in enumerate(good):
        if i == 1:
            payloads = _tamper_values(dict(payloads), MALFORMED[case])
        replies.append(_reply(node, *encode_payloads(payloads), n=w))
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == 2 and metrics["rejected"] == 1
    assert new is not None and all(np.isfinite(new[k].numpy()).all() for k in SHAPES)
    reason = strategy.history[-1].rejections[0]
    assert reason.startswith(f"node {NODES[1]}:")
    # the model equals the aggregate of the two good replies only
    strategy2, _, msgs2 = _start("conef-cs")
    ok = [r for i, r in enumerate(replies) if i != 1]
    new2, _ = strategy2.aggregate_train(1, ok)
    for k in SHAPES:
        np.testing.assert_allclose(new[k].numpy(), new2[k].numpy())


def test_topk_index_attacks_rejected() -> None:
    strategy, g, msgs = _start("ef-topk")
    good = _good_replies(strategy, msgs)
    cases = {
        "out of range": lambda a, p: a["indices"].__setitem__(0, 10**6),
        "negative": lambda a, p: a["indices"].__setitem__(0, -1),
        "duplicate": lambda a, p: a.__setitem__("indices", torch.zeros_like(a["indices"])),
    }
    for name, fn in cases.items():
        replies = []
        for i, (node, payloads, w) in enumerate(good):
            if i == 0:
                payloads = _tamper_values({k: type(v)(v.kind, v.shape, {kk: vv.clone() for kk, vv in v.arrays.items()},
                                                     dict(v.meta)) for k, v in payloads.items()}, fn)
            replies.append(_reply(node, *encode_payloads(payloads), n=w))
        _, metrics = strategy.aggregate_train(1, replies)
        assert metrics["rejected"] == 1, name
        assert "indices" in strategy.history[-1].rejections[0], (name, strategy.history[-1].rejections)


def test_other_rejections(caplog) -> None:
    strategy, g, msgs = _start("conef-cs")
    (n0, p0, _), (n1, p1, _), (n2, p2, _) = _good_replies(strategy, msgs)
    arrays, meta = encode_payloads(p0)
    bad_seed = ConfigRecord(dict(meta))
    key = next(k for k in bad_seed if k.endswith("::seed"))
    bad_seed[key] = 12345
    unknown = ConfigRecord(dict(meta))
    unknown[next(k for k in unknown if k.endswith("::__kind__"))] = "zip"
    extra_tensor = ArrayRecord(dict(arrays))
    extra_tensor["ghost::values"] = Array(np.zeros(3, dtype=np.float32))
    cases = [
        ("wrong seed", _reply(n0, arrays, bad_seed, 1.0), "seed"),
        ("unknown compressor", _reply(n0, arrays, unknown, 1.0), "compressor"),
        ("unknown tensor", _reply(n0, extra_tensor, meta, 1.0), "unknown tensor"),
        ("zero examples", _reply(n0, arrays, meta, 0), "num-examples"),
        ("nan examples", _reply(n0, arrays, meta, float("nan")), "num-examples"),
    ]
    TaskIdentity.node_id = n0
    missing = Message(RecordDict({PAYLOAD_KEY: arrays, METRICS_KEY: MetricRecord({"num-examples": 1})}),
                      dst_node_id=0, message_type="train")
    cases.append(("missing record", missing, "payload-meta"))
    for name, bad, word in cases:
        replies = [bad, _reply(n1, *encode_payloads(p1), n=1.0), _reply(n2, *encode_payloads(p2), n=1.0)]
        new, metrics = strategy.aggregate_train(1, replies)
        assert metrics["rejected"] == 1 and metrics["accepted"] == 2, name
        assert word in strategy.history[-1].rejections[0], (name, strategy.history[-1].rejections)


def test_error_replies_are_skipped() -> None:
    strategy, g, msgs = _start("conef-cs")
    good = _good_replies(strategy, msgs)
    replies = [_reply(n, *encode_payloads(p), n=w) for n, p, w in good[1:]]
    replies.append(Message(Error(code=0, reason="client crashed"), reply_to=msgs[0]))
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["failed"] == 1 and metrics["accepted"] == 2 and new is not None


def test_no_valid_reply_keeps_model_and_nonfinite_step_is_refused() -> None:
    strategy, g, msgs = _start("conef-cs")
    new, metrics = strategy.aggregate_train(1, [Message(Error(code=0, reason="x"), reply_to=msgs[0])])
    assert new is None and metrics["accepted"] == 0
    huge = ConEFStrategy(method_config("sgd"), fraction_train=1.0, min_available_nodes=3, server_lr=1e30)
    arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    msgs = list(huge.configure_train(1, arrays, ConfigRecord(), _grid()))
    replies = []
    for i, (node, msg) in enumerate(zip(NODES, msgs, strict=True)):
        payloads, _ = _client_payloads(msg, seed=i)
        payloads = {k: type(p)(p.kind, p.shape, {"values": p.arrays["values"] * 1e20}, dict(p.meta))
                    for k, p in payloads.items()}
        replies.append(_reply(node, *encode_payloads(payloads), n=1.0))
    new, metrics = huge.aggregate_train(1, replies)
    assert metrics["accepted"] == 3 and new is None  # x − 1e30·Δ overflows: previous model kept


def test_max_update_norm() -> None:
    strategy = ConEFStrategy(method_config("sgd"), fraction_train=1.0, min_available_nodes=3, max_update_norm=1.0)
    arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), _grid()))
    replies = []
    for i, (node, msg) in enumerate(zip(NODES, msgs, strict=True)):
        payloads, _ = _client_payloads(msg, seed=i)
        scale = 1e-3 if i else 1.0  # node 0 sends an update of norm ≈ 16
        payloads = {k: type(p)(p.kind, p.shape, {"values": p.arrays["values"] * scale}, dict(p.meta))
                    for k, p in payloads.items()}
        replies.append(_reply(node, *encode_payloads(payloads), n=1.0))
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["rejected"] == 1 and "max_update_norm" in strategy.history[-1].rejections[0]


def test_server_momentum() -> None:
    strategy = ConEFStrategy(method_config("sgd"), fraction_train=1.0, min_available_nodes=3, server_momentum=0.5)
    g = _global()
    arrays = ArrayRecord({k: Array(v) for k, v in g.items()})
    deltas = []
    for rnd in (1, 2):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), _grid()))
        payloads, _ = _client_payloads(msgs[0], seed=rnd)
        deltas.append({k: p.arrays["values"].numpy().reshape(SHAPES[k]) for k, p in payloads.items()})
        arrays, _ = strategy.aggregate_train(rnd, [_reply(NODES[0], *encode_payloads(payloads), n=1.0)])
    for k in SHAPES:
        ref = g[k] - deltas[0][k] - (0.5 * deltas[0][k] + deltas[1][k])
        np.testing.assert_allclose(arrays[k].numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [({"server_lr": 0.0}, "server_lr"), ({"server_momentum": 1.0}, "momentum"),
                                          ({"max_update_norm": -1.0}, "max_update_norm")])
def test_bad_strategy_args(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ConEFStrategy(method_config("conef-cs"), **kwargs)


def test_learning_rate_schedule_reaches_clients_per_round() -> None:
    from server.settings import ServerSettings

    settings, _ = ServerSettings.from_run_config(
        {"local-lr": 0.1, "lr-decay-rounds": "5,3", "lr-decay-factor": 0.5, "method": "efsgd"}
    )
    assert settings.decay_rounds == (3, 5)
    assert [settings.local_lr_at(r) for r in (1, 2, 3, 4, 5, 9)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    strategy = ConEFStrategy(method_config("efsgd"), fraction_train=1.0, min_available_nodes=2,
                             train_config=settings.train_config(), train_config_fn=settings.round_train_config)
    arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    sent = {r: list(strategy.configure_train(r, arrays, ConfigRecord(), _grid([1, 2])))[0].content["config"]
            for r in (2, 3, 5)}
    assert [sent[r]["local-lr"] for r in (2, 3, 5)] == [0.1, 0.05, 0.025]
    assert sent[5]["local-steps"] == settings.local_steps  # the static settings still go out


@pytest.mark.parametrize(
    ("cfg", "match"),
    [({"lr-decay-rounds": "10,x"}, "lr-decay-rounds='10,x' is not a comma-separated"),
     ({"lr-decay-rounds": "0"}, "lr-decay-rounds='0' is out of range"),
     ({"lr-decay-factor": 0.0}, r"lr-decay-factor=0.0 is out of range; allowed: \(0, 1\]"),
     ({"lr-decay-factor": 1.5}, "lr-decay-factor=1.5 is out of range")],
)
def test_bad_learning_rate_schedule(cfg, match) -> None:
    from server.settings import ServerSettings

    with pytest.raises(ValueError, match=match):
        ServerSettings.from_run_config(cfg)
