"""ConEF strategy wrapper with Mock(spec=Grid) and real Messages: aggregation through inner strategies, refusals."""

from __future__ import annotations

import math
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedXgbBagging,
    Krum,
)
from flwr.supercore.task_identity import TaskIdentity

from conef_fl.flower import ConEF
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import encode_payloads
from conef_fl.worker import FLAT_KEY, CompressionWorker

SHAPES = {"fc.weight": (12, 20), "fc.bias": (12,), "conv.weight": (4, 3, 3, 3)}
NODES = [11, 22, 33]


pytestmark = pytest.mark.usefixtures("task_identity")


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _grid(nodes=NODES) -> Mock:
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(nodes)
    return grid


def _metrics(server_round: int, n: float, **extra) -> dict:
    out = {"num-examples": n, "train-loss": 1.0, P.M_ROUND: server_round, P.M_UPLINK_BYTES: 100,
           P.M_DENSE_BYTES: 1000, P.M_ERROR_STATE_BYTES: 10, P.M_SERIALIZED_STATE_BYTES: 20, P.M_STATE_SOURCE: 1,
           P.M_STATE_SAVED: 1}
    out.update(extra)
    return out


def _reply(node: int, payloads, n: float, server_round: int = 1, **metrics) -> Message:
    arrays, meta = encode_payloads(payloads)
    TaskIdentity.node_id = node
    content = RecordDict({P.PAYLOAD_RECORD: arrays, P.PAYLOAD_META_RECORD: meta,
                          "metrics": MetricRecord(_metrics(server_round, n, **metrics))})
    return Message(content, dst_node_id=0, message_type="train")


