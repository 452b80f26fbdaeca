"""ClientApp: a plain Flower train/evaluate pair (the project's models and data) with ``mods=[conef_mod]``.

The train function is what any Flower quickstart writes: load the global model
from the message, train it on this node's partition, reply with the local model
as an ``ArrayRecord`` and ``num-examples`` / ``train-loss`` metrics. Everything
ConEF does (forming the update, error feedback, the compressed reply, the
client's error state) happens in :func:`conef_fl.flower.conef_mod`, exactly as it
would in a user's own app.

Settings come from the run config and the node config (``partition-id``,
``num-partitions``, ``data-dir``, ``state-dir``, ``train-device``), validated by
:mod:`conef_fl.app_config`; the round number and FedProx's ``proximal-mu`` come
with each train message.
"""

from __future__ import annotations

import logging
import sys

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.task import client_config, load_partition, partition_of
from conef_fl.app_config import local_lr_at
from conef_fl.flower import conef_mod
from conef_fl.seeding import derive_seed
from conef_fl.tasks import build_model, check_train_device, evaluate, train_local

log = logging.getLogger(__name__)

app = ClientApp(mods=[conef_mod])


def _setup(msg: Message, context: Context):
    """This node's settings, partition and data, and the message's model loaded into the task's network."""
    torch.set_num_threads(1)
    cfg = client_config(context)
    partition_id, num_partitions = partition_of(context, cfg)
    data = load_partition(cfg, partition_id, num_partitions)
    model = build_model(data[0], cfg.model)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return cfg, partition_id, num_partitions, data, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this node's partition; reply with the local model."""
    cfg, partition_id, num_partitions, (task, x, y), model = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 1))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "client", partition_id, server_round))
    model.to(check_train_device(cfg.train_device))
    out = train_local(
        model, x, y,
        epochs=cfg.local_epochs,
        steps=None if cfg.local_epochs else cfg.local_steps,  # local-epochs > 0 wins (see conef_fl.app_config)
        batch_size=cfg.batch_size,
        lr=local_lr_at(cfg, server_round),
        momentum=cfg.local_momentum,
        weight_decay=cfg.weight_decay,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        generator=gen,
    )
    metrics = MetricRecord({"num-examples": int(out["num_examples"]), "train-loss": float(out["loss"])})
    node = ray_node()
    if node is not None:
        metrics["ray-node"] = node
    local = ArrayRecord({k: v.cpu() for k, v in model.state_dict().items()})
    return Message(RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def ray_node() -> int | None:
    """The Ray node this ClientApp runs on, as a small integer (its node id's first 6 hex digits).

    None outside a Ray worker (deployment SuperNodes): Ray is then not imported.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return int(ray.get_runtime_context().get_node_id()[:6], 16)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's share of the test set."""
    _, partition_id, num_partitions, (task, _, _), model = _setup(msg, context)
    n_test = task.x_test.shape[0]
    lo, hi = n_test * partition_id // num_partitions, n_test * (partition_id + 1) // num_partitions
    if hi <= lo:
        lo, hi = 0, n_test
    res = evaluate(model, task.x_test[lo:hi], task.y_test[lo:hi])
    metrics = MetricRecord(
        {"num-examples": int(res["num_examples"]), "eval-loss": float(res["loss"]), "eval-acc": float(res["accuracy"])}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
