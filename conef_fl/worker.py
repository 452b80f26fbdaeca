"""A worker's compression of a whole model: one error-feedback object per tensor (or one flat)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from conef_fl.compressors.base import Payload
from conef_fl.config import MethodConfig
from conef_fl.error_stores.base import check_finite
from conef_fl.error_stores.sketch import hash_cache_info
from conef_fl.feedback import ErrorFeedback, GroupedConEF, make_compressor_for, make_feedback

FLAT_KEY = "__flat__"


class CompressionWorker:
    """Compress a model's update (a mapping of named tensors) with error feedback.

    Layer-wise (the paper's practice) each tensor gets its own error state and
    payload; flat mode concatenates everything into one buffer with one payload
    under :data:`FLAT_KEY`.

    Parameters
    ----------
    config:
        The method.
    shapes:
        Name → shape of every tensor of the update, in a fixed order.
    device:
        Device of the error state.
    """

    def __init__(
        self, config: MethodConfig, shapes: Mapping[str, tuple[int, ...]], device: torch.device | str = "cpu"
    ) -> None:
        if not shapes:
            raise ValueError("shapes must not be empty")
        self.config = config
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.compressor = make_compressor_for(config)
        self.group: GroupedConEF | None = None
        if config.layerwise:
            self.feedback: dict[str, ErrorFeedback] = {
                k: make_feedback(config, shape, k, compressor=self.compressor, device=device)
                for k, shape in self.shapes.items()
            }
            self.group = _group_of(self.feedback)
        else:
            total = sum(math.prod(s) for s in self.shapes.values())
            self.feedback = {
                FLAT_KEY: make_feedback(config, (total,), FLAT_KEY, compressor=self.compressor, device=device)
            }

    @property
    def numel(self) -> int:
        """Total elements of the model."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        """Error-state bytes kept between steps, all tensors."""
        return sum(f.nbytes for f in self.feedback.values())

    def persistent_tensors(self) -> list[torch.Tensor]:
        """Every tensor kept between steps."""
        return [t for f in self.feedback.values() for t in f.persistent_tensors()]

    def step(self, updates: Mapping[str, torch.Tensor], *, seed: int, consume: bool = False) -> dict[str, Payload]:
        """Compress ``updates`` (name → tensor); returns name → payload (or {FLAT_KEY: payload}).

        All tensors are checked (names, shapes, finiteness: once, here) before any state changes.
        """
        if set(updates) != set(self.shapes):
            missing = sorted(set(self.shapes) - set(updates))
            extra = sorted(set(updates) - set(self.shapes))
            raise ValueError(f"update names differ from the model: missing {missing}, unexpected {extra}")
        for k, shape in self.shapes.items():
            if tuple(updates[k].shape) != shape:
                raise ValueError(f"update {k!r} has shape {tuple(updates[k].shape)}, expected {shape}")
            check_finite(updates[k], f"update {k!r}")  # every tensor before any state changes
        if self.config.layerwise:
            grouped = self._step_group(updates, seed) if consume else None
            return {k: grouped[k] if grouped is not None and k in grouped
                    else self.feedback[k].step_checked(updates[k], seed=seed, consume=consume) for k in self.shapes}
        flat = torch.cat([updates[k].reshape(-1).to(torch.float32) for k in self.shapes])
        return {FLAT_KEY: self.feedback[FLAT_KEY].step_checked(flat, seed=seed, consume=True)}

    def _step_group(self, updates: Mapping[str, torch.Tensor], seed: int) -> dict[str, Payload] | None:
        """The grouped tensors' payloads in one batched step (``None``: step them one by one).

        Only with ``consume=True`` (what the batched step computes bit for bit) and the hash cache on
        (the group's structures live there).
        """
        if self.group is None or hash_cache_info()["max_bytes"] <= 0:
            return None
        return self.group.step(updates, seed)

    def reset(self) -> None:
        """Forget all errors."""
        for f in self.feedback.values():
            f.reset()

    def state_dict(self) -> dict[str, object]:
        """Per-tensor states plus the config they belong to."""
        return {"config": self.config.to_dict(), "tensors": {k: f.state_dict() for k, f in self.feedback.items()}}

    def load_state_dict(self, state: Mapping[str, object], *, atomic: bool = True) -> None:
        """Restore; the config must match exactly and every tensor's state must validate.

        ``atomic=False`` skips the per-tensor backups (for a fresh worker that is discarded on failure).
        """
        cfg = state.get("config")
        if cfg != self.config.to_dict():
            raise ValueError(f"state was saved for config {cfg}, this worker has {self.config.to_dict()}")
        tensors = state.get("tensors")
        if not isinstance(tensors, Mapping) or set(tensors) != set(self.feedback):
            raise ValueError(f"state has tensors {sorted(tensors) if isinstance(tensors, Mapping) else tensors}, "
                             f"expected {sorted(self.feedback)}")
        for k, f in self.feedback.items():
            f.load_state_dict(tensors[k], atomic=atomic)


def _group_of(feedback: Mapping[str, ErrorFeedback]) -> GroupedConEF | None:
    """The small ConEF tensors stepped together (:class:`GroupedConEF`), or ``None`` if fewer than two."""
    members = {k: fb for k, fb in feedback.items() if GroupedConEF.eligible(fb)}
    return GroupedConEF(members) if len(members) >= 2 else None


def unflatten(flat: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named tensors (views)."""
    out: dict[str, torch.Tensor] = {}
    off = 0
    for k, s in shapes.items():
        n = math.prod(s)
        out[k] = flat[off : off + n].view(s)
        off += n
    if off != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, shapes need {off}")
    return out