def _client_payloads(msg: Message, seed: int, scale: float = 1.0, workers: dict | None = None):
    """What conef_mod sends: one error-feedback step of a random update with the round's seed."""
    cfg = msg.content["config"]
    method = P.method_from_config(cfg)
    node = msg.metadata.dst_node_id
    worker = (workers or {}).get(node) or CompressionWorker(method, SHAPES)
    if workers is not None:
        workers[node] = worker
    gen = torch.Generator().manual_seed(seed)
    u = {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return worker.step(u, seed=int(cfg[P.ROUND_SEED_KEY]))


def _wrap(inner=None, method="conef-cs", **kw) -> ConEF:
    inner = inner or FedAvg(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3)
    return ConEF(inner, method, seed=5, node_wait_seconds=0.01, **kw)


def _round(strategy: ConEF, server_round: int, g: dict[str, np.ndarray], weights=(3.0, 1.0, 6.0), workers=None,
           seeds=None):
    msgs = list(strategy.configure_train(server_round, _record(g), ConfigRecord(), _grid()))
    payloads = [_client_payloads(m, seed=(seeds or [server_round * 10 + i for i in range(3)])[i], workers=workers)
                for i, m in enumerate(msgs)]
    replies = [_reply(m.metadata.dst_node_id, p, w, server_round) for m, p, w in zip(msgs, payloads, weights,
                                                                                     strict=True)]
    return msgs, payloads, replies


def _dense(strategy: ConEF, payloads) -> dict[str, np.ndarray]:
    if FLAT_KEY in payloads:  # layerwise=False: one flat payload over the tensors in order
        flat = strategy.compressor.decompress(payloads[FLAT_KEY]).numpy().astype(np.float64).reshape(-1)
        out, off = {}, 0
        for k, s in SHAPES.items():
            out[k] = flat[off:off + math.prod(s)].reshape(s)
            off += math.prod(s)
        return out
    return {k: strategy.compressor.decompress(p).numpy().astype(np.float64).reshape(SHAPES[k])
            for k, p in payloads.items()}


METHODS = [
    ("sgd", {}), ("efsgd", {}), ("conef-cs", {}), ("conef-cs", {"compressor": "random-k"}),
    ("conef-cs", {"value_dtype": "float16"}), ("conef-cs", {"value_dtype": "bfloat16"}), ("ef-topk", {}),
    ("ef-sign", {}), ("ef-powersgd", {}), ("qsgd", {}), ("rbsgd", {}), ("atomo", {}), ("conef-q", {}),
    ("iconef-v2", {}), ("hefsgd", {}), ("conef-cs", {"layerwise": False}),
]


@pytest.mark.parametrize("method,kw", METHODS)
def test_fedavg_aggregate_equals_dense_numpy_reference(method: str, kw: dict) -> None:
    strategy = _wrap(method=method, **kw)
    g = _global()
    msgs, payloads, replies = _round(strategy, 1, g)
    assert [m.metadata.dst_node_id for m in msgs] == NODES
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["conef.accepted"] == 3 and metrics["conef.rejected"] == 0
    w = np.array([3.0, 1.0, 6.0]) / 10.0
    dense = [_dense(strategy, p) for p in payloads]
    for k in SHAPES:
        ref = g[k] - sum(wi * d[k] for wi, d in zip(w, dense, strict=True))
        np.testing.assert_allclose(new[k].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_train_messages_carry_the_method_seed_and_round_and_leave_the_callers_config_alone() -> None:
    strategy = _wrap(method="conef-cs", beta=0.8)
    config = ConfigRecord({"lr": 0.1})
    msgs = list(strategy.configure_train(4, _record(_global()), config, _grid()))
    assert dict(config) == {"lr": 0.1}
    for m in msgs:
        cfg = m.content["config"]
        assert cfg["lr"] == 0.1 and cfg[P.SERVER_ROUND_KEY] == 4
        assert cfg[P.ROUND_SEED_KEY] == strategy.round_seed(4)
        assert P.method_from_config(cfg) == strategy.method and strategy.method.beta == 0.8


def test_all_reducible_q_is_summed_in_compressed_space(monkeypatch) -> None:
    """Every reply goes into one running compressed sum per tensor; only the mean is decompressed (once)."""
    strategy = _wrap()
    q = strategy.compressor
    calls = {"sum_into_": 0, "decompress_add_": 0}
    sums: set[int] = set()
    orig_sum, orig_dadd = q.sum_into_, q.decompress_add_

    def spy_sum(acc, payload, weight):
        calls["sum_into_"] += 1
        out = orig_sum(acc, payload, weight)
        assert acc is None or out is acc  # added in place: no new sum per reply
        sums.add(id(out))
        return out

    def spy_dadd(*a, **k):
        calls["decompress_add_"] += 1
        return orig_dadd(*a, **k)

    monkeypatch.setattr(q, "sum_into_", spy_sum)
    monkeypatch.setattr(q, "decompress_add_", spy_dadd)
    _, _, replies = _round(strategy, 1, _global())
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    assert calls["sum_into_"] == len(replies) * len(SHAPES)
    assert len(sums) == len(SHAPES)  # one running sum per tensor, whatever the number of replies
    assert calls["decompress_add_"] == len(SHAPES)  # the mean, once per tensor


@pytest.mark.parametrize("make_inner", [
    lambda: FedAdam(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, eta=0.05),
    lambda: FedAvgM(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, server_learning_rate=0.7,
                    server_momentum=0.9),
])
def test_mean_strategies_equal_the_inner_strategy_fed_the_decompressed_average(make_inner) -> None:
    wrapped, twin = _wrap(make_inner()), make_inner()
    g = _global()
    workers: dict = {}
    for rnd in (1, 2, 3):
        _, payloads, replies = _round(wrapped, rnd, g, workers=workers)
        twin.configure_train(rnd, _record(g), ConfigRecord(), _grid())
        mean = {k: sum(w / 10.0 * _dense(wrapped, p)[k] for w, p in zip((3.0, 1.0, 6.0), payloads, strict=True))
                for k in SHAPES}
        fed = Message(RecordDict({"arrays": _record({k: (g[k] - mean[k]).astype(np.float32) for k in SHAPES}),
                                  "metrics": MetricRecord({"num-examples": 10.0})}), dst_node_id=0,
                      message_type="train")
        want, _ = twin.aggregate_train(rnd, [fed])
        got, _ = wrapped.aggregate_train(rnd, replies)
        for k in SHAPES:
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-6)
        g = {k: got[k].numpy() for k in SHAPES}


@pytest.mark.parametrize("make_inner", [
    lambda: FedMedian(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3),
    lambda: Krum(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3),
    lambda: FedTrimmedAvg(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, beta=0.2),
])
def test_per_reply_strategies_see_each_decoded_model(make_inner) -> None:
    wrapped, twin = _wrap(make_inner(), method="ef-topk"), make_inner()
    assert wrapped.mode == "per-reply"
    g = _global()
    _, payloads, replies = _round(wrapped, 1, g)
    models = [Message(RecordDict({"arrays": _record({k: (g[k] - _dense(wrapped, p)[k]).astype(np.float32)
                                                     for k in SHAPES}),
                                  "metrics": MetricRecord(_metrics(1, w))}), dst_node_id=0, message_type="train")
              for p, w in zip(payloads, (3.0, 1.0, 6.0), strict=True)]
    want, _ = twin.aggregate_train(1, models)
    got, _ = wrapped.aggregate_train(1, replies)
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-6, atol=1e-6)


