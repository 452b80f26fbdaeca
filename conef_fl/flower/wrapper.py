"""``ConEF``: a strategy wrapper that adds compressed, error-feedback uplinks to any Flower strategy.

Wrap the strategy you already use and add :func:`~conef_fl.flower.mod.conef_mod`
to your ClientApp::

    strategy = ConEF(FedAdam(fraction_train=0.1, eta=0.01), method="conef-cs", k_ratio=0.1)

Per round the wrapper

1. waits for nodes (with a deadline) and samples them with its own seeded RNG
   (the inner strategy's ``fraction_train`` / ``min_train_nodes``) over node ids
   or, with ``sample_by="partition"``, over the nodes' data partitions
   (:mod:`conef_fl.flower.sampling`), then lets the inner strategy build its
   train messages for exactly those nodes;
2. adds the method config, the round's shared seed and the round to every message;
3. on the replies: refuses errors, duplicate replies, nodes that were not sampled
   and replies for another round *before* decoding anything; validates every
   reply (payload structure, NaN/Inf, weights, metrics); refuses updates whose
   norm exceeds ``norm_guard`` × the round's median (and ``max_update_norm``);
4. aggregates the accepted replies in node order (deterministic), one at a time:

   * **weighted-mean strategies** (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi,
     FedAdagrad): the weighted mean of the updates, summed in compressed space
     when Q is all-reducible (decoded one reply at a time otherwise), is handed to
     the inner strategy as one reply ``x_global − mean(Δ)``; the inner strategy
     then does its own server step (FedAvgM's momentum, FedAdam's optimizer);
   * **per-reply strategies** (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan):
     each reply is decoded to the model ``x_global − Δ_i`` the inner strategy
     expects, and the inner strategy selects or combines them.

A refused reply is counted and logged with its node and reason; the round goes
on with the others, and the global model is never replaced by a non-finite one.
Evaluation passes through to the inner strategy.
"""

from __future__ import annotations

import array
import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import flwr.serverapp.strategy as fs
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from conef_fl.aggregate import DenseAccumulator
from conef_fl.compressors.base import Compressor, Payload, SelectiveCompressor
from conef_fl.compressors.topk import TopK
from conef_fl.config import MethodConfig
from conef_fl.feedback import make_compressor_for
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import ReplyDecoder, encode_array, encode_payloads
from conef_fl.flower.downlink import DownlinkCompressor
from conef_fl.flower.sampling import NodeSampler
from conef_fl.registry import method_config
from conef_fl.seeding import derive_seed
from conef_fl.validation import PayloadError, PayloadSpec, expected_spec
from conef_fl.worker import FLAT_KEY, unflatten

log = logging.getLogger(__name__)

#: Strategies whose aggregate is the weighted mean of the replies' models.
MEAN_STRATEGIES: tuple[type[Strategy], ...] = (fs.FedAvg, fs.FedAvgM, fs.FedProx, FedOpt, fs.FedAdam, fs.FedYogi,
                                               fs.FedAdagrad)
#: Mean strategies whose aggregate of one reply is that reply (no server step of their own).
_NO_SERVER_STEP: tuple[type[Strategy], ...] = (fs.FedAvg, fs.FedProx)
#: Strategies that select or combine the individual replies' models.
PER_REPLY_STRATEGIES: tuple[type[Strategy], ...] = (fs.FedMedian, fs.FedTrimmedAvg, fs.Krum, fs.MultiKrum, fs.Bulyan)
#: Strategies that cannot carry compressed float updates.
UNSUPPORTED: dict[type, str] = {
    fs.FedXgbBagging: "it aggregates serialized XGBoost trees (bytes), not float arrays",
    fs.FedXgbCyclic: "it aggregates serialized XGBoost trees (bytes), not float arrays",
}
#: Compressors whose payload is values at distinct coordinates (the norm needs no decoding).
_VALUE_SELECTING = (SelectiveCompressor, TopK)
#: The arrays of a value-selecting payload whose norm is its values' norm.
_VALUE_ARRAYS = frozenset({"values", "indices"})
#: Largest ``num-examples`` weight a reply may claim (their sum stays finite).
MAX_WEIGHT = 1e12
#: Inner-strategy attributes that hold cross-round state (checkpointed).
_INNER_STATE_ATTRS = ("momentum_vector", "m_t", "v_t")


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
    client_peak_rss_bytes_max: int = 0
    clients_state_fresh: int = 0
    clients_state_from_memory: int = 0
    clients_state_from_disk: int = 0
    clients_state_refused: int = 0
    clients_state_not_saved: int = 0
    update_norm: float = float("nan")
    norm_reference: float = float("nan")
    aggregate_seconds: float = 0.0
    #: wall seconds of the whole round (sampling, clients, aggregation, evaluation)
    round_seconds: float = 0.0
    rejections: list[str] = field(default_factory=list)


#: The per-reply numbers the round statistics need, in the order :class:`_Info` stores them.
_INFO_KEYS = (*P.CLIENT_METRICS, "peak-rss", "train-loss", "payload-bytes", "record-bytes")
_INFO_INDEX = {k: i for i, k in enumerate(_INFO_KEYS)}


class _Info:
    """One reply's numbers for the round statistics: a fixed-key view over one float64 array.

    Built per reply and added to the round's :class:`_RoundSums` at once (not kept).
    """

    __slots__ = ("_v",)

    def __init__(self) -> None:
        self._v = array.array("d", bytes(8 * len(_INFO_KEYS)))

    def __getitem__(self, key: str) -> float:
        return self._v[_INFO_INDEX[key]]

    def __setitem__(self, key: str, value: float) -> None:
        self._v[_INFO_INDEX[key]] = value


