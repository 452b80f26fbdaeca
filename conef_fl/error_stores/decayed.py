"""A dense error that ages the way a count sketch does: the stale-error control of ConEF-CS.

A dense fp32 error multiplied by ``a = 1 − (1−β)·k·(1/w − 1/d)`` each step
(:func:`sketch_aging_factor`), so that it forgets stale error as fast as ConEF-CS's
count sketch while keeping all ``d`` numbers. The derivation: ``docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from conef_fl.error_stores.base import DenseError, _check_same

if TYPE_CHECKING:
    from conef_fl.config import MethodConfig

#: Gradient compressors that send a fraction ``k_ratio`` of the coordinates unchanged (what the
#: derivation of :func:`sketch_aging_factor` assumes).
SELECTIVE_COMPRESSORS = ("random-block-k", "random-k")


def sketch_aging_factor(beta: float, k_ratio: float, sketch_ratio: float) -> float:
    """The per-step factor ``a`` that makes a dense error age like a one-row count sketch.

    Parameters
    ----------
    beta:
        Partial feedback β ∈ [0, 1).
    k_ratio:
        Fraction of coordinates the selective Q sends, k/d ∈ (0, 1].
    sketch_ratio:
        Sketch width as a fraction of the tensor, w/d ∈ (0, 1].

    Returns
    -------
    float
        ``1 − (1−β)·k·(1/w − 1/d)``; 1 when ``w = d`` (no collisions, no extra ageing).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta} is out of range; allowed: [0, 1)")
    for name, r in (("k_ratio", k_ratio), ("sketch_ratio", sketch_ratio)):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"{name}={r} is out of range; allowed: (0, 1]")
    a = 1.0 - (1.0 - beta) * k_ratio * (1.0 / sketch_ratio - 1.0)
    if not -1.0 < a <= 1.0:
        raise ValueError(
            f"beta={beta}, k_ratio={k_ratio}, sketch_ratio={sketch_ratio} give an ageing factor {a:.3f}; "
            "allowed: (-1, 1] (the matching sketch would not contract)"
        )
    return a


class DecayedError(DenseError):
    """Dense float32 error multiplied by ``factor`` at every step (``e ← factor·e + residual``).

    Parameters
    ----------
    numel:
        Number of elements of the tensor.
    factor:
        Per-step ageing factor in (-1, 1]; 1 is plain :class:`DenseError`.
    device:
        Where the error lives.
    """

    name = "decayed"

    def __init__(self, numel: int, *, factor: float, device: torch.device | str = "cpu") -> None:
        if not -1.0 < factor <= 1.0:
            raise ValueError(f"factor={factor} is out of range; allowed: (-1, 1]")
        super().__init__(numel, device=device)
        self.factor = float(factor)

    def accumulate_(self, x: torch.Tensor, alpha: float = 1.0) -> DecayedError:
        """``e ← factor·e + alpha·x``: the step's one full accumulation ages the stored error first."""
        if self.factor != 1.0:
            self.e.mul_(self.factor)
        super().accumulate_(x, alpha)
        return self

    def subtract_estimate_feedback_(self, coeff: float) -> bool:
        """Unsupported here (returns False), so ``absorb_`` takes the generic path.

        :class:`DenseError` scales the state in place and then accumulates the residual;
        with ageing in :meth:`accumulate_` that would age the already-scaled state
        (``a·β·e`` instead of ``a·e − (1−β)e``). The generic path subtracts ``(1−β)ê``
        from the residual instead, so one step is ``e ← a·e + u − Δ`` on both paths.
        """
        return False

    def state_dict(self) -> dict[str, object]:
        return {**super().state_dict(), "factor": self.factor}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_same("factor", state.get("factor"), self.factor)
        super().load_state_dict(state)


def make_decayed(config: MethodConfig, numel: int, seed: int, device: torch.device | str) -> DecayedError:
    """``ERROR_STORES`` factory: the dense error ageing like ``config``'s count sketch (same β, k, w).

    ``seed`` is unused (the store is deterministic). Raises ``ValueError`` for a non-selective Q.
    """
    if config.compressor not in SELECTIVE_COMPRESSORS:
        raise ValueError(
            f"compressor={config.compressor!r} is not valid for the decayed error store; allowed: "
            f"{', '.join(SELECTIVE_COMPRESSORS)} (the ageing factor assumes a selective Q)"
        )
    factor = sketch_aging_factor(config.beta, config.k_ratio, config.sketch_ratio)
    return DecayedError(numel, factor=factor, device=device)
