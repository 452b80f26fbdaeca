"""Sampling by partition: discovery, the seeded draw over partitions, the fallback to node ids."""

from __future__ import annotations

import logging
import random

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from conef_fl.flower import conef_mod
from conef_fl.flower import protocol as P
from conef_fl.flower import sampling as S
from conef_fl.flower.sampling import NodeSampler, discovery_message, draw
from conef_fl.seeding import derive_seed

pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    """Nodes with given ids and partition ids; answers discovery through ``conef_mod``; counts messages."""

    def __init__(self, partitions: dict[int, int | None]) -> None:
        self.partitions = partitions
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            pid = self.partitions[node]
            ctx = Context(run_id=1, node_id=node, node_config={} if pid is None else {"partition-id": pid},
                          state=RecordDict(), run_config={})
            replies.append(conef_mod(msg, ctx, _no_train))
        return replies


def _no_train(msg: Message, ctx: Context) -> Message:
    raise AssertionError("the train function must not run for a discovery message")


def _random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(n)]


def _sampled_partitions(sampler: NodeSampler, grid: _Grid, size: int, rounds: int) -> list[list[int]]:
    nodes = grid.get_node_ids()
    return [sorted(grid.partitions[n] for n in sampler.sample(grid, nodes, size, kind="train", server_round=r))
            for r in range(1, rounds + 1)]


@pytest.mark.parametrize("sampling", ["random", "cyclic"])
def test_same_seed_same_partitions_whatever_the_node_ids(sampling: str) -> None:
    n = 20
    runs = []
    for ids_seed in (1, 2, 3):  # three engines/runs: other random node ids, other order
        ids = _random_ids(n, ids_seed)
        grid = _Grid(dict(zip(ids, random.Random(ids_seed).sample(range(n), n), strict=True)))
        runs.append(_sampled_partitions(NodeSampler(seed=7, sampling=sampling), grid, 5, 6))
    assert runs[0] == runs[1] == runs[2]
    # and they are the partitions of the in-process grid's numbering (node ids in partition order)
    inproc = _Grid({1001 + i: i for i in range(n)})
    assert _sampled_partitions(NodeSampler(seed=7, sampling=sampling), inproc, 5, 6) == runs[0]
    # sampling over node ids instead picks other partitions for random ids
    by_node = _sampled_partitions(NodeSampler(seed=7, sampling=sampling, sample_by="node"),
                                  _Grid(dict(zip(_random_ids(n, 1), range(n), strict=True))), 5, 6)
    assert by_node != runs[0]


def test_the_draw_is_the_wrappers_former_draw_over_sorted_nodes() -> None:
    nodes = sorted(_random_ids(30, 4))
    for rnd in (1, 2, 9):
        former = sorted(random.Random(derive_seed(5, "train", rnd)).sample(nodes, 7))
        assert sorted(nodes[i] for i in draw(nodes, 7, seed=5, kind="train", server_round=rnd,
                                             sampling="random")) == former
    assert draw(list(range(10)), 4, seed=0, kind="train", server_round=3, sampling="cyclic") == [0, 1, 8, 9]


def test_discovery_asks_each_node_once_and_new_nodes_when_they_appear() -> None:
    grid = _Grid({11: 0, 12: 1, 13: 2})
    sampler = NodeSampler(seed=0)
    sampler.sample(grid, [11, 12, 13], 2, kind="train", server_round=1)
    sampler.sample(grid, [11, 12, 13], 2, kind="train", server_round=2)
    assert sorted(grid.asked) == [11, 12, 13]
    grid.partitions[14] = 3  # a new SuperNode
    sampler.sample(grid, [11, 12, 13, 14], 2, kind="evaluate", server_round=3)
    assert sorted(grid.asked) == [11, 12, 13, 14]
    assert sampler.partitions == {11: 0, 12: 1, 13: 2, 14: 3}
    no_discovery = _Grid({11: 0, 12: 1})
    NodeSampler(seed=0, sample_by="node").sample(no_discovery, [11, 12], 1, kind="train", server_round=1)
    assert no_discovery.asked == []


@pytest.mark.parametrize("partitions, why", [
    ({5: 0, 6: None, 7: 2}, "1 of 3 nodes have no partition id"),
    ({5: 0, 6: 0, 7: 2}, "two nodes report the same partition id"),
])
def test_nodes_without_distinct_partition_ids_fall_back_to_node_ids(partitions, why, caplog) -> None:
    grid = _Grid(partitions)
    sampler = NodeSampler(seed=3)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        for rnd in (1, 2):
            got = sampler.sample(grid, [7, 5, 6], 2, kind="train", server_round=rnd)
            want = sorted(NodeSampler(seed=3, sample_by="node").sample(grid, [5, 6, 7], 2, kind="train",
                                                                       server_round=rnd))
            assert got == want
    assert caplog.text.count(why) == 1  # logged once, with the reason


def test_a_node_that_does_not_answer_counts_as_without_partition() -> None:
    class Silent(_Grid):
        def send_and_receive(self, messages, *, timeout=None):
            self.timeout = timeout
            return [r for r in super().send_and_receive(messages) if r.metadata.src_node_id != 6]

    grid = Silent({5: 0, 6: 1})
    sampler = NodeSampler(seed=0, discovery_timeout=4.0)
    sampler.sample(grid, [5, 6], 1, kind="train", server_round=1)
    assert sampler.partitions == {5: 0, 6: None} and grid.timeout == 4.0


def test_conef_mod_answers_discovery_with_the_partition_id_and_minus_one_without() -> None:
    for node_config, want in (({"partition-id": 4}, 4), ({}, -1)):
        ctx = Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(), run_config={})
        reply = conef_mod(discovery_message(3), ctx, _no_train)
        assert not reply.has_error()
        assert reply.content["metrics"][P.M_PARTITION] == want
        assert S.partition_of_reply(reply) == (want if want >= 0 else None)
        assert dict(ctx.state) == {}  # discovery stores nothing


def test_a_train_message_with_other_config_is_not_discovery() -> None:
    msg = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    assert not S.is_discovery(msg)
    ev = Message(RecordDict({"c": ConfigRecord({S.DISCOVER_KEY: True})}), dst_node_id=1,
                 message_type=MessageType.EVALUATE)
    assert not S.is_discovery(ev)


@pytest.mark.parametrize("kw, word", [({"sampling": "striped"}, "sampling='striped'"),
                                      ({"sample_by": "host"}, "sample_by='host'")])
def test_bad_settings_are_named(kw, word) -> None:
    with pytest.raises(ValueError, match=word):
        NodeSampler(seed=0, **kw)
    with pytest.raises(ValueError, match="size=4"):
        draw([1, 2, 3], 4, seed=0, kind="train", server_round=1, sampling="random")
