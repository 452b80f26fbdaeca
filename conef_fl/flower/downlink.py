"""Compressed downlink with server-side error feedback (DoubleSqueeze-style), for partial participation.

Instead of the dense global model, the server broadcasts a compressed model
update ``Δ̃_t = Q_down(η·Δ_t + e_s)`` and keeps its own error
``e_s ← η·Δ_t + e_s − Δ̃_t`` (the server has memory to spare). The global model
everyone agrees on is ``x_t = x_{t−1} − Δ̃_t``; the server's error makes sure
nothing of the averaged update is lost, only delayed.

Partial participation: a client that holds ``x_v`` and is sampled in round
``r`` (global model ``x_{r−1}``) receives the logged updates ``Δ̃_{v+1..r−1}`` —
or the dense model when it has none, when its version is unknown or too old,
or when the catch-up would cost more bytes than the dense model. Either way
it ends up with exactly ``x_{r−1}``; every byte it is sent is counted.

The log keeps the last ``max_log_rounds`` rounds' payloads (server memory).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from conef_fl.compressors.base import Compressor, Payload
from conef_fl.config import MethodConfig
from conef_fl.seeding import derive_seed
from conef_fl.worker import CompressionWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatchUp:
    """What to send one client: the dense model, or the payloads of rounds ``base+1..target``."""

    dense: bool
    base: int
    target: int
    rounds: tuple[int, ...] = ()


class DownlinkCompressor:
    """Server side of the compressed downlink.

    Parameters
    ----------
    config:
        Downlink compressor settings (``compressor``, ``k_ratio``, ``value_dtype``, ...).
    model:
        The initial global model ``x_0`` (name → tensor); copied.
    max_log_rounds:
        Rounds of payloads kept for catching up stale clients.
    seed:
        Seeds the downlink compressor's shared randomness per round.
    """

    def __init__(
        self, config: MethodConfig, model: Mapping[str, torch.Tensor], *, max_log_rounds: int = 50, seed: int = 0
    ) -> None:
        if isinstance(max_log_rounds, bool) or not isinstance(max_log_rounds, int) or max_log_rounds < 0:
            raise ValueError(f"max_log_rounds={max_log_rounds!r} is out of range; allowed: an integer >= 0")
        if config.feedback != "efsgd" or not config.layerwise:
            raise ValueError(f"the downlink runs layer-wise EFSGD; got feedback={config.feedback!r}, "
                             f"layerwise={config.layerwise!r}")
        self.config = config
        self.model = {k: v.detach().to(torch.float32).clone() for k, v in model.items()}
        #: the server's error feedback: the core's EFSGD worker, one error tensor per array
        self.worker = CompressionWorker(config, {k: tuple(v.shape) for k, v in self.model.items()})
        self.compressor: Compressor = self.worker.compressor
        self.version = 0
        self.max_log_rounds = int(max_log_rounds)
        self.seed = int(seed)
        self.log: OrderedDict[int, dict[str, Payload]] = OrderedDict()
        self.client_version: dict[int, int] = {}
        self.seeds: dict[int, int] = {}

    @property
    def error(self) -> dict[str, torch.Tensor]:
        """The server's error per array (a dense copy, for inspection)."""
        return {k: f.stores()["e"].decompress().view(self.model[k].shape) for k, f in self.worker.feedback.items()}

    @property
    def error_norm(self) -> float:
        """L2 norm of the server's error (0 when the downlink sends everything)."""
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.worker.persistent_tensors())))

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense float32 model."""
        return sum(4 * v.numel() for v in self.model.values())

    def round_seed(self, version: int) -> int:
        """Default shared seed of the downlink payload that produces ``x_version``."""
        return derive_seed(self.seed, "downlink", version)

    def step(self, update: Mapping[str, torch.Tensor], seed: int | None = None) -> dict[str, Payload]:
        """Apply one server update ``x ← x − update`` through the compressed downlink.

        ``update`` is the server step (the old global model minus the new one). ``seed``
        is the shared seed of the downlink compressor; passing the uplink's round seed
        makes a random-block-k downlink pick the same block as the uplink, so the average
        of block payloads is sent exactly (the server error stays zero). Returns the
        payloads that turn ``x_{v}`` into ``x_{v+1}`` on every client.
        """
        seed = self.round_seed(self.version + 1) if seed is None else int(seed)
        payloads = self.worker.step({k: update[k].to(torch.float32) for k in self.model}, seed=seed)
        self.version += 1
        self.seeds[self.version] = seed
        for k, p in payloads.items():
            self.compressor.decompress_add_(p, self.model[k], alpha=-1.0)
        self.log[self.version] = payloads
        while len(self.log) > self.max_log_rounds:
            old, _ = self.log.popitem(last=False)
            self.seeds.pop(old, None)
        return payloads

    def plan(self, node_id: int) -> CatchUp:
        """How to bring ``node_id`` from its known version to the current one."""
        have = self.client_version.get(node_id)
        target = self.version
        if have is None or have > target:
            return CatchUp(dense=True, base=-1, target=target)
        rounds = tuple(range(have + 1, target + 1))
        if any(r not in self.log for r in rounds):
            return CatchUp(dense=True, base=-1, target=target)
        cost = sum(p.nbytes for r in rounds for p in self.log[r].values())
        if cost >= self.dense_nbytes:
            return CatchUp(dense=True, base=-1, target=target)
        return CatchUp(dense=False, base=have, target=target, rounds=rounds)

    def mark_synced(self, node_id: int, version: int) -> None:
        """Record that ``node_id`` holds ``x_version``."""
        self.client_version[node_id] = int(version)

    def forget(self, node_id: int) -> None:
        """The node's version is unknown (it failed or was rejected): send it the dense model next time."""
        self.client_version.pop(node_id, None)

    def state_dict(self) -> dict[str, object]:
        """Server-side downlink state for checkpoints (model, error, versions, the catch-up log)."""
        return {
            "version": self.version,
            "model": self.model,
            "worker": self.worker.state_dict(),
            "client_version": dict(self.client_version),
            "seeds": dict(self.seeds),
            "log": {r: {k: {"kind": p.kind, "shape": list(p.shape), "arrays": dict(p.arrays), "meta": dict(p.meta)}
                        for k, p in payloads.items()} for r, payloads in self.log.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict` (validated against this downlink's model and config)."""
        model = state["model"]
        if not isinstance(model, Mapping) or set(model) != set(self.model):
            raise ValueError("downlink checkpoint does not match the model's arrays")
        for k, v in self.model.items():
            if not isinstance(model[k], torch.Tensor) or tuple(model[k].shape) != tuple(v.shape):
                raise ValueError(f"downlink checkpoint: array {k!r} does not match the model")
        self.worker.load_state_dict(state["worker"])  # type: ignore[arg-type]
        self.model = {k: model[k].to(torch.float32).clone() for k in self.model}
        self.version = int(state["version"])  # type: ignore[arg-type]
        self.client_version = {int(n): int(v) for n, v in dict(state["client_version"]).items()}  # type: ignore[arg-type]
        self.seeds = {int(r): int(s) for r, s in dict(state["seeds"]).items()}  # type: ignore[arg-type]
        self.log = OrderedDict(
            (int(r), {k: Payload(p["kind"], tuple(p["shape"]), dict(p["arrays"]), dict(p["meta"]))
                      for k, p in payloads.items()})
            for r, payloads in sorted(dict(state["log"]).items())  # type: ignore[arg-type]
        )