def test_lossless_conef_around_fedavg_reproduces_plain_fedavg() -> None:
    """With Q = identity and no error memory, ConEF(FedAvg) is FedAvg (up to float32 rounding of x − u)."""
    wrapped = _wrap(method="sgd")
    plain = FedAvg(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3)
    g = _global()
    rng = np.random.default_rng(7)
    locals_ = [{k: (g[k] + 0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
               for _ in NODES]
    msgs = list(wrapped.configure_train(1, _record(g), ConfigRecord(), _grid()))
    replies, models = [], []
    for m, local, w in zip(msgs, locals_, (3.0, 1.0, 6.0), strict=True):
        worker = CompressionWorker(wrapped.method, SHAPES)
        u = {k: torch.from_numpy(g[k] - local[k]) for k in SHAPES}
        replies.append(_reply(m.metadata.dst_node_id, worker.step(u, seed=int(m.content["config"][P.ROUND_SEED_KEY])),
                              w))
        models.append(Message(RecordDict({"arrays": _record(local), "metrics": MetricRecord({"num-examples": w})}),
                              dst_node_id=0, message_type="train"))
    got, _ = wrapped.aggregate_train(1, replies)
    want, _ = plain.aggregate_train(1, models)
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=2e-6)


def test_unsupported_strategies_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="XGBoost"):
        ConEF(FedXgbBagging())
    with pytest.raises(ValueError, match="differential-privacy"):
        ConEF(DifferentialPrivacyClientSideFixedClipping(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0,
                                                         num_sampled_clients=3))
    with pytest.raises(ValueError, match="already wrapped"):
        ConEF(_wrap())
    with pytest.raises(ValueError, match="not a flwr"):
        ConEF(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k_ratio"):
        _wrap(k_ratio=1.5)


# ---------------------------------------------------------------------------- hostile replies
def _hostile_round(mutate):
    """One round where ``mutate(replies, msgs, payloads)`` returns the replies the server gets."""
    strategy = _wrap()
    g = _global()
    msgs, payloads, replies = _round(strategy, 1, g)
    replies = mutate(replies, msgs, payloads)
    new, metrics = strategy.aggregate_train(1, replies)
    return strategy, g, new, metrics


def _with_meta(msg: Message, key: str, value) -> Message:
    meta = ConfigRecord(dict(msg.content[P.PAYLOAD_META_RECORD]))
    meta[key] = value
    msg.content[P.PAYLOAD_META_RECORD] = meta
    return msg


def _with_metric(msg: Message, key: str, value) -> Message:
    msg.content["metrics"][key] = value
    return msg


ATTACKS = {
    "extra metadata key": lambda r, m, p: [_with_meta(r[0], "fc.bias::evil", 1), r[1], r[2]],
    "num-examples 1e308 twice": lambda r, m, p: [_with_metric(r[0], "num-examples", 1e308),
                                                 _with_metric(r[1], "num-examples", 1e308), r[2]],
    "metric is inf": lambda r, m, p: [_with_metric(r[0], P.M_SERIALIZED_STATE_BYTES, float("inf")), r[1], r[2]],
    "metric is nan": lambda r, m, p: [_with_metric(r[0], "train-loss", float("nan")), r[1], r[2]],
    "reply for another round": lambda r, m, p: [_with_metric(r[0], P.M_ROUND, 0), r[1], r[2]],
    "missing ConEF metrics": lambda r, m, p: [r[0], _drop_metric(r[1], P.M_ROUND), r[2]],
    "no payload records": lambda r, m, p: [_plain_model_reply(r[0]), r[1], r[2]],
}


def _drop_metric(msg: Message, key: str) -> Message:
    metrics = MetricRecord({k: v for k, v in msg.content["metrics"].items() if k != key})
    msg.content["metrics"] = metrics
    return msg


def _plain_model_reply(msg: Message) -> Message:
    TaskIdentity.node_id = msg.metadata.src_node_id
    return Message(RecordDict({"arrays": _record(_global()), "metrics": msg.content["metrics"]}), dst_node_id=0,
                   message_type="train")


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_hostile_reply_is_refused_and_the_round_goes_on(attack: str, caplog) -> None:
    strategy, g, new, metrics = _hostile_round(ATTACKS[attack])
    bad = 2 if attack == "num-examples 1e308 twice" else 1
    assert metrics["conef.rejected"] == bad and metrics["conef.accepted"] == 3 - bad
    assert new is not None and all(np.isfinite(new[k].numpy()).all() for k in SHAPES)
    assert strategy.history[-1].rejections and "rejected reply" in caplog.text


def test_duplicate_replies_of_one_node_are_all_refused_before_decoding(monkeypatch) -> None:
    decoded = []
    strategy = _wrap()
    msgs, _, replies = _round(strategy, 1, _global())
    orig = strategy._decode
    monkeypatch.setattr(strategy, "_decode", lambda msg, specs: decoded.append(msg.metadata.src_node_id)
                        or orig(msg, specs))
    new, metrics = strategy.aggregate_train(1, replies + [replies[0]] * 50)
    assert metrics["conef.rejected"] == 51 and metrics["conef.accepted"] == 2
    assert NODES[0] not in decoded


def test_replies_from_nodes_that_were_not_sampled_are_refused() -> None:
    inner = FedAvg(fraction_train=0.5, min_available_nodes=3, min_train_nodes=1)
    strategy = ConEF(inner, "conef-cs", seed=5, node_wait_seconds=0.01)
    msgs = list(strategy.configure_train(1, _record(_global()), ConfigRecord(), _grid()))
    assert len(msgs) == 1
    outsider = next(n for n in NODES if n != msgs[0].metadata.dst_node_id)
    payloads = _client_payloads(msgs[0], seed=0)
    new, metrics = strategy.aggregate_train(1, [_reply(msgs[0].metadata.dst_node_id, payloads, 1.0),
                                                _reply(outsider, payloads, 1.0)])
    assert metrics["conef.rejected"] == 1 and metrics["conef.accepted"] == 1
    assert "not sampled" in strategy.history[-1].rejections[0]


def test_the_norm_guard_refuses_a_huge_update_that_would_move_the_model() -> None:
    strategy = _wrap(method="sgd")
    g = _global()
    msgs = list(strategy.configure_train(1, _record(g), ConfigRecord(), _grid()))
    replies = [_reply(m.metadata.dst_node_id, _client_payloads(m, seed=i, scale=1e28 if i == 0 else 0.01), 1.0)
               for i, m in enumerate(msgs)]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["conef.rejected"] == 1 and "norm_guard" in strategy.history[-1].rejections[0]
    assert max(float(np.abs(new[k].numpy()).max()) for k in SHAPES) < 10.0
    off = _wrap(method="sgd", norm_guard=0.0)
    msgs = list(off.configure_train(1, _record(g), ConfigRecord(), _grid()))
    replies = [_reply(m.metadata.dst_node_id, _client_payloads(m, seed=i, scale=1e28 if i == 0 else 0.01), 1.0)
               for i, m in enumerate(msgs)]
    new, metrics = off.aggregate_train(1, replies)
    assert metrics["conef.rejected"] == 0  # switched off: the attack goes through (and is measured)
    assert max(float(np.abs(new[k].numpy()).max()) for k in SHAPES) > 1e20


def _scaled_round(strategy: ConEF, server_round: int, g, scales: list[float]) -> tuple[object, dict]:
    """One round whose first ``len(scales)`` sampled nodes reply with updates of these scales (sgd: no error)."""
    msgs = list(strategy.configure_train(server_round, _record(g), ConfigRecord(), _grid()))
    replies = [_reply(m.metadata.dst_node_id, _client_payloads(m, seed=server_round * 10 + i, scale=sc), 1.0,
                      server_round) for i, (m, sc) in enumerate(zip(msgs, scales, strict=False))]
    new, metrics = strategy.aggregate_train(server_round, replies)
    return new, dict(metrics)


def test_the_norm_guard_follows_honest_growth_with_two_replies_per_round() -> None:
    # Two clients per round whose updates grow 5x a round (training leaving a plateau): the lower median of two
    # replies is the smaller one, so every round's own replies set the bound and none is refused. (The guard used
    # to keep the smallest reference it had ever seen once rounds had < 3 replies, and refused all from round 3.)
    strategy, g = _wrap(method="sgd"), _global()
    _scaled_round(strategy, 1, g, [0.01, 0.01, 0.01])
    for rnd, scale in zip(range(2, 7), (0.05, 0.25, 1.25, 6.25, 31.25), strict=True):
        new, metrics = _scaled_round(strategy, rnd, g, [scale, 1.1 * scale])
        assert metrics["conef.rejected"] == 0 and metrics["conef.accepted"] == 2, (rnd, strategy.history[-1])


def test_with_two_replies_the_huge_one_is_refused_and_a_lone_reply_is_judged_by_the_last_round() -> None:
    strategy, g = _wrap(method="sgd"), _global()
    _scaled_round(strategy, 1, g, [0.01, 0.01, 0.01])
    _, metrics = _scaled_round(strategy, 2, g, [0.01, 1e6])
    assert metrics["conef.rejected"] == 1 and "norm_guard" in strategy.history[-1].rejections[0]
    _, metrics = _scaled_round(strategy, 3, g, [1e6])  # a lone reply cannot vouch for itself
    assert metrics["conef.rejected"] == 1 and metrics["conef.accepted"] == 0
    _, metrics = _scaled_round(strategy, 4, g, [0.05])  # 5x the last accepted median: inside the guard
    assert metrics["conef.rejected"] == 0 and metrics["conef.accepted"] == 1
    _, metrics = _scaled_round(strategy, 5, g, [0.4])  # 8x the lone reply accepted in round 4: it follows growth
    assert metrics["conef.rejected"] == 0 and metrics["conef.accepted"] == 1


def test_error_replies_are_counted_as_failed() -> None:
    strategy = _wrap()
    msgs, _, replies = _round(strategy, 1, _global())
    failed = Message(Error(code=2, reason="boom"), reply_to=msgs[0])
    new, metrics = strategy.aggregate_train(1, [failed, replies[1], replies[2]])
    assert metrics["conef.failed"] == 1 and metrics["conef.accepted"] == 2 and new is not None


def test_no_valid_reply_keeps_the_model() -> None:
    strategy = _wrap()
    _, _, replies = _round(strategy, 1, _global())
    new, metrics = strategy.aggregate_train(1, [_with_metric(r, P.M_ROUND, 7) for r in replies])
    assert new is None and metrics["conef.rejected"] == 3


def test_aggregation_does_not_depend_on_arrival_order() -> None:
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        strategy = _wrap(method="ef-topk")
        _, _, replies = _round(strategy, 1, _global())
        new, _ = strategy.aggregate_train(1, [replies[i] for i in order])
        results.append({k: torch.from_numpy(new[k].numpy()) for k in SHAPES})
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in SHAPES)


