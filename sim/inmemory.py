"""Run the real ServerApp and ClientApp in one process, without Ray or a SuperLink.

:class:`InMemoryGrid` implements Flower's ``Grid`` by calling the ClientApp on
each message directly, with one persistent ``Context`` per virtual node (so
``context.state`` keeps each client's error state across rounds exactly as
Flower's simulation engine does). The strategy, the ClientApp function and the
records exchanged are the same objects as in a Flower run; only the transport
is gone. It is used for long experiment grids (hundreds of rounds, many
methods) and for tests that need exact control (resume, restarts). The main
job and the end-to-end tests use Flower's own simulation engine
(:mod:`sim.run`).

**Sketch error reset (a simulation study, not a protocol feature).** With
``error_reset_every=H`` the grid averages the count-sketch error of the clients
that trained in every H-th training round, right after their replies (the paper's
App. G.4 "allreduce the compressed error among all workers every few iterations",
Basu et al. 2019, Xie et al. 2020): each such client's sketch table is replaced by
the mean table of the round's clients. A count sketch is linear with hashes shared by
every client (same seed and geometry, checked), so the mean table is the sketch of the
mean error, and the sum of the clients' errors is unchanged. The grid can reach every
client's ``context.state``; Flower's protocol, the ServerApp and ``conef_mod`` carry no
such exchange, so it exists only here. Its bytes are counted as if each participant
uploaded its sketch tables and downloaded the mean (``error_resets``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from conef_fl.flower.client_state import STATE_KEY
from conef_fl.flower.sampling import is_discovery

log = logging.getLogger(__name__)


class InMemoryGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app:
        The ClientApp to run for every message.
    num_nodes:
        Number of virtual nodes; node ``i`` gets ``partition-id = i``.
    run_config:
        The run config every node sees (``context.run_config``).
    node_ids:
        Optional explicit node IDs (default ``1001, 1002, ...``).
    error_reset_every:
        H > 0: every H-th training round, the round's clients' count sketches are replaced by their mean
        (see the module docstring); 0 (default): never.
    """

    def __init__(
        self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any], node_ids: list[int] | None = None,
        *, error_reset_every: int = 0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes={num_nodes} is out of range; allowed: >= 1")
        if isinstance(error_reset_every, bool) or not isinstance(error_reset_every, int) or error_reset_every < 0:
            raise ValueError(f"error_reset_every={error_reset_every!r} is out of range; allowed: an int >= 0")
        self.client_app = client_app
        ids = node_ids or [1001 + i for i in range(num_nodes)]
        self.contexts: dict[int, Context] = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(ids)
        }
        self.offline: set[int] = set()
        self.client_seconds = 0.0
        self._run = None
        self.error_reset_every = error_reset_every
        self.train_rounds = 0
        #: one entry per reset: training round, clients averaged, sketch bytes per client
        self.error_resets: list[dict[str, int]] = []

    # --- the parts of Grid a strategy uses -------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies, sent = [], []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline or node not in self.contexts:
                continue
            sent.append(msg)
            t0 = time.perf_counter()
            with _as_node(node):
                try:
                    reply = self.client_app(msg, self.contexts[node])
                except Exception as exc:  # a crashing client becomes an error reply, as in Flower
                    log.warning("node %d raised %s: %s", node, type(exc).__name__, exc)
                    reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.client_seconds += time.perf_counter() - t0
            replies.append(reply)
        trained = [(m.metadata.dst_node_id, r) for m, r in zip(sent, replies, strict=True)
                   if m.metadata.message_type == MessageType.TRAIN and not is_discovery(m)]
        if trained:
            self.train_rounds += 1
            if self.error_reset_every and self.train_rounds % self.error_reset_every == 0:
                ok = [self.contexts[n] for n, r in trained if not r.has_error()]
                nbytes = average_error_sketches(ok)
                self.error_resets.append({"train_round": self.train_rounds, "clients": len(ok),
                                          "sketch_bytes_per_client": nbytes})
        return replies

    def error_reset_bytes(self) -> tuple[int, int]:
        """Extra (uplink, downlink) bytes of the resets: every participant sends its sketch and gets the mean."""
        total = sum(r["clients"] * r["sketch_bytes_per_client"] for r in self.error_resets)
        return total, total

    # --- unused by strategies; implemented minimally ------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InMemoryGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InMemoryGrid only supports send_and_receive")


