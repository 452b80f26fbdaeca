"""Which nodes train in a round: seeded sampling over data partitions (or node ids).

Flower's simulation gives every virtual node a random 64-bit node id at start-up,
so sampling over the sorted node ids picks other data partitions in every run
(and other ones than the project's in-process grid, whose node ids follow the
partitions). :class:`NodeSampler` therefore samples over *partition ids*:

1. it learns each node's ``partition-id`` once, with a discovery message: a train
   message whose config carries :data:`DISCOVER_KEY` and no model.
   :func:`~conef_fl.flower.mod.conef_mod` answers it at once (the user's train
   function does not run) with the node config's ``partition-id``
   (metric ``conef.partition-id``, ``-1`` when the node has none); nodes that appear
   later (a restarted SuperNode) are asked when they first show up;
2. when every connected node has a distinct partition id, the seeded draw picks
   positions in the sorted *partition* list and maps them back to nodes, so the
   same seed trains the same partitions on every engine; otherwise (real
   deployments without a ``partition-id`` in the node config, or a node that did
   not answer) it draws over the sorted node ids, and logs why once.

``sample_by="node"`` skips the discovery and always draws over node ids.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from conef_fl.flower import protocol as P
from conef_fl.seeding import derive_seed

log = logging.getLogger(__name__)

#: How the wrapper picks nodes each round.
SAMPLINGS = ("random", "cyclic")
#: What the draw is over: data partitions (discovered) or node ids.
SAMPLE_BY = ("partition", "node")
DISCOVER_KEY = P.DISCOVER_KEY
_RECORD = P.DISCOVER_RECORD


def discovery_message(node_id: int) -> Message:
    """The discovery message for ``node_id``: a train message with no model."""
    return Message(RecordDict({_RECORD: ConfigRecord({DISCOVER_KEY: True})}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN)


def is_discovery(msg: Message) -> bool:
    """Whether ``msg`` is a discovery message."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return False
    return any(rec.get(DISCOVER_KEY) is True for rec in msg.content.config_records.values())


def discovery_reply(msg: Message, partition_id: int) -> Message:
    """The reply to a discovery message: the node's partition id (-1 when it has none)."""
    return Message(RecordDict({"metrics": MetricRecord({P.M_PARTITION: int(partition_id)})}), reply_to=msg)


def partition_of_reply(msg: Message) -> int | None:
    """The partition id a discovery reply names, or None (error, missing or malformed)."""
    if msg.has_error():
        return None
    for rec in msg.content.metric_records.values():
        value = rec.get(P.M_PARTITION)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def draw(keys: Sequence[int], size: int, *, seed: int, kind: str, server_round: int, sampling: str) -> list[int]:
    """Positions (sorted) of the ``size`` keys that ``kind`` uses in ``server_round``.

    ``sampling="random"``: a seeded sample (``derive_seed(seed, kind, round)``);
    ``"cyclic"``: ``size`` consecutive positions, round after round.

    Raises
    ------
    ValueError
        If ``sampling`` is unknown or ``size`` is not in ``0..len(keys)``.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r} is not valid; allowed: {', '.join(SAMPLINGS)}")
    if not 0 <= size <= len(keys):
        raise ValueError(f"size={size} is out of range; allowed: 0..{len(keys)}")
    if sampling == "cyclic":
        start = (server_round - 1) * size
        return sorted((start + i) % len(keys) for i in range(size))
    rng = random.Random(derive_seed(seed, kind, server_round))
    return sorted(rng.sample(range(len(keys)), size))


class NodeSampler:
    """Seeded node sampling over discovered partition ids (see the module docstring).

    Parameters
    ----------
    seed:
        Seeds the draws (with the kind and the round).
    sampling:
        ``"random"`` or ``"cyclic"`` (see :func:`draw`).
    sample_by:
        ``"partition"`` (discover partition ids, fall back to node ids) or ``"node"``.
    discovery_timeout:
        Seconds to wait for the discovery replies; nodes that did not answer count
        as having no partition id.
    """

    def __init__(self, *, seed: int, sampling: str = "random", sample_by: str = "partition",
                 discovery_timeout: float = 120.0) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r} is not valid; allowed: {', '.join(SAMPLINGS)}")
        if sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by={sample_by!r} is not valid; allowed: {', '.join(SAMPLE_BY)}")
        self.seed = seed
        self.sampling = sampling
        self.sample_by = sample_by
        self.discovery_timeout = float(discovery_timeout)
        #: node id -> partition id (None: the node has none or did not answer)
        self.partitions: dict[int, int | None] = {}
        self._fallback_logged = ""

    def discover(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask the nodes whose partition id is not known yet (one message each, all at once)."""
        unknown = [n for n in nodes if n not in self.partitions]
        if not unknown:
            return
        replies = grid.send_and_receive([discovery_message(n) for n in unknown], timeout=self.discovery_timeout)
        found: dict[int, int | None] = dict.fromkeys(unknown)
        for reply in replies:
            src = reply.metadata.src_node_id
            if src in found:
                found[src] = partition_of_reply(reply)
        self.partitions.update(found)
        missing = sum(v is None for v in found.values())
        log.info("discovered the partition ids of %d node(s)%s", len(unknown) - missing,
                 f"; {missing} without one" if missing else "")

    def keys(self, nodes: Sequence[int]) -> tuple[list[int], list[int]]:
        """(sort keys, nodes in that order): partition ids if every node has a distinct one, else node ids."""
        nodes = sorted(nodes)
        if self.sample_by == "partition":
            parts = [self.partitions.get(n) for n in nodes]
            why = ""
            if any(p is None for p in parts):
                why = f"{sum(p is None for p in parts)} of {len(nodes)} nodes have no partition id"
            elif len(set(parts)) != len(parts):
                why = "two nodes report the same partition id"
            if not why:
                order = sorted(range(len(nodes)), key=lambda i: parts[i])  # type: ignore[arg-type, return-value]
                return [parts[i] for i in order], [nodes[i] for i in order]  # type: ignore[misc]
            if why != self._fallback_logged:
                log.warning("sampling over node ids: %s", why)
                self._fallback_logged = why
        return list(nodes), list(nodes)

    def sample(self, grid: Grid, nodes: Sequence[int], size: int, *, kind: str, server_round: int) -> list[int]:
        """The ``size`` node ids that ``kind`` (train/evaluate) uses in ``server_round``, sorted."""
        if self.sample_by == "partition":
            self.discover(grid, nodes)
        _, ordered = self.keys(nodes)
        picks = draw(ordered, size, seed=self.seed, kind=kind, server_round=server_round, sampling=self.sampling)
        return sorted(ordered[i] for i in picks)
