"""conef_mod around a train function: pass-through, compressed replies, state across rounds, refusals."""

from __future__ import annotations

import gc
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from conef_fl.flower import ConEF, conef_mod
from conef_fl.flower import protocol as P
from conef_fl.flower.client_state import STATE_KEY

SHAPES = {"w": (6, 5), "b": (6,)}


pytestmark = pytest.mark.usefixtures("task_identity")


def _record(arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _global(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _context(node=7, **node_config) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": 0, **node_config}, state=RecordDict(),
                   run_config={"run-name": "mod-test"})


def _strategy(method="conef-cs", **kw) -> ConEF:
    return ConEF(FedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1), method, seed=1, **kw)


def _train_message(strategy: ConEF, rnd: int, g) -> Message:
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [7]
    (msg,) = strategy.configure_train(rnd, _record(g), ConfigRecord(), grid)
    TaskIdentity.node_id = 7
    msg.metadata.__dict__["_message_id"] = f"m{rnd}"
    return msg


def _train_fn(local_of):
    """A user's train function: returns ``local_of(global arrays)`` as the local model."""
    def train(msg: Message, ctxt: Context) -> Message:
        g = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        content = RecordDict({"arrays": _record(local_of(g)),
                              "metrics": MetricRecord({"num-examples": 5, "train-loss": 0.5, "user-metric": 3.0})})
        return Message(content, reply_to=msg)
    return train


def _step(g):
    return {k: v - 0.1 for k, v in g.items()}


def test_non_train_messages_pass_through_untouched() -> None:
    TaskIdentity.node_id = 0
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="evaluate")
    reply = Message(RecordDict({"metrics": MetricRecord({"acc": 1.0})}), reply_to=msg)
    seen = []
    out = conef_mod(msg, _context(), lambda m, c: seen.append(m) or reply)
    assert out is reply and seen == [msg]