def average_error_sketches(contexts: Sequence[Context]) -> int:
    """Replace the count-sketch tables in each context's in-memory error state by their mean over ``contexts``.

    Returns the bytes of one client's sketch tables (0 when fewer than two clients hold a state).

    Raises
    ------
    ValueError
        A state on disk (``state-dir``), an error store that is not a count sketch, or sketches whose hash
        seed, geometry or dtype differ between clients (their mean would not be the sketch of the mean).
    """
    held = []
    for ctx in contexts:
        if STATE_KEY not in ctx.state:
            continue
        rec = ctx.state[STATE_KEY]
        blob = rec.get("blob")
        if not isinstance(blob, bytes):
            raise ValueError(f"error reset: node {ctx.node_id}'s state is not in memory (state-dir is not supported)")
        held.append((rec, torch.load(io.BytesIO(blob), weights_only=True)))
    if len(held) < 2:
        return 0
    sketches: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _, obj in held:
        for tname, tstate in obj["worker"]["tensors"].items():
            for sname, store in tstate.get("stores", {}).items():
                if store.get("kind") != "count-sketch":
                    raise ValueError(f"error reset needs count-sketch error stores; tensor {tname!r} store {sname!r} "
                                     f"is {store.get('kind')!r}")
                sketches.setdefault((tname, sname), []).append(store)
    nbytes = 0
    for key, stores in sketches.items():
        if len(stores) != len(held):
            raise ValueError(f"error reset: only {len(stores)} of {len(held)} clients hold sketch {key}")
        geo = {(s["hash"], int(s["seed"]), int(s["numel"]), int(s["rows"]), int(s["buckets"]), int(s["unit"]),
                s["dtype"]) for s in stores}
        if len(geo) != 1:
            raise ValueError(f"error reset: sketch {key} differs in hash seed/geometry/dtype between clients: {geo}")
        tables = [s["table"] for s in stores]
        mean = torch.stack([t.double() for t in tables]).mean(0).to(tables[0].dtype)
        for s in stores:
            s["table"] = mean.clone()
        nbytes += mean.numel() * mean.element_size()
    for rec, obj in held:
        buf = io.BytesIO()
        torch.save(obj, buf)
        rec["blob"] = buf.getvalue()
    return nbytes


@contextlib.contextmanager
def _as_node(node_id: int) -> Iterator[None]:
    prev = (TaskIdentity._node_id, TaskIdentity._run_id, TaskIdentity._task_id)
    TaskIdentity.node_id = node_id
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = node_id
    try:
        yield
    finally:
        TaskIdentity._node_id, TaskIdentity._run_id, TaskIdentity._task_id = prev


def run_inmemory(run_config: Mapping[str, Any], num_nodes: int, node_ids: list[int] | None = None, *,
                 error_reset_every: int = 0) -> InMemoryGrid:
    """Run the project's ServerApp over an :class:`InMemoryGrid`; returns the grid (contexts inside).

    ``node_ids`` (default ``1001, 1002, ...``) are the nodes' ids in partition order;
    ``error_reset_every``: see :class:`InMemoryGrid`.
    """
    from clients.client_app import app as client_app
    from server.server_app import app as server_app
    from sim.run import app_defaults

    cfg = {**app_defaults(), "min-available-nodes": num_nodes, **dict(run_config)}
    cfg["min-available-nodes"] = min(int(cfg["min-available-nodes"]), num_nodes)
    grid = InMemoryGrid(client_app, num_nodes, cfg, node_ids=node_ids, error_reset_every=error_reset_every)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with _as_node(0):
        server_app(grid, ctx)
    return grid