# ---------------------------------------------------------------------------- sampling
def test_sampling_waits_with_a_deadline_and_runs_with_the_nodes_there(caplog) -> None:
    inner = FedAvg(fraction_train=1.0, min_available_nodes=5, min_train_nodes=1)
    strategy = ConEF(inner, "conef-cs", node_wait_seconds=0.05)
    msgs = list(strategy.configure_train(1, _record(_global()), ConfigRecord(), _grid([7])))
    assert [m.metadata.dst_node_id for m in msgs] == [7]
    assert "only 1 of 5 expected nodes" in caplog.text
    assert inner.min_available_nodes == 5 and inner.fraction_train == 1.0  # restored
    strategy.node_wait_seconds = 3600.0  # the next round does not wait again for the missing nodes
    msgs = list(strategy.configure_train(2, _record(_global()), ConfigRecord(), _grid([7])))
    assert [m.metadata.dst_node_id for m in msgs] == [7]


def test_too_few_nodes_stops_with_what_to_pass() -> None:
    inner = FedAvg(fraction_train=1.0, min_available_nodes=100, min_train_nodes=2)
    strategy = ConEF(inner, "conef-cs", node_wait_seconds=0.05)
    with pytest.raises(RuntimeError, match="num-supernodes=100"):
        strategy.configure_train(1, _record(_global()), ConfigRecord(), _grid([7]))


