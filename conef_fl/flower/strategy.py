"""ConEFStrategy: a Flower ``FedAvg`` for compressed, error-feedback client updates.

Clients train locally, form ``u = x_global − x_local`` and send ``Q(u + ê)``
(see :mod:`conef_fl.feedback`). The strategy validates each reply against the
structure it expects, averages the payloads weighted by ``num-examples`` — in
compressed space and decompressed once when Q is all-reducible — and applies
the server step ``x ← x − η_s·Δ`` (optionally with server momentum).

A reply that fails validation is dropped with a logged reason naming the node
and the problem; the round continues with the others, and the global model is
never replaced by a non-finite one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from conef_fl.aggregate import average_payloads
from conef_fl.compressors.base import Compressor, Payload
from conef_fl.config import MethodConfig
from conef_fl.feedback import make_compressor_for
from conef_fl.flower.codec import decode_payloads, encode_payloads
from conef_fl.flower.downlink import DownlinkCompressor
from conef_fl.seeding import derive_seed
from conef_fl.validation import PayloadError, PayloadSpec, expected_spec

log = logging.getLogger(__name__)

#: Record names used by the client and the strategy.
PAYLOAD_KEY = "payload"
PAYLOAD_META_KEY = "payload-meta"
METRICS_KEY = "metrics"
METHOD_PREFIX = "conef."
DOWNLINK_PREFIX = "down."


def method_to_config(method: MethodConfig) -> dict[str, Any]:
    """Flatten a method config into ConfigRecord entries ``conef.<field>``."""
    return {METHOD_PREFIX + k: v for k, v in method.to_dict().items()}


def method_from_config(config: Mapping[str, Any], prefix: str = METHOD_PREFIX) -> MethodConfig:
    """Inverse of :func:`method_to_config` (ignores unrelated keys; validates)."""
    values = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    return MethodConfig.from_dict(values)


@dataclass
class RoundStats:
    """What happened in one training round (also the per-round results row)."""

    round: int
    sampled: int = 0
    replied: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    train_loss: float = float("nan")
    uplink_payload_bytes_mean: float = 0.0
    uplink_payload_bytes_total: int = 0
    uplink_record_bytes_total: int = 0
    dense_bytes_per_client: int = 0
    downlink_bytes_total: int = 0
    downlink_config_bytes_total: int = 0
    client_error_state_bytes_mean: float = 0.0
    client_serialized_state_bytes_total: int = 0
    clients_state_fresh: int = 0
    clients_state_from_memory: int = 0
    clients_state_from_disk: int = 0
    update_norm: float = float("nan")
    aggregate_seconds: float = 0.0
    #: wall seconds of the whole round (sampling, clients, aggregation, evaluation)
    round_seconds: float = 0.0
    rejections: list[str] = field(default_factory=list)


class ConEFStrategy(FedAvg):
    """Federated averaging of compressed updates with (contractive) error feedback on clients.

    Parameters
    ----------
    method:
        The compression method the clients run (sent to them every round).
    method_name:
        Registry name of the method (for logs and results).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes:
        As in :class:`flwr.serverapp.strategy.FedAvg`.
    min_available_nodes:
        Nodes to wait for before sampling (set it to the expected number of nodes,
        otherwise round 1 samples from whoever connected first).
    server_lr:
        Server step size ``η_s`` (> 0).
    server_momentum:
        Server momentum ``μ ∈ [0, 1)`` (0 = none).
    seed:
        Seeds the round seeds (shared randomness of all-reducible compressors) and
        client sampling (the global ``random`` module is never used).
    train_config:
        Extra settings sent to clients every round (local epochs, learning rate, ...).
    train_config_fn:
        Optional ``server_round -> settings`` whose values override ``train_config`` in
        that round (e.g. a decayed ``local-lr``, see ``ServerSettings.round_train_config``).
    max_update_norm:
        Optional bound: a client whose decoded update has a larger L2 norm is rejected.
    downlink:
        Compress the downlink too (None: clients get the dense model). The server keeps
        its own error; stale clients get the updates they missed or the dense model
        (see :mod:`conef_fl.flower.downlink`).
    downlink_log_rounds:
        Rounds of downlink payloads kept for catching up stale clients.
    """

    def __init__(
        self,
        method: MethodConfig,
        *,
        method_name: str = "custom",
        fraction_train: float = 0.1,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        seed: int = 0,
        train_config: Mapping[str, Any] | None = None,
        train_config_fn: Callable[[int], Mapping[str, Any]] | None = None,
        max_update_norm: float | None = None,
        downlink: MethodConfig | None = None,
        downlink_log_rounds: int = 50,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr={server_lr!r} is out of range; allowed: > 0")
        if not (0.0 <= server_momentum < 1.0):
            raise ValueError(f"server_momentum={server_momentum!r} is out of range; allowed: [0, 1)")
        if not (0.0 <= fraction_train <= 1.0):
            raise ValueError(f"fraction_train={fraction_train!r} is out of range; allowed: [0, 1]")
        if max_update_norm is not None and not (math.isfinite(max_update_norm) and max_update_norm > 0):
            raise ValueError(f"max_update_norm={max_update_norm!r} is out of range; allowed: > 0 or None")
        self.method = method
        self.method_name = method_name
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.seed = int(seed)
        self.train_config = dict(train_config or {})
        self.train_config_fn = train_config_fn
        self.max_update_norm = max_update_norm
        self.compressor: Compressor = make_compressor_for(method)
        self.history: list[RoundStats] = []
        self.momentum_buffer: dict[str, torch.Tensor] | None = None
        self._global: dict[str, torch.Tensor] | None = None
        self._round_seed: int | None = None
        self._sampled: int = 0
        self._downlink: int = 0
        self._downlink_cfg: int = 0
        self.downlink_config = downlink
        self.downlink_log_rounds = downlink_log_rounds
        self.downlink: DownlinkCompressor | None = None
        self._sent_version: dict[int, int] = {}

    # ------------------------------------------------------------------ helpers
    def round_seed(self, server_round: int) -> int:
        """The shared seed of ``server_round`` (identical for every client of the round)."""
        return derive_seed(self.seed, "round", server_round)

    def summary(self) -> None:
        """Log the configuration."""
        log.info(
            "ConEFStrategy: method=%s (%s), fraction_train=%.3f, min_available_nodes=%d, server_lr=%g, "
            "server_momentum=%g, seed=%d",
            self.method_name, self.method, self.fraction_train, self.min_available_nodes, self.server_lr,
            self.server_momentum, self.seed,
        )

    def _wait_and_sample(self, grid: Grid, fraction: float, min_nodes: int, server_round: int, tag: str) -> list[int]:
        """Wait for ``min_available_nodes``, then sample ``max(fraction·N, min_nodes)`` with our own RNG."""
        waited = 0.0
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if waited % 10 == 0:
                log.info("waiting for nodes: %d connected, %d expected", len(nodes), self.min_available_nodes)
            time.sleep(1.0)
            waited += 1.0
        size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
        rng = random.Random(derive_seed(self.seed, tag, server_round))
        return sorted(rng.sample(nodes, size))

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send them the global model, the round seed and the method settings.

        The caller's ``config`` is copied, never modified.
        """
        if self.fraction_train == 0.0:
            return []
        node_ids = self._wait_and_sample(grid, self.fraction_train, self.min_train_nodes, server_round, "train")
        self._global = {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32)) for k, v in arrays.items()}
        self._round_seed = self.round_seed(server_round)
        self._sampled = len(node_ids)
        cfg = ConfigRecord(dict(config))
        cfg.update(self.train_config)
        if self.train_config_fn is not None:
            cfg.update(dict(self.train_config_fn(server_round)))
        cfg.update(method_to_config(self.method))
        cfg["method-name"] = self.method_name
        cfg["server-round"] = server_round
        cfg["round-seed"] = self._round_seed
        log.info("round %d: sampled %d of %d nodes", server_round, len(node_ids), len(list(grid.get_node_ids())))
        if self.downlink_config is None:
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            self._downlink = arrays.count_bytes() * len(node_ids)
            self._downlink_cfg = cfg.count_bytes() * len(node_ids)
            return self._construct_messages(record, node_ids, "train")
        return self._downlink_messages(arrays, cfg, node_ids)

    def _downlink_messages(self, arrays: ArrayRecord, cfg: ConfigRecord, node_ids: list[int]) -> list[Message]:
        """Per-node messages: the dense model or the compressed updates the node missed."""
        assert self.downlink_config is not None and self._global is not None
        if self.downlink is None:
            self.downlink = DownlinkCompressor(
                self.downlink_config, self._global, max_log_rounds=self.downlink_log_rounds, seed=self.seed
            )
        dl = self.downlink
        cfg.update({DOWNLINK_PREFIX + k: v for k, v in self.downlink_config.to_dict().items()})
        cfg["model-version"] = dl.version
        encoded = {r: encode_payloads(p) for r, p in dl.log.items()}
        messages, total, cfg_total = [], 0, 0
        self._sent_version = {}
        for node in node_ids:
            plan = dl.plan(node)
            node_cfg = ConfigRecord(dict(cfg))
            if plan.dense:
                node_cfg["downlink-mode"] = "dense"
                content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_cfg})
                total += arrays.count_bytes()
            else:
                node_cfg["downlink-mode"] = "delta"
                node_cfg["base-version"] = plan.base
                node_cfg["downlink-rounds"] = list(plan.rounds)
                node_cfg["downlink-seeds"] = [dl.seeds[r] for r in plan.rounds]
                records: dict[str, Any] = {self.configrecord_key: node_cfg}
                for r in plan.rounds:
                    records[f"down-{r}"], records[f"down-{r}-meta"] = encoded[r]
                    total += encoded[r][0].count_bytes()
                    cfg_total += encoded[r][1].count_bytes()
                content = RecordDict(records)
            cfg_total += node_cfg.count_bytes()
            self._sent_version[node] = dl.version
            messages.append(Message(content=content, dst_node_id=node, message_type="train"))
        self._downlink = total
        self._downlink_cfg = cfg_total
        return messages

    def payload_specs(self, server_round: int) -> dict[str, PayloadSpec]:
        """Expected payload structure of every tensor in ``server_round``."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        seed = self.round_seed(server_round)
        if self.method.layerwise:
            return {
                k: expected_spec(self.compressor, tuple(v.shape), seed=seed, key=k) for k, v in self._global.items()
            }
        total = sum(v.numel() for v in self._global.values())
        return {"__flat__": expected_spec(self.compressor, (total,), seed=seed, key="__flat__")}

    def _check_reply(self, msg: Message, specs: Mapping[str, PayloadSpec]) -> tuple[dict[str, Payload], dict]:
        content = msg.content
        for need in (PAYLOAD_KEY, PAYLOAD_META_KEY, METRICS_KEY):
            if need not in content:
                raise PayloadError(f"reply has no {need!r} record (has {sorted(content.keys())})")
        arrays, meta, metrics = content[PAYLOAD_KEY], content[PAYLOAD_META_KEY], content[METRICS_KEY]
        if not isinstance(arrays, ArrayRecord) or not isinstance(meta, ConfigRecord):
            raise PayloadError("payload records have the wrong record types")
        if not isinstance(metrics, MetricRecord):
            raise PayloadError("metrics record has the wrong type")
        n = metrics.get(self.weighted_by_key)
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise PayloadError(f"{self.weighted_by_key}={n!r} must be a positive number")
        payloads = decode_payloads(arrays, meta, specs)
        stats = {
            "num-examples": float(n),
            "train-loss": float(metrics.get("train-loss", float("nan"))),
            "payload-bytes": sum(p.nbytes for p in payloads.values()),
            "record-bytes": arrays.count_bytes() + meta.count_bytes(),
            "error-state-bytes": float(metrics.get("error-state-bytes", 0.0)),
            "serialized-state-bytes": float(metrics.get("serialized-state-bytes", 0.0)),
            "state-source": int(metrics.get("state-source", 0)),
        }
        return payloads, stats

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, average payloads, apply the server step; bad replies are dropped."""
        t0 = time.perf_counter()
        replies = list(replies)
        stats = RoundStats(round=server_round, sampled=self._sampled, replied=len(replies))
        stats.downlink_bytes_total = self._downlink
        stats.downlink_config_bytes_total = self._downlink_cfg
        specs = self.payload_specs(server_round)
        accepted: list[tuple[dict[str, Payload], dict]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                if self.downlink is not None:
                    self.downlink.forget(node)
                stats.failed += 1
                log.warning("round %d: node %s replied with an error: %s", server_round, node, msg.error.reason)
                continue
            if self.downlink is not None and node in self._sent_version:
                self.downlink.mark_synced(node, self._sent_version[node])
            try:
                payloads, info = self._check_reply(msg, specs)
                if self.max_update_norm is not None:
                    norm = self._update_norm(payloads)
                    if not norm <= self.max_update_norm:
                        raise PayloadError(f"update norm {norm:.4g} exceeds max_update_norm={self.max_update_norm}")
            except (PayloadError, ValueError, TypeError, KeyError) as exc:
                stats.rejected += 1
                reason = f"node {node}: {exc}"
                stats.rejections.append(reason)
                log.warning("round %d: rejected reply from %s", server_round, reason)
                continue
            accepted.append((payloads, info))
        stats.accepted = len(accepted)
        assert self._global is not None
        dense = 4 * sum(v.numel() for v in self._global.values())
        stats.dense_bytes_per_client = dense
        new_arrays: ArrayRecord | None = None
        if accepted:
            weights = [info["num-examples"] for _, info in accepted]
            delta = self._average([p for p, _ in accepted], weights)
            new_global = self._server_step(delta)
            if new_global is not None:
                self._global = new_global
                new_arrays = ArrayRecord({k: _array(v) for k, v in new_global.items()})
                stats.update_norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
            wsum = sum(weights)
            losses = [(info["train-loss"], w) for (_, info), w in zip(accepted, weights, strict=True)]
            finite = [(loss, w) for loss, w in losses if math.isfinite(loss)]
            if finite:
                stats.train_loss = sum(loss * w for loss, w in finite) / sum(w for _, w in finite)
            stats.uplink_payload_bytes_total = int(sum(info["payload-bytes"] for _, info in accepted))
            stats.uplink_payload_bytes_mean = stats.uplink_payload_bytes_total / len(accepted)
            stats.uplink_record_bytes_total = int(sum(info["record-bytes"] for _, info in accepted))
            stats.client_error_state_bytes_mean = sum(info["error-state-bytes"] for _, info in accepted) / len(accepted)
            stats.client_serialized_state_bytes_total = int(sum(info["serialized-state-bytes"] for _, info in accepted))
            sources = [info["state-source"] for _, info in accepted]
            stats.clients_state_fresh = sources.count(0)
            stats.clients_state_from_memory = sources.count(1)
            stats.clients_state_from_disk = sources.count(2)
            del wsum
        else:
            log.warning("round %d: no valid replies; the global model is unchanged", server_round)
        stats.aggregate_seconds = time.perf_counter() - t0
        self.history.append(stats)
        metrics = MetricRecord(
            {
                "train-loss": stats.train_loss if math.isfinite(stats.train_loss) else 0.0,
                "accepted": stats.accepted,
                "rejected": stats.rejected,
                "failed": stats.failed,
                "uplink-payload-bytes-mean": float(stats.uplink_payload_bytes_mean),
                "uplink-payload-bytes-total": float(stats.uplink_payload_bytes_total),
                "dense-bytes-per-client": float(dense),
                "client-error-state-bytes-mean": float(stats.client_error_state_bytes_mean),
            }
        )
        log.info(
            "round %d: accepted %d/%d replies (rejected %d, failed %d), train loss %.4f, uplink %.1f KB/client "
            "(dense %.1f KB), client error state %.1f KB",
            server_round, stats.accepted, stats.replied, stats.rejected, stats.failed, stats.train_loss,
            stats.uplink_payload_bytes_mean / 1e3, dense / 1e3, stats.client_error_state_bytes_mean / 1e3,
        )
        return new_arrays, metrics

    def _update_norm(self, payloads: Mapping[str, Payload]) -> float:
        sq = 0.0
        for p in payloads.values():
            sq += float((self.compressor.decompress(p).double() ** 2).sum())
        return math.sqrt(sq)

    def _average(self, replies: list[dict[str, Payload]], weights: list[float]) -> dict[str, torch.Tensor]:
        assert self._global is not None
        keys = list(replies[0])
        avg = {k: average_payloads(self.compressor, [r[k] for r in replies], weights) for k in keys}
        if self.method.layerwise:
            return avg
        flat = avg["__flat__"].reshape(-1)
        out, off = {}, 0
        for k, v in self._global.items():
            out[k] = flat[off : off + v.numel()].view(v.shape)
            off += v.numel()
        return out

    def _server_step(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``x − η_s·Δ`` (with momentum ``m ← μ·m + Δ`` when μ > 0); None if the result is not finite."""
        assert self._global is not None
        step = dict(delta)
        if self.server_momentum > 0:
            if self.momentum_buffer is None:
                self.momentum_buffer = {k: torch.zeros_like(v) for k, v in self._global.items()}
            for k in step:
                self.momentum_buffer[k].mul_(self.server_momentum).add_(step[k])
            step = self.momentum_buffer
        new = {k: self._global[k] - self.server_lr * step[k].to(self._global[k].dtype) for k in self._global}
        if not all(bool(torch.isfinite(v).all()) for v in new.values()):
            log.error("server step produced NaN/Inf; keeping the previous global model")
            return None
        if self.downlink is not None:
            self.downlink.step({k: self.server_lr * step[k].to(torch.float32) for k in self._global},
                               seed=self._round_seed)
            return {k: v.clone() for k, v in self.downlink.model.items()}
        return new

    # ------------------------------------------------------------------ the round loop
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        start_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord, Result], None] | None = None,
    ) -> Result:
        """Run rounds ``start_round..num_rounds`` (FedAvg's loop, resumable).

        ``on_round_end(round, arrays, result)`` runs after each round's aggregation and
        evaluation (the ServerApp checkpoints there). With ``start_round > 1`` the initial
        evaluation is skipped: the run continues a checkpointed one.
        """
        if not 1 <= start_round <= num_rounds + 1:
            raise ValueError(f"start_round={start_round} is out of range; allowed: 1..{num_rounds + 1}")
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        result.arrays = initial_arrays
        if evaluate_fn is not None and start_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        arrays = initial_arrays
        for current_round in range(start_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", current_round, num_rounds)
            t_round = time.perf_counter()
            replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid), timeout=timeout
            )
            agg_arrays, agg_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[current_round] = agg_metrics
            eval_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout
            )
            agg_eval = self.aggregate_evaluate(current_round, eval_replies)
            if agg_eval is not None:
                result.evaluate_metrics_clientapp[current_round] = agg_eval
            if evaluate_fn is not None:
                res = evaluate_fn(current_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
            if self.history and self.history[-1].round == current_round:
                self.history[-1].round_seconds = time.perf_counter() - t_round
            if on_round_end is not None:
                on_round_end(current_round, arrays, result)
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Strategy state for checkpoints: per-round history and the server momentum buffer."""
        return {
            "method": self.method.to_dict(),
            "seed": self.seed,
            "history": [asdict(h) for h in self.history],
            "momentum": self.momentum_buffer,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the method and seed must match this strategy's)."""
        if state.get("method") != self.method.to_dict():
            raise ValueError(f"checkpoint is for method {state.get('method')}, strategy has {self.method.to_dict()}")
        if state.get("seed") != self.seed:
            raise ValueError(f"checkpoint has seed {state.get('seed')}, strategy has {self.seed}")
        self.history = [RoundStats(**h) for h in state.get("history", [])]
        mom = state.get("momentum")
        self.momentum_buffer = {k: v.clone() for k, v in mom.items()} if mom else None


def _array(t: torch.Tensor):
    from flwr.app import Array

    return Array(t.detach().cpu().contiguous().numpy())


MetricsFn = Callable[[int, ArrayRecord], MetricRecord | None]