class _RoundSums:
    """The round statistics' per-reply numbers, summed as replies arrive: nothing is kept per reply.

    The train loss (a weighted mean) is summed exactly (Shewchuk's partials), so it equals
    ``math.fsum`` over the replies; the byte counts are integers and sum exactly.
    """

    __slots__ = ("n", "loss_w", "w", "payload_bytes", "record_bytes", "error_state", "serialized", "peak_rss",
                 "sources", "not_saved")

    def __init__(self) -> None:
        self.n = 0
        self.loss_w: list[float] = []
        self.w: list[float] = []
        self.payload_bytes = self.record_bytes = self.error_state = self.serialized = 0.0
        self.peak_rss = -math.inf
        self.sources: dict[int, int] = {}
        self.not_saved = 0

    def add(self, info: _Info, weight: float) -> None:
        self.n += 1
        loss = info["train-loss"]
        if math.isfinite(loss):
            _exact_add(self.loss_w, loss * weight)
            _exact_add(self.w, weight)
        self.payload_bytes += info["payload-bytes"]
        self.record_bytes += info["record-bytes"]
        self.error_state += info[P.M_ERROR_STATE_BYTES]
        self.serialized += info[P.M_SERIALIZED_STATE_BYTES]
        self.peak_rss = max(self.peak_rss, info["peak-rss"])
        source = int(info[P.M_STATE_SOURCE])
        self.sources[source] = self.sources.get(source, 0) + 1
        self.not_saved += not info[P.M_STATE_SAVED]


def _exact_add(partials: list[float], x: float) -> None:
    """Add ``x`` to the exact sum held in ``partials`` (Shewchuk's algorithm; ``math.fsum(partials)`` reads it)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class _Accepted:
    """Replies that passed validation: per reply its node, weight and norm (24 bytes) and the message reference.

    The norm guard needs only the norms; the statistics are summed in :class:`_RoundSums`.
    """

    __slots__ = ("nodes", "weights", "norms", "messages", "sums")

    def __init__(self) -> None:
        self.nodes = array.array("Q")
        self.weights = array.array("d")
        self.norms = array.array("d")
        self.messages: list[Message] = []
        self.sums = _RoundSums()

    def add(self, msg: Message, node: int, weight: float, norm: float) -> None:
        self.nodes.append(node)
        self.weights.append(weight)
        self.norms.append(norm)
        self.messages.append(msg)

    def __len__(self) -> int:
        return len(self.messages)


class _WeightedMean:
    """``Σ w_i Δ_i / Σ w_i`` over payloads added one at a time; in compressed space when Q is all-reducible.

    Memory: one running compressed sum per tensor (all-reducible Q: ``Compressor.sum_into_``, added
    in place) or one dense float32 accumulator (added to through
    :class:`~conef_fl.aggregate.DenseAccumulator`); nothing per reply. The dense accumulator is
    allocated through numpy, so that ``tracemalloc`` sees it on one timeline with the encoded new
    model that replaces it tensor by tensor (:meth:`release`).
    """

    def __init__(self, compressor: Compressor, specs: Mapping[str, PayloadSpec]) -> None:
        self.q = compressor
        self.total = 0.0
        self.running: dict[str, Payload] = {}
        self.acc = None if compressor.all_reducible else {
            k: torch.from_numpy(np.zeros(s.shape, dtype=np.float32)) for k, s in specs.items()}
        self.dense = DenseAccumulator(compressor)

    def add(self, payloads: Mapping[str, Payload], weight: float) -> None:
        if self.acc is None:
            for k, p in payloads.items():
                self.running[k] = self.q.sum_into_(self.running.get(k), p, weight)
        else:
            acc, add_ = self.acc, self.dense.add_
            for k, p in payloads.items():
                add_(p, acc[k], weight)
        self.total += weight

    def mean_of(self, key: str) -> torch.Tensor:
        """Dense float32 mean of one payload key (call once per key: a dense accumulator is divided in place)."""
        self.dense.release()  # nothing more is added: its scratch goes before the new model is built
        if self.acc is None:
            p = self.running[key]
            out = torch.zeros(p.shape, dtype=torch.float32)
            self.q.decompress_add_(p, out, alpha=1.0 / self.total)
            return out
        return self.acc[key].div_(self.total)

    def mean(self) -> dict[str, torch.Tensor]:
        """Dense float32 mean per payload key."""
        keys = self.running if self.acc is None else self.acc
        return {k: self.mean_of(k) for k in list(keys)}

    def release(self, key: str) -> None:
        """Drop the sum of ``key`` (its mean has been used): its memory goes back before the next tensor's."""
        if self.acc is None:
            self.running.pop(key, None)
        else:
            self.acc.pop(key, None)


def aggregation_mode(strategy: Strategy) -> str:
    """``"mean"`` or ``"per-reply"`` for ``strategy``; ``ValueError`` for strategies that cannot work."""
    for cls, why in UNSUPPORTED.items():
        if isinstance(strategy, cls):
            raise ValueError(f"ConEF cannot wrap {type(strategy).__name__}: {why}")
    if type(strategy).__module__.startswith("flwr.serverapp.strategy.dp_"):
        raise ValueError(f"ConEF cannot wrap {type(strategy).__name__}: differential-privacy clipping must see "
                         "the dense update before compression; wrap ConEF inside it is not supported either")
    if isinstance(strategy, ConEF):
        raise ValueError("the strategy is already wrapped with ConEF")
    if type(strategy) in MEAN_STRATEGIES:
        return "mean"
    # PER_REPLY_STRATEGIES, and any other strategy (e.g. a user's FedAvg subclass): hand it the decoded
    # models, which every strategy that averages, selects or combines models understands
    return "per-reply"