def test_sampling_is_seeded() -> None:
    picks = []
    for _ in range(2):
        inner = FedAvg(fraction_train=0.3, min_available_nodes=10, min_train_nodes=1)
        strategy = ConEF(inner, "conef-cs", seed=3)
        msgs = strategy.configure_train(2, _record(_global()), ConfigRecord(), _grid(list(range(100, 110))))
        picks.append([m.metadata.dst_node_id for m in msgs])
    assert picks[0] == picks[1] and len(picks[0]) == 3


def test_evaluation_passes_through_to_the_inner_strategy() -> None:
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3, min_train_nodes=3)
    strategy = ConEF(inner, "conef-cs")
    msgs = list(strategy.configure_evaluate(1, _record(_global()), ConfigRecord(), _grid()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == NODES
    assert all(m.metadata.message_type == "evaluate" for m in msgs)
    replies = []
    for node, acc in zip(NODES, (0.5, 0.7, 0.9), strict=True):
        TaskIdentity.node_id = node
        replies.append(Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "acc": acc})}), dst_node_id=0,
                               message_type="evaluate"))
    assert math.isclose(strategy.aggregate_evaluate(1, replies)["acc"], 0.7)


# ---------------------------------------------------------------------------- checkpoints
def test_state_dict_resumes_the_inner_optimizer_exactly() -> None:
    def make():
        return _wrap(FedAdam(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, eta=0.05),
                     method="efsgd")

    g = _global()
    straight = make()
    for rnd in (1, 2):
        _, _, replies = _round(straight, rnd, g, seeds=[rnd, rnd + 1, rnd + 2])
        out, _ = straight.aggregate_train(rnd, replies)
        if rnd == 1:
            g1 = g = {k: out[k].numpy() for k in SHAPES}
            state = straight.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    _, _, replies = _round(resumed, 2, g1, seeds=[2, 3, 4])
    again, _ = resumed.aggregate_train(2, replies)
    for k in SHAPES:
        assert np.array_equal(again[k].numpy(), out[k].numpy())
    with pytest.raises(ValueError, match="wraps FedAdam"):
        _wrap(method="efsgd").load_state_dict(state)


