"""Server settings from ``[tool.flwr.app.config]`` (kebab-case keys), validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from conef_fl.config import MethodConfig
from conef_fl.registry import method_config

#: run-config key → MethodConfig field, for the method settings a user may set.
METHOD_KEYS = {
    "compressor": "compressor",
    "k-ratio": "k_ratio",
    "error-compressor": "error_compressor",
    "sketch-ratio": "sketch_ratio",
    "sketch-rows": "sketch_rows",
    "sketch-dtype": "sketch_dtype",
    "sketch-unit": "sketch_unit",
    "estimate-scale": "estimate_scale",
    "beta": "beta",
    "quant-levels": "quant_levels",
    "error-topk-ratio": "error_topk_ratio",
    "rank": "rank",
    "qsgd-levels": "qsgd_levels",
    "value-dtype": "value_dtype",
    "layerwise": "layerwise",
}


@dataclass(frozen=True)
class ServerSettings:
    """Run settings of the ServerApp (see pyproject.toml ``[tool.flwr.app.config]``)."""

    num_server_rounds: int = 100
    fraction_train: float = 0.1
    fraction_evaluate: float = 0.0
    num_partitions: int = 100
    min_available_nodes: int = 0
    min_train_nodes: int = 2
    method: str = "conef-cs"
    local_epochs: int = 5
    local_steps: int = 0
    batch_size: int = 8
    local_lr: float = 0.2
    lr_decay_rounds: str = ""
    lr_decay_factor: float = 0.1
    local_momentum: float = 0.0
    weight_decay: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    max_update_norm: float = 0.0
    dataset: str = "digits"
    data_dir: str = ""
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    model: str = "auto"
    seed: int = 0
    output_dir: str = "outputs"
    run_name: str = ""
    eval_every: int = 1
    checkpoint_dir: str = ""
    resume: bool = False
    downlink: str = ""
    downlink_k_ratio: float = 0.1
    downlink_log_rounds: int = 50
    train_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds={self.num_server_rounds} is out of range; allowed: >= 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train={self.fraction_train} is out of range; allowed: (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate={self.fraction_evaluate} is out of range; allowed: [0, 1]")
        if self.num_partitions < 1:
            raise ValueError(f"num-partitions={self.num_partitions} is out of range; allowed: >= 1")
        if self.eval_every < 1:
            raise ValueError(f"eval-every={self.eval_every} is out of range; allowed: >= 1")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            raise ValueError(f"lr-decay-factor={self.lr_decay_factor} is out of range; allowed: (0, 1]")
        _ = self.decay_rounds  # validates lr-decay-rounds
        if self.max_update_norm < 0:
            raise ValueError(f"max-update-norm={self.max_update_norm} is out of range; allowed: >= 0 (0 = off)")

    @property
    def decay_rounds(self) -> tuple[int, ...]:
        """Rounds from which ``local-lr`` is multiplied by ``lr-decay-factor`` (once per listed round).

        ``lr-decay-rounds`` is a comma-separated list of rounds, e.g. ``"200,260"``
        (step decay, as in the paper's schedules); ``""`` = constant learning rate.
        """
        text = str(self.lr_decay_rounds).strip()
        if not text:
            return ()
        try:
            rounds = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(
                f"lr-decay-rounds={self.lr_decay_rounds!r} is not a comma-separated list of rounds, e.g. '200,260'"
            ) from None
        if any(r < 1 for r in rounds):
            raise ValueError(f"lr-decay-rounds={self.lr_decay_rounds!r} is out of range; allowed: rounds >= 1")
        return tuple(sorted(rounds))

    def local_lr_at(self, server_round: int) -> float:
        """The clients' learning rate in ``server_round`` (step decay by ``lr-decay-factor``)."""
        passed = sum(1 for r in self.decay_rounds if server_round >= r)
        return self.local_lr * self.lr_decay_factor**passed

    def round_train_config(self, server_round: int) -> dict[str, Any]:
        """The per-round part of the training settings (the decayed ``local-lr``)."""
        return {"local-lr": self.local_lr_at(server_round)}

    @property
    def expected_nodes(self) -> int:
        """Nodes to wait for before round 1 (``min-available-nodes``, default: all partitions)."""
        return self.min_available_nodes or self.num_partitions

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> tuple[ServerSettings, MethodConfig]:
        """Split the run config into server settings and a validated method config."""
        names = {f.name for f in fields(cls)}
        types = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in METHOD_KEYS:
                overrides[METHOD_KEYS[key]] = value
                continue
            attr = key.replace("-", "_")
            if attr not in names:
                continue  # client-only keys (state-dir, ...) are read by the ClientApp
            t = types[attr]
            if t == "int":
                value = int(value)
            elif t == "float":
                value = float(value)
            elif t == "bool":
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            else:
                value = str(value)
            kwargs[attr] = value
        settings = cls(**kwargs)
        method = method_config(settings.method, **overrides)
        if "seed" not in overrides:
            method = method.replace(seed=settings.seed)
        return settings, method

    def downlink_config(self, method: MethodConfig) -> MethodConfig | None:
        """The downlink compressor (server-side error feedback), or None for a dense downlink."""
        if not self.downlink or self.downlink == "dense":
            return None
        return MethodConfig(feedback="efsgd", compressor=self.downlink, k_ratio=self.downlink_k_ratio,
                            value_dtype=method.value_dtype, rank=method.rank, seed=method.seed)

    def train_config(self) -> dict[str, Any]:
        """Local-training settings sent to clients every round."""
        return {
            "local-epochs": self.local_epochs,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "local-lr": self.local_lr,
            "local-momentum": self.local_momentum,
            "weight-decay": self.weight_decay,
        }