def test_train_messages_of_an_unwrapped_server_pass_through(caplog) -> None:
    TaskIdentity.node_id = 0
    msg = Message(RecordDict({"arrays": _record(_global()), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    reply = _train_fn(_step)(msg, _context())
    assert conef_mod(msg, _context(), lambda m, c: reply) is reply
    assert "no ConEF settings" in caplog.text


def test_reply_is_the_compressed_update_with_the_users_metrics_and_the_wrapper_accepts_it() -> None:
    strategy = _strategy()
    g = _global()
    ctxt = _context()
    msg = _train_message(strategy, 1, g)
    out = conef_mod(msg, ctxt, _train_fn(_step))
    assert not out.has_error()
    assert "arrays" not in out.content and P.PAYLOAD_RECORD in out.content
    metrics = out.content["metrics"]
    assert metrics["user-metric"] == 3.0 and metrics["num-examples"] == 5
    assert metrics[P.M_ROUND] == 1 and metrics[P.M_STATE_SOURCE] == P.STATE_SOURCES["fresh"]
    total = 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert metrics[P.M_DENSE_BYTES] == total and metrics[P.M_UPLINK_BYTES] < 0.2 * total
    TaskIdentity.node_id = 7
    new, agg = strategy.aggregate_train(1, [out])
    assert agg["conef.accepted"] == 1 and new is not None


def test_error_state_persists_in_context_state_across_rounds() -> None:
    strategy = _strategy()
    ctxt = _context()
    g = _global()
    conef_mod(_train_message(strategy, 1, g), ctxt, _train_fn(_step))
    assert STATE_KEY in ctxt.state
    out = conef_mod(_train_message(strategy, 2, g), ctxt, _train_fn(_step))
    assert out.content["metrics"][P.M_STATE_SOURCE] == P.STATE_SOURCES["memory"]


def _state_bytes(ctxt: Context) -> bytes:
    rec = ctxt.state[STATE_KEY]
    return b"".join(v if isinstance(v, bytes) else repr(v).encode() for _, v in sorted(rec.items()))


BAD_REPLIES = {
    "missing array": (lambda g: {"w": g["w"]}, "missing ['b']"),
    "extra array": (lambda g: {**_step(g), "extra": np.zeros(3, np.float32)}, "unexpected ['extra']"),
    "other shape": (lambda g: {"w": g["w"][:3], "b": g["b"]}, "has shape (3, 5)"),
    "integer array": (lambda g: {"w": g["w"], "b": np.zeros(6, np.int64)}, "dtype int64"),
    "nan": (lambda g: {"w": np.full((6, 5), np.nan, np.float32), "b": g["b"]}, "NaN"),
    "inf": (lambda g: {"w": g["w"], "b": np.full(6, np.inf, np.float32)}, "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_reply_that_cannot_be_compressed_becomes_an_error_and_the_state_is_untouched(case: str) -> None:
    local_of, reason = BAD_REPLIES[case]
    strategy = _strategy()
    ctxt = _context()
    g = _global()
    conef_mod(_train_message(strategy, 1, g), ctxt, _train_fn(_step))
    before = _state_bytes(ctxt)
    out = conef_mod(_train_message(strategy, 2, g), ctxt, _train_fn(local_of))
    assert out.has_error() and reason in out.error.reason
    assert _state_bytes(ctxt) == before


def test_an_error_from_the_train_function_passes_through() -> None:
    strategy = _strategy()
    msg = _train_message(strategy, 1, _global())
    err = Message(Error(code=2, reason="user code failed"), reply_to=msg)
    assert conef_mod(msg, _context(), lambda m, c: err) is err


def test_a_hostile_train_message_is_refused_before_training() -> None:
    strategy = _strategy()
    msg = _train_message(strategy, 1, _global())
    msg.content["config"][P.ROUND_SEED_KEY] = "seed"
    called = []
    out = conef_mod(msg, _context(), lambda m, c: called.append(1))
    assert out.has_error() and P.ROUND_SEED_KEY in out.error.reason and not called
    msg = _train_message(strategy, 1, _global())
    msg.content["config"][P.SERVER_ROUND_KEY] = 10**12
    out = conef_mod(msg, _context(), lambda m, c: called.append(1))
    assert out.has_error() and "server-round" in out.error.reason and not called


def test_a_method_change_is_refused_unless_the_run_allows_a_state_reset() -> None:
    ctxt = _context()
    g = _global()
    conef_mod(_train_message(_strategy(sketch_ratio=0.1), 1, g), ctxt, _train_fn(_step))
    out = conef_mod(_train_message(_strategy(sketch_ratio=0.2), 2, g), ctxt, _train_fn(_step))
    assert out.has_error() and "allow-state-reset" in out.error.reason
    out = conef_mod(_train_message(_strategy(sketch_ratio=0.2, allow_state_reset=True), 2, g), ctxt,
                    _train_fn(_step))
    assert not out.has_error()
    assert out.content["metrics"][P.M_STATE_SOURCE] == P.STATE_SOURCES["mismatch"]


def test_state_dir_from_the_node_config_keeps_the_state_on_disk(tmp_path) -> None:
    strategy = _strategy()
    ctxt = _context(**{"state-dir": str(tmp_path)})
    out = conef_mod(_train_message(strategy, 1, _global()), ctxt, _train_fn(_step))
    assert out.content["metrics"][P.M_STATE_SAVED] == 1
    assert any(p.is_file() for p in tmp_path.rglob("*"))
    fresh = _context(**{"state-dir": str(tmp_path)})  # a restarted SuperNode: empty context.state
    out = conef_mod(_train_message(strategy, 2, _global()), fresh, _train_fn(_step))
    assert out.content["metrics"][P.M_STATE_SOURCE] == P.STATE_SOURCES["disk"]


def test_a_bad_state_dir_value_is_named() -> None:
    strategy = _strategy()
    ctxt = _context(**{"state-max-bytes": "lots"})
    out = conef_mod(_train_message(strategy, 1, _global()), ctxt, _train_fn(_step))
    assert out.has_error() and "state-max-bytes='lots'" in out.error.reason


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_the_peak_memory_of_the_round_is_reported_and_sees_what_the_train_function_allocates() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("the peak resident memory cannot be reset here (/proc/self/clear_refs)")
    strategy = _strategy()
    g = _global()
    conef_mod(_train_message(strategy, 1, g), _context(), _train_fn(_step))  # warm up imports and caches
    hold = []

    def greedy(m, c):
        hold.append(np.ones(64 * 1024 * 1024 // 8))  # 64 MiB, touched
        return _train_fn(_step)(m, c)

    gc.collect()
    rss_before = _current_rss_bytes()
    big = conef_mod(_train_message(strategy, 1, g), _context(node=8), greedy)
    # Compared with the resident memory just before the round (not with an earlier round, whose
    # baseline depends on what earlier tests left behind), the 64 MiB held by train must show.
    assert big.content["metrics"][P.M_PEAK_RSS] >= rss_before + 60 * 1024 * 1024


@pytest.mark.parametrize("kw,reason", [({"sketch_unit": 4096}, "sketch_unit=4096"),
                                       ({"compressor": "powersgd", "rank": 64}, "rank=64")])
def test_server_sent_sizes_beyond_the_model_are_refused_before_training(kw: dict, reason: str) -> None:
    strategy = _strategy("efsgd" if "compressor" in kw else "conef-cs", **kw)
    called = []
    out = conef_mod(_train_message(strategy, 1, _global()), _context(), lambda m, c: called.append(1))
    assert out.has_error() and reason in out.error.reason and not called