def test_a_non_finite_server_step_keeps_the_previous_model(caplog) -> None:
    inner = FedAvgM(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, server_learning_rate=1e300)
    strategy = _wrap(inner, method="sgd")
    _, _, replies = _round(strategy, 1, _global())
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is None and metrics["conef.accepted"] == 3 and "not finite" in caplog.text


def test_max_update_norm_is_an_absolute_bound() -> None:
    strategy = _wrap(method="sgd", max_update_norm=1e-3)
    _, _, replies = _round(strategy, 1, _global())
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is None and metrics["conef.rejected"] == 3
    assert "max_update_norm" in strategy.history[-1].rejections[0]


def test_cyclic_sampling_visits_every_node_once_per_cycle() -> None:
    inner = FedAvg(fraction_train=0.25, min_available_nodes=8, min_train_nodes=1)
    strategy = ConEF(inner, "conef-cs", sampling="cyclic")
    nodes = list(range(100, 108))
    seen = []
    for rnd in (1, 2, 3, 4):
        seen += [m.metadata.dst_node_id for m in strategy.configure_train(rnd, _record(_global()), ConfigRecord(),
                                                                            _grid(nodes))]
    assert sorted(seen) == nodes
    with pytest.raises(ValueError, match="sampling='sometimes'"):
        ConEF(FedAvg(), sampling="sometimes")


