"""ClientApp: local training, then one error-feedback compression step of the model update.

Per round a client
1. loads the global model from the message and trains it on its partition
   (epochs or steps, batch size, learning rate, momentum from the message config);
2. forms ``u = x_global − x_local`` and runs one ``step`` of its
   :class:`~conef_fl.worker.CompressionWorker` with the round's shared seed;
3. replies with the payload in its wire dtypes (``"payload"`` ArrayRecord +
   ``"payload-meta"`` ConfigRecord) and metrics (``num-examples``, ``train-loss``,
   ``uplink-bytes``, ``error-state-bytes``, ``dense-bytes``).

The error state lives in ``context.state`` between rounds as the serialized
compressed state (a count sketch for ConEF), never as a dense copy.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.downlink import receive_global_model
from clients.settings import ClientSettings
from clients.state import load_worker, save_worker
from conef_fl.flower.codec import encode_payloads
from conef_fl.flower.strategy import METRICS_KEY, PAYLOAD_KEY, PAYLOAD_META_KEY, method_from_config
from conef_fl.seeding import derive_seed
from conef_fl.tasks import (
    build_model,
    check_train_device,
    evaluate,
    load_task_data_shared,
    partition_indices,
    train_local,
)
from conef_fl.worker import CompressionWorker

log = logging.getLogger(__name__)

app = ClientApp()


def _load_partition(settings: ClientSettings):
    task = load_task_data_shared(settings.dataset, settings.data_dir or None, seed=settings.seed)
    parts = partition_indices(
        task, settings.num_partitions, settings.partitioning, alpha=settings.dirichlet_alpha, seed=settings.seed
    )
    if not 0 <= settings.partition_id < len(parts):
        raise ValueError(f"partition-id={settings.partition_id} is out of range; allowed: 0..{len(parts) - 1}")
    return task, parts[settings.partition_id]


def _model_from(msg: Message, task, settings: ClientSettings, context: Context | None = None) -> torch.nn.Module:
    model = build_model(task, settings.model)
    if context is not None and "downlink-mode" in msg.content["config"]:
        state = receive_global_model(msg, context, model.state_dict())
    else:
        state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally, compress the update with error feedback, reply with the payload."""
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    settings = ClientSettings.from_context(context, cfg)
    method = method_from_config(cfg)
    task, idx = _load_partition(settings)
    model = _model_from(msg, task, settings, context)
    x_global = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server_round = int(cfg.get("server-round", 0))
    gen = torch.Generator().manual_seed(derive_seed(settings.seed, "client", settings.partition_id, server_round))
    idx_t = torch.tensor(idx, dtype=torch.long)
    model.to(check_train_device(settings.train_device))  # compression stays on the CPU
    out = train_local(
        model,
        task.x_train.index_select(0, idx_t),
        task.y_train.index_select(0, idx_t),
        epochs=settings.local_epochs,
        steps=settings.local_steps or None,
        batch_size=settings.batch_size,
        lr=settings.local_lr,
        momentum=settings.local_momentum,
        weight_decay=settings.weight_decay,
        generator=gen,
    )
    local = {k: v.cpu() for k, v in model.state_dict().items()}
    update = {k: x_global[k].sub_(local[k]) for k in x_global}  # u = x_global − x_local, in place
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    worker = load_worker(context, method, shapes, settings, server_round)
    if worker is None:
        worker = CompressionWorker(method, shapes)
    payloads = worker.step(update, seed=int(cfg["round-seed"]), consume=True)
    state_bytes = save_worker(context, worker, settings, server_round)
    arrays, meta = encode_payloads(payloads)
    metrics = MetricRecord(
        {
            "num-examples": int(out["num_examples"]),
            "train-loss": float(out["loss"]),
            "uplink-bytes": int(sum(p.nbytes for p in payloads.values())),
            "error-state-bytes": int(worker.nbytes),
            "serialized-state-bytes": int(state_bytes),
            "dense-bytes": int(4 * worker.numel),
            # where the error state came from: 0 = fresh (zero error), 1 = context.state, 2 = disk
            "state-source": {"memory": 1, "disk": 2}.get(getattr(worker, "restored_from", ""), 0),
        }
    )
    content = RecordDict({PAYLOAD_KEY: arrays, PAYLOAD_META_KEY: meta, METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's share of the test set."""
    torch.set_num_threads(1)
    cfg = msg.content["config"] if "config" in msg.content else {}
    settings = ClientSettings.from_context(context, cfg)
    task = load_task_data_shared(settings.dataset, settings.data_dir or None, seed=settings.seed)
    model = _model_from(msg, task, settings)
    n_test = task.x_test.shape[0]
    lo = n_test * settings.partition_id // settings.num_partitions
    hi = n_test * (settings.partition_id + 1) // settings.num_partitions
    if hi <= lo:
        lo, hi = 0, n_test
    res = evaluate(model, task.x_test[lo:hi], task.y_test[lo:hi])
    metrics = MetricRecord(
        {"num-examples": int(res["num_examples"]), "eval-loss": float(res["loss"]), "eval-acc": float(res["accuracy"])}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


__all__ = ["app", "ArrayRecord"]
