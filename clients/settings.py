"""Client settings, read once from the run config, the node config and the round's message config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context

from conef_fl.tasks import check_train_device


def _get(sources: list[Mapping[str, Any]], key: str, default: Any) -> Any:
    for src in sources:
        if key in src:
            return src[key]
    return default


@dataclass(frozen=True)
class ClientSettings:
    """Everything a ClientApp needs besides the method (which comes with the message)."""

    dataset: str = "digits"
    data_dir: str = ""
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    num_partitions: int = 100
    partition_id: int = 0
    seed: int = 0
    model: str = "auto"
    local_epochs: int = 5
    local_steps: int = 0
    batch_size: int = 8
    local_lr: float = 0.2
    local_momentum: float = 0.0
    weight_decay: float = 0.0
    state_dir: str = ""
    state_max_bytes: int = 64 * 1024 * 1024
    train_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise ValueError(f"num-partitions={self.num_partitions} is out of range; allowed: >= 1")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"partition-id={self.partition_id} is out of range; allowed: 0..{self.num_partitions - 1}"
            )
        if self.local_epochs < 0 or self.local_steps < 0 or (self.local_epochs == 0 and self.local_steps == 0):
            raise ValueError(
                f"local-epochs={self.local_epochs}, local-steps={self.local_steps}: one must be >= 1, both >= 0"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch-size={self.batch_size} is out of range; allowed: >= 1")
        if not (math.isfinite(self.local_lr) and self.local_lr > 0):
            raise ValueError(f"local-lr={self.local_lr} is out of range; allowed: > 0")
        if not 0 <= self.local_momentum < 1:
            raise ValueError(f"local-momentum={self.local_momentum} is out of range; allowed: [0, 1)")
        check_train_device(self.train_device)

    @classmethod
    def from_context(cls, context: Context, message_config: Mapping[str, Any] | None = None) -> ClientSettings:
        """Node config (partition) > message config (training) > run config > defaults."""
        node = dict(context.node_config)
        run = dict(context.run_config)
        msg = dict(message_config or {})
        both = [msg, run]
        return cls(
            dataset=str(_get([run], "dataset", cls.dataset)),
            data_dir=str(_get([node, run], "data-dir", cls.data_dir)),
            partitioning=str(_get([run], "partitioning", cls.partitioning)),
            dirichlet_alpha=float(_get([run], "dirichlet-alpha", cls.dirichlet_alpha)),
            num_partitions=int(_get([node, run], "num-partitions", cls.num_partitions)),
            partition_id=int(_get([node], "partition-id", cls.partition_id)),
            seed=int(_get([run], "seed", cls.seed)),
            model=str(_get([run], "model", cls.model)),
            local_epochs=int(_get(both, "local-epochs", cls.local_epochs)),
            local_steps=int(_get(both, "local-steps", cls.local_steps)),
            batch_size=int(_get(both, "batch-size", cls.batch_size)),
            local_lr=float(_get(both, "local-lr", cls.local_lr)),
            local_momentum=float(_get(both, "local-momentum", cls.local_momentum)),
            weight_decay=float(_get(both, "weight-decay", cls.weight_decay)),
            state_dir=str(_get([node, run], "state-dir", cls.state_dir)),
            state_max_bytes=int(_get([node, run], "state-max-bytes", cls.state_max_bytes)),
            train_device=str(_get([node, run], "train-device", cls.train_device)),
        )