@pytest.mark.parametrize("method,kw", METHODS)
def test_the_update_norm_equals_the_norm_of_the_decoded_update(method: str, kw: dict) -> None:
    strategy = _wrap(method=method, **kw)
    msgs, payloads, _ = _round(strategy, 1, _global())
    for p in payloads:
        dense = math.sqrt(sum(float((v**2).sum()) for v in _dense(strategy, p).values()))
        assert math.isclose(strategy._norm(p), dense, rel_tol=1e-5)


def _many_replies(strategy: ConEF, n: int, huge: int | None = None) -> list[Message]:
    nodes = list(range(100, 100 + n))
    msgs = list(strategy.configure_train(1, _record(_global()), ConfigRecord(), _grid(nodes)))
    replies = []
    for i, m in enumerate(msgs):
        p = _client_payloads(m, seed=i % 4, scale=1e6 if i == huge else 1.0)
        replies.append(_reply(m.metadata.dst_node_id, p, 1.0 + i % 5, **{"train-loss": 0.1 * (i % 7) + 1e-9 * i,
                                                                        P.M_PEAK_RSS: 1000 + i}))
    return replies


def test_round_statistics_after_the_norm_guard_count_only_the_accepted_replies() -> None:
    inner = lambda: FedAvg(fraction_train=1.0, min_available_nodes=6, min_train_nodes=6)  # noqa: E731
    guarded = _wrap(inner())
    replies = _many_replies(guarded, 7, huge=3)
    new, metrics = guarded.aggregate_train(1, replies)
    assert metrics["conef.rejected"] == 1
    plain = _wrap(inner(), norm_guard=0.0)
    _many_replies(plain, 7)  # samples the same nodes
    kept = [r for i, r in enumerate(replies) if i != 3]
    new2, metrics2 = plain.aggregate_train(1, kept)
    a, b = guarded.history[-1], plain.history[-1]
    for field in ("accepted", "train_loss", "uplink_payload_bytes_total", "uplink_record_bytes_total",
                  "client_error_state_bytes_mean", "client_serialized_state_bytes_total", "client_peak_rss_bytes_max",
                  "clients_state_fresh", "clients_state_from_memory", "clients_state_not_saved"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.train_loss == math.fsum((0.1 * (i % 7) + 1e-9 * i) * (1.0 + i % 5) for i in range(7) if i != 3) \
        / math.fsum(1.0 + i % 5 for i in range(7) if i != 3)
    assert all(np.array_equal(new[k].numpy(), new2[k].numpy()) for k in SHAPES)


def test_the_server_keeps_a_few_bytes_per_reply_until_the_norm_guard() -> None:
    """Issue #13: what aggregate_train holds per reply when the norm guard runs (tracemalloc) stays small."""
    import tracemalloc

    held = {}
    for n in (40, 400):
        strategy = _wrap(FedAvg(fraction_train=1.0, min_available_nodes=n, min_train_nodes=n))
        replies = _many_replies(strategy, n)
        strategy.aggregate_train(1, replies)  # first call: Flower's lazy structures, caches
        guard = strategy._norm_guard

        def spy(*args, guard=guard, n=n):
            held[n] = tracemalloc.get_traced_memory()[0]
            return guard(*args)

        strategy._norm_guard = spy
        tracemalloc.start()
        strategy.aggregate_train(1, replies)
        tracemalloc.stop()
    per_reply = (held[400] - held[40]) / 360
    assert per_reply < 100, per_reply  # was ~470 bytes: the reply's statistics, weight and norm as objects
