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
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

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
    """

    def __init__(
        self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any], node_ids: list[int] | None = None
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes={num_nodes} is out of range; allowed: >= 1")
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

    # --- the parts of Grid a strategy uses -------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline or node not in self.contexts:
                continue
            t0 = time.perf_counter()
            with _as_node(node):
                try:
                    reply = self.client_app(msg, self.contexts[node])
                except Exception as exc:  # a crashing client becomes an error reply, as in Flower
                    log.warning("node %d raised %s: %s", node, type(exc).__name__, exc)
                    reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.client_seconds += time.perf_counter() - t0
            replies.append(reply)
        return replies

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


def run_inmemory(run_config: Mapping[str, Any], num_nodes: int, node_ids: list[int] | None = None) -> InMemoryGrid:
    """Run the project's ServerApp over an :class:`InMemoryGrid`; returns the grid (contexts inside).

    ``node_ids`` (default ``1001, 1002, ...``) are the nodes' ids in partition order.
    """
    from clients.client_app import app as client_app
    from server.server_app import app as server_app
    from sim.run import app_defaults

    cfg = {**app_defaults(), "min-available-nodes": num_nodes, **dict(run_config)}
    cfg["min-available-nodes"] = min(int(cfg["min-available-nodes"]), num_nodes)
    grid = InMemoryGrid(client_app, num_nodes, cfg, node_ids=node_ids)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with _as_node(0):
        server_app(grid, ctx)
    return grid