class _SampledGrid:
    """A view of a Grid whose ``get_node_ids`` returns only the nodes ConEF sampled."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._nodes = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class ConEF(Strategy):
    """Compressed uplinks with (contractive) error feedback around any Flower strategy.

    Parameters
    ----------
    strategy:
        The Flower strategy to wrap (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi,
        FedAdagrad, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, or your own
        ``FedAvg`` subclass).
    method:
        A method name of :mod:`conef_fl.registry` (``"conef-cs"``, ``"efsgd"``, ...)
        or a :class:`~conef_fl.config.MethodConfig`.
    seed:
        Seeds the round seeds (shared randomness of the compressors) and node sampling.
    norm_guard:
        Refuse replies whose update norm exceeds ``norm_guard`` × the round's (lower)
        median update norm; ``0`` switches the guard off. A round with a single reply
        compares it with the lower median of the previous round's accepted norms.
    max_update_norm:
        Optional absolute bound on a reply's update norm.
    node_wait_seconds:
        How long to wait for the inner strategy's ``min_available_nodes``; after that
        the round runs with the nodes that are there if at least ``min_train_nodes``
        are, and otherwise stops with a ``RuntimeError`` saying what to change.
    sampling:
        ``"random"`` (seeded; the inner strategy's fraction and minimum) or ``"cyclic"``
        (the same number of nodes, taken in node order round after round, so every node
        trains once every ``1/fraction`` rounds: for measuring state at scale).
    sample_by:
        ``"node"``: draw over the sorted node ids; ``"partition"`` (the app's default):
        draw over the nodes' data partitions, learnt with one discovery message per node
        (node ids where a node has none), so that a seed trains the same partitions on
        every engine (Flower's simulation gives nodes random ids).
    allow_state_reset:
        Clients whose stored error state is for another method config start from zero
        error instead of refusing the round.
    downlink:
        Compress the downlink too (server-side error feedback); None: dense model.
    downlink_log_rounds:
        Rounds of downlink payloads kept for catching up stale clients.
    **options:
        :class:`MethodConfig` fields (``k_ratio=0.1``, ``sketch_ratio=0.1``, ``beta=0.5``, ...).
    """

    def __init__(
        self,
        strategy: Strategy,
        method: str | MethodConfig = "conef-cs",
        *,
        seed: int = 0,
        norm_guard: float = 10.0,
        max_update_norm: float | None = None,
        node_wait_seconds: float = 120.0,
        sampling: str = "random",
        sample_by: str = "node",
        allow_state_reset: bool = False,
        downlink: MethodConfig | None = None,
        downlink_log_rounds: int = 50,
        **options: Any,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ValueError(f"strategy={strategy!r} is not a flwr.serverapp.strategy.Strategy")
        self.mode = aggregation_mode(strategy)
        self.inner = strategy
        if isinstance(method, MethodConfig):
            self.method = method.replace(**options) if options else method
            self.method_name = "custom"
        else:
            self.method = method_config(method, **{"seed": seed, **options})
            self.method_name = method
        for name, value, lo in (("norm_guard", norm_guard, 0.0), ("node_wait_seconds", node_wait_seconds, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
                raise ValueError(f"{name}={value!r} is out of range; allowed: a finite number >= {lo}")
        if max_update_norm is not None and (isinstance(max_update_norm, bool) or not isinstance(
                max_update_norm, (int, float)) or not (math.isfinite(max_update_norm) and max_update_norm > 0)):
            raise ValueError(f"max_update_norm={max_update_norm!r} is out of range; allowed: > 0 or None")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is out of range; allowed: an integer >= 0")
        self.sampler = NodeSampler(seed=seed, sampling=sampling, sample_by=sample_by,
                                   discovery_timeout=float(node_wait_seconds))
        self.seed = seed
        self.norm_guard = float(norm_guard)
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.node_wait_seconds = float(node_wait_seconds)
        self.allow_state_reset = bool(allow_state_reset)
        self.compressor: Compressor = make_compressor_for(self.method)
        self.downlink_config = downlink
        self.downlink_log_rounds = int(downlink_log_rounds)
        self.downlink: DownlinkCompressor | None = None
        self.history: list[RoundStats] = []
        self._global: dict[str, torch.Tensor] | None = None
        self._global_dtypes: dict[str, np.dtype] = {}
        self._sampled: set[int] = set()
        self._sent_version: dict[int, int] = {}
        self._downlink_bytes = (0, 0)
        self._norm_reference: float | None = None
        self._nodes_expected: int | None = None
        self._decoder: ReplyDecoder | None = None

    # ------------------------------------------------------------------ keys of the inner strategy
    @property
    def weighted_by_key(self) -> str:
        """The reply metric used as weight (the inner strategy's ``weighted_by_key``)."""
        return str(getattr(self.inner, "weighted_by_key", "num-examples"))

    @property
    def arrayrecord_key(self) -> str:
        return str(getattr(self.inner, "arrayrecord_key", "arrays"))

    @property
    def configrecord_key(self) -> str:
        return str(getattr(self.inner, "configrecord_key", "config"))

    def round_seed(self, server_round: int) -> int:
        """The shared seed of ``server_round`` (identical for every client of the round)."""
        return derive_seed(self.seed, "round", server_round)

    def summary(self) -> None:
        """Log the configuration, then the inner strategy's."""
        log.info("ConEF around %s (%s aggregation): method=%s (%s), norm_guard=%g, max_update_norm=%s, seed=%d",
                 type(self.inner).__name__, self.mode, self.method_name, self.method, self.norm_guard,
                 self.max_update_norm, self.seed)
        self.inner.summary()

    # ------------------------------------------------------------------ sampling
    def _wait_for_nodes(self, grid: Grid, need: int, at_least: int) -> list[int]:
        """Connected nodes once ``need`` are there, or after the deadline if ``at_least`` are.

        After a deadline passed with ``n < need`` nodes, later rounds expect only ``n`` (a node
        that died does not cost every following round the whole wait).
        """
        if self._nodes_expected is not None:
            need = max(at_least, min(need, self._nodes_expected))
        deadline = time.monotonic() + self.node_wait_seconds
        next_log = 0.0
        while True:
            nodes = sorted(grid.get_node_ids())
            now = time.monotonic()
            if len(nodes) >= need:
                return nodes
            if now >= deadline:
                if len(nodes) >= at_least:
                    log.warning("only %d of %d expected nodes connected after %.0f s; running with them",
                                len(nodes), need, self.node_wait_seconds)
                    self._nodes_expected = len(nodes)
                    return nodes
                raise RuntimeError(
                    f"only {len(nodes)} node(s) connected after {self.node_wait_seconds:.0f} s, but at least "
                    f"{at_least} are needed (min-train-nodes) and {need} expected (min-available-nodes). Start more "
                    f"SuperNodes, or in simulation pass --federation-config \"num-supernodes={need}\", or lower "
                    f"min-available-nodes / min-train-nodes."
                )
            if now >= next_log:
                log.info("waiting for nodes: %d connected, %d expected (min-available-nodes)", len(nodes), need)
                next_log = now + 10.0
            time.sleep(min(1.0, max(0.0, deadline - now)))

    def _sample(self, grid: Grid, server_round: int, kind: str) -> list[int] | None:
        """Nodes for ``kind`` (train/evaluate), seeded; None if the inner strategy does not sample like FedAvg."""
        fraction = getattr(self.inner, f"fraction_{kind}", None)
        min_nodes = getattr(self.inner, f"min_{kind}_nodes", None)
        if not isinstance(fraction, (int, float)) or not isinstance(min_nodes, int):
            return None
        if fraction == 0.0:
            return []
        need = max(int(getattr(self.inner, "min_available_nodes", 1)), min_nodes)
        nodes = self._wait_for_nodes(grid, need, max(1, min_nodes))
        size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
        return self.sampler.sample(grid, nodes, size, kind=kind, server_round=server_round)

    @contextmanager
    def _inner_samples_all(self, kind: str, count: int) -> Iterator[None]:
        """Make the inner strategy take every node of the sampled view (restored afterwards)."""
        names = (f"fraction_{kind}", f"min_{kind}_nodes", "min_available_nodes")
        saved = {n: getattr(self.inner, n) for n in names}
        self.inner.__dict__.update({names[0]: 1.0, names[1]: count, names[2]: count})
        try:
            yield
        finally:
            self.inner.__dict__.update(saved)

    def _delegate(self, kind: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> list[Message]:
        nodes = self._sample(grid, server_round, kind)
        configure = getattr(self.inner, f"configure_{kind}")
        if nodes is None:
            return list(configure(server_round, arrays, config, grid))
        if not nodes:
            return []
        with self._inner_samples_all(kind, len(nodes)):
            messages = list(configure(server_round, arrays, config, _SampledGrid(grid, nodes)))
        return sorted(messages, key=lambda m: m.metadata.dst_node_id)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, let the inner strategy build their messages, add the ConEF settings.

        The caller's ``config`` is copied, never modified.
        """
        self._global_dtypes = {k: np.dtype(v.dtype) for k, v in arrays.items()}
        for name, dtype in self._global_dtypes.items():
            if dtype.kind != "f":
                raise ValueError(f"global array {name!r} has dtype {dtype}: ConEF compresses floating-point arrays "
                                 "only (keep integer buffers out of the ArrayRecord)")
        self._global = {k: torch.from_numpy(np.asarray(v.numpy(), dtype=np.float32)) for k, v in arrays.items()}
        messages = self._delegate("train", server_round, arrays, ConfigRecord(dict(config)), grid)
        self._sampled = {m.metadata.dst_node_id for m in messages}
        extra = {
            **P.method_to_config(self.method),
            P.METHOD_NAME_KEY: self.method_name,
            P.ROUND_SEED_KEY: self.round_seed(server_round),
            P.ARRAYS_KEY_KEY: self.arrayrecord_key,
            P.ALLOW_STATE_RESET_KEY: self.allow_state_reset,
            P.SERVER_ROUND_KEY: server_round,
        }
        for msg in messages:
            msg.content[self.configrecord_key] = ConfigRecord({**dict(msg.content[self.configrecord_key]), **extra})
        log.info("round %d: sampled %d of %d nodes", server_round, len(messages), len(list(grid.get_node_ids())))
        if self.downlink_config is None or not messages:
            self._downlink_bytes = (
                sum(m.content[self.arrayrecord_key].count_bytes() for m in messages),
                sum(m.content[self.configrecord_key].count_bytes() for m in messages),
            )
            return messages
        return self._downlink_messages(messages)

    def _downlink_messages(self, messages: list[Message]) -> list[Message]:
        """Per-node messages: the dense model, or the compressed updates the node missed."""
        assert self.downlink_config is not None and self._global is not None
        if self.downlink is None:
            self.downlink = DownlinkCompressor(self.downlink_config, self._global,
                                               max_log_rounds=self.downlink_log_rounds, seed=self.seed)
        dl = self.downlink
        encoded = {r: encode_payloads(p) for r, p in dl.log.items()}
        out, total, cfg_total = [], 0, 0
        self._sent_version = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            plan = dl.plan(node)
            cfg = {**dict(msg.content[self.configrecord_key]),
                   **P.method_to_config(self.downlink_config, P.DOWN_PREFIX), P.MODEL_VERSION_KEY: dl.version}
            records: dict[str, Any] = {k: v for k, v in msg.content.items() if k != self.configrecord_key}
            if plan.dense:
                cfg[P.DOWNLINK_MODE_KEY] = "dense"
                total += records[self.arrayrecord_key].count_bytes()
            else:
                del records[self.arrayrecord_key]
                cfg.update({P.DOWNLINK_MODE_KEY: "delta", P.BASE_VERSION_KEY: plan.base,
                            P.DOWNLINK_ROUNDS_KEY: list(plan.rounds),
                            P.DOWNLINK_SEEDS_KEY: [dl.seeds[r] for r in plan.rounds]})
                for r in plan.rounds:
                    arrays_name, meta_name = P.downlink_record(r)
                    records[arrays_name], records[meta_name] = encoded[r]
                    total += encoded[r][0].count_bytes()
                    cfg_total += encoded[r][1].count_bytes()
            records[self.configrecord_key] = ConfigRecord(cfg)
            cfg_total += records[self.configrecord_key].count_bytes()
            self._sent_version[node] = dl.version
            out.append(Message(content=RecordDict(records), dst_node_id=node, message_type=MessageType.TRAIN))
        self._downlink_bytes = (total, cfg_total)
        return out

    def payload_specs(self, server_round: int) -> dict[str, PayloadSpec]:
        """Expected payload structure of every tensor in ``server_round``."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        seed = self.round_seed(server_round)
        if self.method.layerwise:
            return {k: expected_spec(self.compressor, tuple(v.shape), seed=seed, key=k)
                    for k, v in self._global.items()}
        total = sum(v.numel() for v in self._global.values())
        return {FLAT_KEY: expected_spec(self.compressor, (total,), seed=seed, key=FLAT_KEY)}

    # ------------------------------------------------------------------ replies
    def _screen(self, server_round: int, replies: list[Message], stats: RoundStats) -> list[Message]:
        """Cheap checks before any decoding: errors, unsampled nodes, duplicates. Sorted by (partition, node)."""
        first: dict[int, Message] = {}  # one entry per node; a count only for the rare duplicates
        extra: dict[int, int] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats.failed += 1
                if self.downlink is not None:
                    self.downlink.forget(node)
                log.warning("round %d: node %s replied with an error: %s", server_round, node, msg.error.reason)
                continue
            if node in first:
                extra[node] = extra.get(node, 0) + 1
            else:
                first[node] = msg
        kept = []
        # one int key per node in (partition, node) order (node ids < 2**64): no tuple per reply
        for node in sorted(first, key=lambda n: ((_partition_of(first[n]) + 1) << 64) | n):
            count = 1 + extra.get(node, 0)
            if node not in self._sampled:
                self._reject(stats, server_round, node, f"node was not sampled this round ({count} replies)",
                             count=count)
            elif count > 1:
                self._reject(stats, server_round, node, f"node replied {count} times; all refused", count=count)
            else:
                kept.append(first[node])
        return kept

    def _reject(self, stats: RoundStats, server_round: int, node: int, reason: str, count: int = 1) -> None:
        stats.rejected += count
        text = f"node {node}: {reason}"
        stats.rejections.append(text)
        log.warning("round %d: rejected reply from %s", server_round, text)
        if self.downlink is not None:
            self.downlink.forget(node)

    def _decode(self, msg: Message, specs: Mapping[str, PayloadSpec]) -> dict[str, Payload]:
        return self._decode_sized(msg, specs)[0]

    def _decode_sized(self, msg: Message, specs: Mapping[str, PayloadSpec]) -> tuple[dict[str, Payload], int, int]:
        """The reply's payloads, their bytes and its payload records' bytes (``ReplyDecoder.decode_sized``)."""
        content = msg.content
        arrays, meta = content.get(P.PAYLOAD_RECORD), content.get(P.PAYLOAD_META_RECORD)
        if not isinstance(arrays, ArrayRecord) or not isinstance(meta, ConfigRecord):
            raise PayloadError(f"reply has no ConEF payload records {P.PAYLOAD_RECORD!r}/{P.PAYLOAD_META_RECORD!r} "
                               f"(has {sorted(content.keys())}); is conef_mod in the ClientApp's mods?")
        if self._decoder is None or self._decoder.specs is not specs:  # compiled once per round's specs
            self._decoder = ReplyDecoder(specs)
        return self._decoder.decode_sized(arrays, meta)

    def _metrics(self, msg: Message, server_round: int) -> tuple[float, _Info]:
        """The reply's weight and ConEF metrics, checked for type, finiteness and range."""
        records = _metric_records(msg)
        if len(records) != 1:
            raise PayloadError(f"reply must carry exactly one MetricRecord, has {len(records)}")
        metrics = records[0]
        for key, value in metrics.items():
            for v in value if isinstance(value, list) else (value,):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise PayloadError(f"metric {key!r}={value!r} is not a finite number")
        weight = metrics.get(self.weighted_by_key)
        if isinstance(weight, list) or weight is None or not 0 < weight <= MAX_WEIGHT:
            raise PayloadError(f"{self.weighted_by_key}={weight!r} is out of range; allowed: (0, {MAX_WEIGHT:g}]")
        missing = [k for k in P.CLIENT_METRICS if k not in metrics]
        if missing:
            raise PayloadError(f"reply lacks the ConEF metrics {missing}")
        if metrics[P.M_ROUND] != server_round:
            raise PayloadError(f"reply is for round {metrics[P.M_ROUND]!r}, this is round {server_round}")
        info = _Info()
        for k in P.CLIENT_METRICS:
            v = float(metrics[k])
            if v < 0 or v > 2**62:
                raise PayloadError(f"metric {k!r}={v!r} is out of range; allowed: [0, 2**62]")
            info[k] = v
        info["peak-rss"] = float(metrics.get(P.M_PEAK_RSS, 0.0))
        loss = metrics.get("train-loss", metrics.get("train_loss", float("nan")))
        info["train-loss"] = float(loss) if isinstance(loss, (int, float)) else float("nan")
        return float(weight), info

    def _norm(self, payloads: Mapping[str, Payload]) -> float:
        """L2 norm of the decoded update; from the values alone for value-selecting Q (no dense tensor)."""
        q, sq = self.compressor, 0.0
        selecting, scaled = isinstance(q, _VALUE_SELECTING), isinstance(q, SelectiveCompressor)
        for p in payloads.values():
            if selecting and p.arrays.keys() <= _VALUE_ARRAYS:
                # validated: distinct indices (or a seed-determined selection), so ||Q⁻¹(p)|| = scale·||values||
                scale = q.value_scale(p.numel) if scaled else 1.0  # type: ignore[attr-defined]
                n = float(torch.linalg.vector_norm(p.arrays["values"], dtype=torch.float64))  # no float64 copy
                sq += scale**2 * (n * n)
            else:
                sq += q.norm_sq(p)
        return math.sqrt(sq)

    def _validate(self, server_round: int, replies: list[Message], specs: Mapping[str, PayloadSpec],
                  stats: RoundStats, sink: _WeightedMean | None = None) -> _Accepted:
        """Replies that pass every check, in order; each one's payload also goes into ``sink``."""
        out = _Accepted()
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                weight, info, payloads, norm = self._checked(msg, server_round, specs)
            except (PayloadError, ValueError, TypeError, KeyError, OverflowError) as exc:
                self._reject(stats, server_round, node, str(exc))
                continue
            out.add(msg, node, weight, norm)
            out.sums.add(info, weight)
            if sink is not None:
                sink.add(payloads, weight)
        return out

    def _checked(self, msg: Message, server_round: int,
                 specs: Mapping[str, PayloadSpec]) -> tuple[float, _Info, dict[str, Payload], float]:
        """One reply's weight, statistics, decoded payloads and update norm; ``PayloadError`` etc. if it is bad."""
        weight, info = self._metrics(msg, server_round)
        payloads, payload_bytes, record_bytes = self._decode_sized(msg, specs)
        info["payload-bytes"] = float(payload_bytes)
        info["record-bytes"] = float(record_bytes)
        norm = self._norm(payloads)
        if not math.isfinite(norm):
            raise PayloadError(f"update norm is {norm}")
        if self.max_update_norm is not None and norm > self.max_update_norm:
            raise PayloadError(f"update norm {norm:.4g} exceeds max_update_norm={self.max_update_norm:g}")
        return weight, info, payloads, norm

    def _norm_guard(self, server_round: int, candidates: _Accepted, stats: RoundStats) -> list[int] | None:
        """Indices (into ``candidates``) of the replies the norm guard keeps; ``None``: all of them."""
        if self.norm_guard <= 0 or not len(candidates):
            return None
        reference = _median_low(candidates.norms)
        if len(candidates) == 1 and self._norm_reference is not None:
            # a lone reply cannot vouch for itself: compare it with the last round's accepted median (two
            # replies need no history: the lower median is the smaller one, so one huge reply never sets it)
            reference = min(reference, self._norm_reference)
        stats.norm_reference = reference
        if reference <= 0:
            return None
        bound = self.norm_guard * reference
        kept = [i for i, norm in enumerate(candidates.norms) if norm <= bound]
        if kept:
            # the next lone reply is judged against what this round accepted (it follows honest growth;
            # storing the min of the references instead ratcheted down and refused every later update)
            self._norm_reference = _median_low(array.array("d", (candidates.norms[i] for i in kept)))
        if len(kept) == len(candidates):
            return None
        for i, norm in enumerate(candidates.norms):
            if norm > bound:
                self._reject(stats, server_round, candidates.nodes[i], f"update norm {norm:.4g} exceeds norm_guard × "
                             f"median = {self.norm_guard:g} × {reference:.4g}")
        return kept

    def _keep(self, server_round: int, candidates: _Accepted, kept: list[int] | None,
              specs: Mapping[str, PayloadSpec], sink: _WeightedMean | None) -> tuple[_Accepted, _WeightedMean | None]:
        """The replies the guard kept, their statistics and (mean mode) their mean, summed again without the others."""
        if kept is None:
            return candidates, sink
        out = _Accepted()
        sink = _WeightedMean(self.compressor, specs) if sink is not None else None
        for i in kept:
            msg = candidates.messages[i]
            weight, info, payloads, _ = self._checked(msg, server_round, specs)
            out.add(msg, candidates.nodes[i], candidates.weights[i], candidates.norms[i])
            out.sums.add(info, weight)
            if sink is not None:
                sink.add(payloads, weight)
        return out, sink

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, validate and guard the replies, then aggregate them through the inner strategy."""
        t0 = time.perf_counter()
        replies = list(replies)
        stats = RoundStats(round=server_round, sampled=len(self._sampled), replied=len(replies))
        stats.downlink_bytes_total, stats.downlink_config_bytes_total = self._downlink_bytes
        specs = self.payload_specs(server_round)
        assert self._global is not None
        stats.dense_bytes_per_client = 4 * sum(v.numel() for v in self._global.values())
        # weighted-mean strategies: the mean is accumulated while validating (one decode per reply); it is
        # recomputed without them only when the norm guard refuses replies
        sink = _WeightedMean(self.compressor, specs) if self.mode == "mean" else None
        candidates = self._validate(server_round, self._screen(server_round, replies, stats), specs, stats, sink)
        accepted, sink = self._keep(server_round, candidates, self._norm_guard(server_round, candidates, stats),
                                    specs, sink)
        del candidates
        for node in accepted.nodes:
            if self.downlink is not None and node in self._sent_version:
                self.downlink.mark_synced(node, self._sent_version[node])
        stats.accepted = len(accepted)
        client_metrics = self._client_metrics(accepted)  # before the new model exists: the two peaks do not add up
        gc.collect(1)  # flwr's metric_records views are reference cycles: free them before the model is built
        new_arrays: ArrayRecord | None = None
        inner_metrics: MetricRecord | None = None
        if accepted:
            try:
                new_arrays, inner_metrics = self._aggregate(server_round, accepted, specs, stats, sink)
            except Exception as exc:  # the inner strategy failed: keep the model, keep the run going
                log.error("round %d: aggregation failed (%s: %s); the global model is unchanged",
                          server_round, type(exc).__name__, exc)
                new_arrays = None
            self._fill_stats(stats, accepted)
        else:
            log.warning("round %d: no valid replies; the global model is unchanged", server_round)
        stats.aggregate_seconds = time.perf_counter() - t0
        self.history.append(stats)
        metrics = self._round_metrics(stats, client_metrics, inner_metrics)
        log.info(
            "round %d: accepted %d/%d replies (rejected %d, failed %d), train loss %.4f, uplink %.1f KB/client "
            "(dense %.1f KB), client error state %.1f KB",
            server_round, stats.accepted, stats.replied, stats.rejected, stats.failed, stats.train_loss,
            stats.uplink_payload_bytes_mean / 1e3, stats.dense_bytes_per_client / 1e3,
            stats.client_error_state_bytes_mean / 1e3,
        )
        return new_arrays, metrics

    def _aggregate(self, server_round: int, accepted: _Accepted, specs: Mapping[str, PayloadSpec],
                   stats: RoundStats, sink: _WeightedMean | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None
        if sink is not None:
            total = sink.total
            if type(self.inner) in _NO_SERVER_STEP and self.downlink is None and self.method.layerwise:
                return self._finish_streamed(server_round, sink, stats), None
            mean = self._unflatten(sink.mean())
            stats.update_norm = math.sqrt(math.fsum(float(torch.linalg.vector_norm(d)) ** 2 for d in mean.values()))
            if type(self.inner) in _NO_SERVER_STEP:
                # FedAvg of the one reply x − mean is x − mean: computed in place, no copies of the model
                new = {k: d.neg_().add_(self._global[k]) for k, d in mean.items()}
                return self._finish(server_round, new, None)
            synthetic = [self._model_reply(accepted.messages[0], mean, MetricRecord({self.weighted_by_key: total}))]
        else:
            synthetic = []
            for msg in accepted.messages:
                update = self._dense_update(self._decode(msg, specs))
                metrics = next(iter(msg.content.metric_records.values()))
                synthetic.append(self._model_reply(msg, update, metrics))
        arrays, metrics = self.inner.aggregate_train(server_round, synthetic)
        del synthetic
        if arrays is None:
            return None, metrics
        new = {k: torch.from_numpy(np.asarray(v.numpy(), dtype=np.float32)) for k, v in arrays.items()}
        return self._finish(server_round, new, metrics)

    def _finish_streamed(self, server_round: int, sink: _WeightedMean, stats: RoundStats) -> ArrayRecord | None:
        """FedAvg's new model ``x − mean`` one tensor at a time, encoded as it is formed (no dense model copy).

        The same result and checks as :meth:`_finish` without a downlink: ``None`` (model kept)
        if any tensor is not finite.
        """
        assert self._global is not None
        arrays = {}
        squares = []
        for k, g in self._global.items():
            d = sink.mean_of(k).view(g.shape)
            squares.append(float(torch.linalg.vector_norm(d)) ** 2)
            new = d.neg_().add_(g)
            if not _finite(new):
                log.error("round %d: the aggregated model is not finite; keeping the previous one", server_round)
                return None
            arrays[k] = encode_array(new.numpy().astype(self._global_dtypes.get(k, np.float32), copy=False))
            del d, new
            sink.release(k)
        stats.update_norm = math.sqrt(math.fsum(squares))
        return ArrayRecord(arrays)

    def _finish(self, server_round: int, new: dict[str, torch.Tensor],
                metrics: MetricRecord | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the new model, send it through the compressed downlink if there is one, encode it."""
        assert self._global is not None
        if set(new) != set(self._global) or not all(_finite(v) for v in new.values()):
            log.error("round %d: the aggregated model is not finite (or lost arrays); keeping the previous one",
                      server_round)
            return None, metrics
        if self.downlink is not None:
            self.downlink.step({k: self._global[k] - new[k] for k in self._global}, seed=self.round_seed(server_round))
            new = {k: v.clone() for k, v in self.downlink.model.items()}
        return self._to_record(new), metrics

    def _dense_update(self, payloads: Mapping[str, Payload]) -> dict[str, torch.Tensor]:
        return self._unflatten({k: self.compressor.decompress(p) for k, p in payloads.items()})

    def _unflatten(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._global is not None
        if self.method.layerwise:
            return {k: tensors[k].view(v.shape) for k, v in self._global.items()}
        return unflatten(tensors[FLAT_KEY].reshape(-1), {k: tuple(v.shape) for k, v in self._global.items()})

    def _to_record(self, tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord({k: encode_array(v.numpy().astype(self._global_dtypes.get(k, np.float32), copy=False))
                            for k, v in tensors.items()})

    def _model_reply(self, template: Message, update: Mapping[str, torch.Tensor], metrics: MetricRecord) -> Message:
        """A reply as the inner strategy expects it: the model ``x_global − update``."""
        assert self._global is not None
        model = {k: self._global[k] - update[k] for k in self._global}
        content = RecordDict({self.arrayrecord_key: self._to_record(model), "metrics": metrics})
        return Message(content=content, metadata=template.metadata)

    def _fill_stats(self, stats: RoundStats, accepted: _Accepted) -> None:
        sums = accepted.sums
        n = sums.n
        if sums.w:
            stats.train_loss = math.fsum(sums.loss_w) / math.fsum(sums.w)
        stats.uplink_payload_bytes_total = int(sums.payload_bytes)
        stats.uplink_payload_bytes_mean = stats.uplink_payload_bytes_total / n
        stats.uplink_record_bytes_total = int(sums.record_bytes)
        stats.client_error_state_bytes_mean = sums.error_state / n
        stats.client_serialized_state_bytes_total = int(sums.serialized)
        stats.client_peak_rss_bytes_max = int(sums.peak_rss)
        stats.clients_state_fresh = sums.sources.get(P.STATE_SOURCES["fresh"], 0)
        stats.clients_state_from_memory = sums.sources.get(P.STATE_SOURCES["memory"], 0)
        stats.clients_state_from_disk = sums.sources.get(P.STATE_SOURCES["disk"], 0)
        stats.clients_state_refused = n - stats.clients_state_fresh - stats.clients_state_from_memory \
            - stats.clients_state_from_disk
        stats.clients_state_not_saved = sums.not_saved

    def _client_metrics(self, accepted: _Accepted) -> MetricRecord | None:
        """The inner strategy's ``train_metrics_aggr_fn`` over the accepted replies (``None`` without one)."""
        aggr: Callable | None = getattr(self.inner, "train_metrics_aggr_fn", None)
        if not len(accepted) or aggr is None:
            return None
        try:
            return aggr([msg.content for msg in accepted.messages], self.weighted_by_key)
        except Exception as exc:  # a user-supplied function; never abort the round for metrics
            log.warning("train_metrics_aggr_fn failed (%s); reporting ConEF's metrics only", exc)
            return MetricRecord()

    def _round_metrics(self, stats: RoundStats, client: MetricRecord | None,
                       inner: MetricRecord | None) -> MetricRecord:
        metrics = MetricRecord()
        if client is not None:
            metrics = client
        elif inner is not None:
            metrics = inner
        metrics.update({
            "conef.accepted": stats.accepted,
            "conef.rejected": stats.rejected,
            "conef.failed": stats.failed,
            "conef.uplink-bytes-total": float(stats.uplink_payload_bytes_total),
            "conef.dense-bytes-per-client": float(stats.dense_bytes_per_client),
        })
        return metrics

    # ------------------------------------------------------------------ evaluation passes through
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages (nodes sampled with ConEF's seeded RNG and deadline)."""
        return self._delegate("evaluate", server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate."""
        return self.inner.aggregate_evaluate(server_round, replies)

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
        """Flower's round loop, resumable: rounds ``start_round..num_rounds``.

        ``on_round_end(round, arrays, result)`` runs after each round's aggregation and
        evaluation (checkpoint there). With ``start_round > 1`` the initial central
        evaluation is skipped: the run continues a checkpointed one.
        """
        if isinstance(start_round, bool) or not isinstance(start_round, int) or not 1 <= start_round <= num_rounds + 1:
            raise ValueError(f"start_round={start_round!r} is out of range; allowed: 1..{num_rounds + 1}")
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        result.arrays = arrays = initial_arrays
        if evaluate_fn is not None and start_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for current_round in range(start_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", current_round, num_rounds)
            t_round = time.perf_counter()
            replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid), timeout=timeout)
            agg_arrays, agg_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[current_round] = agg_metrics
            eval_messages = list(self.configure_evaluate(current_round, arrays, evaluate_config, grid))
            if eval_messages:
                agg_eval = self.aggregate_evaluate(current_round, grid.send_and_receive(eval_messages, timeout=timeout))
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: history, norm reference, downlink, the inner strategy's state."""
        inner = {}
        for name in _INNER_STATE_ATTRS:
            value = getattr(self.inner, name, None)
            if value is not None:
                inner[name] = _to_tensors(value)
        return {
            "method": self.method.to_dict(),
            "seed": self.seed,
            "inner_type": type(self.inner).__name__,
            "inner": inner,
            "history": [asdict(h) for h in self.history],
            "norm_reference": self._norm_reference,
            "downlink": None if self.downlink is None else self.downlink.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the method, seed and inner strategy type must match."""
        if state.get("method") != self.method.to_dict():
            raise ValueError(f"checkpoint is for method {state.get('method')}, this run has {self.method.to_dict()}")
        if state.get("seed") != self.seed:
            raise ValueError(f"checkpoint has seed {state.get('seed')}, this run has {self.seed}")
        if state.get("inner_type") != type(self.inner).__name__:
            raise ValueError(f"checkpoint wraps {state.get('inner_type')}, this run wraps {type(self.inner).__name__}")
        for name, value in dict(state.get("inner") or {}).items():
            if name not in _INNER_STATE_ATTRS:
                raise ValueError(f"checkpoint has unknown inner-strategy state {name!r}")
            setattr(self.inner, name, _to_numpy(value))
        self.history = [RoundStats(**h) for h in state.get("history", [])]
        ref = state.get("norm_reference")
        self._norm_reference = None if ref is None else float(ref)
        down = state.get("downlink")
        if down is not None:
            if self.downlink_config is None:
                raise ValueError("checkpoint has a compressed downlink, this run has none")
            model = down["model"]
            self.downlink = DownlinkCompressor(self.downlink_config, model, max_log_rounds=self.downlink_log_rounds,
                                               seed=self.seed)
            self.downlink.load_state_dict(down)


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t`` (max-abs reduction: no tensor-sized temporary)."""
    return t.numel() == 0 or bool(torch.isfinite(torch.linalg.vector_norm(t, ord=float("inf"))))


def _median_low(values: array.array) -> float:
    """``statistics.median_low`` of a float array, sorted in one numpy buffer (no float object per value)."""
    return float(np.sort(np.frombuffer(values, dtype=np.float64))[(len(values) - 1) // 2])


def _metric_records(msg: Message) -> list[MetricRecord]:
    """The reply's MetricRecords, read from the RecordDict's items (``metric_records`` builds a new view each time)."""
    return [r for r in msg.content.values() if isinstance(r, MetricRecord)]


def _partition_of(msg: Message) -> int:
    """The partition a reply says it trained on (only orders the sum; -1 when absent or malformed)."""
    for record in _metric_records(msg):
        pid = record.get(P.M_PARTITION, -1)
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else -1
    return -1


def _to_tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tensors(v) for v in value]
    raise ValueError(f"cannot checkpoint inner-strategy state of type {type(value).__name__}")


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    raise ValueError(f"checkpoint has inner-strategy state of type {type(value).__name__}")
