"""One validated, frozen configuration object that describes a compression method.

Every part of the project (Flower client and strategy, DDP hook, benchmarks)
builds its compressors and error memories from a :class:`MethodConfig`, so the
same name means the same thing everywhere. Bad values raise ``ValueError``
naming the argument, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Error-feedback families (how the worker keeps its error).
FEEDBACKS = ("none", "efsgd", "conef", "iconef-v1", "iconef-v2", "hefsgd")
#: Gradient compressors Q (see :mod:`conef_fl.compressors`).
GRADIENT_COMPRESSORS = (
    "identity",
    "random-block-k",
    "random-k",
    "top-k",
    "scaled-sign",
    "powersgd",
    "qsgd",
    "rbsgd",
    "atomo",
)
#: Error compressors C.
ERROR_COMPRESSORS = ("count-sketch", "quantizer", "identity", "top-k")
VALUE_DTYPES = ("float32", "float16", "bfloat16")
SKETCH_DTYPES = ("float32", "float16", "bfloat16")


def _check_ratio(name: str, value: float, *, allow_zero: bool = False) -> None:
    lo_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo_ok and value <= 1.0):
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {rng}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed: {', '.join(allowed)}")


def _check_int(name: str, value: int, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value!r} is out of range; allowed: integer {rng}")


@dataclass(frozen=True)
class MethodConfig:
    """A compression method: gradient compressor Q, error feedback, error compressor C.

    Parameters
    ----------
    feedback:
        ``none`` (SGD/QSGD/rbSGD/ATOMO), ``efsgd``, ``conef`` (partial ConEF with ``beta``),
        ``iconef-v1``, ``iconef-v2``, ``hefsgd``.
    compressor:
        The gradient compressor Q sent on the wire.
    k_ratio:
        Fraction of coordinates Q keeps (random-block-k, random-k, top-k, rbSGD), in (0, 1].
    error_compressor:
        How ConEF/iConEF store the error: ``count-sketch``, ``quantizer``, ``identity``
        (dense, i.e. EFSGD) or ``top-k``.
    sketch_ratio:
        Count-sketch table entries as a fraction of the tensor size, in (0, 1].
        Memory saving vs EFSGD is ``1 − sketch_ratio·bytes(dtype)/4``.
    sketch_rows:
        Count-sketch hash rows v (1 to 15; 1 is recommended, 3 uses a median).
    sketch_dtype:
        Storage dtype of the sketch table.
    sketch_unit:
        Elements hashed together by the tensor trick (0 = choose automatically).
    estimate_scale:
        Factor on every recovered error estimate (1 = unbiased).
    beta:
        Partial error feedback: ``p = u + (1−β)·ê``; in [0, 1). 0 is plain ConEF.
    quant_levels:
        Levels s of the error quantizer (1 to 127; codes are 1 + ceil(log2(s+1)) <= 8 bits).
    error_topk_ratio:
        Fraction kept by the top-k error store (hEFSGD), in (0, 1].
    rank:
        Rank of PowerSGD / atom budget of ATOMO (>= 1).
    qsgd_levels:
        Levels s of the QSGD gradient compressor (1 to 255).
    value_dtype:
        Wire dtype of transmitted values.
    layerwise:
        Compress each tensor separately (the paper's practice) or one flat buffer.
    seed:
        Seed for hashes and private randomness (not the round's shared seed).
    """

    feedback: str = "conef"
    compressor: str = "random-block-k"
    k_ratio: float = 0.1
    error_compressor: str = "count-sketch"
    sketch_ratio: float = 0.1
    sketch_rows: int = 1
    sketch_dtype: str = "float32"
    sketch_unit: int = 0
    estimate_scale: float = 1.0
    beta: float = 0.9
    quant_levels: int = 16
    error_topk_ratio: float = 0.05
    rank: int = 4
    qsgd_levels: int = 16
    value_dtype: str = "float32"
    layerwise: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("feedback", self.feedback, FEEDBACKS)
        _check_choice("compressor", self.compressor, GRADIENT_COMPRESSORS)
        _check_choice("error_compressor", self.error_compressor, ERROR_COMPRESSORS)
        _check_choice("value_dtype", self.value_dtype, VALUE_DTYPES)
        _check_choice("sketch_dtype", self.sketch_dtype, SKETCH_DTYPES)
        _check_ratio("k_ratio", self.k_ratio)
        _check_ratio("sketch_ratio", self.sketch_ratio)
        _check_ratio("error_topk_ratio", self.error_topk_ratio)
        _check_int("sketch_rows", self.sketch_rows, 1, 15)
        _check_int("sketch_unit", self.sketch_unit, 0)
        _check_int("quant_levels", self.quant_levels, 1, 127)
        _check_int("qsgd_levels", self.qsgd_levels, 1, 255)
        _check_int("rank", self.rank, 1)
        _check_int("seed", self.seed, 0)
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and 0.0 <= self.beta < 1.0):
            raise ValueError(f"beta={self.beta!r} is out of range; allowed: [0, 1)")
        if not (math.isfinite(self.estimate_scale) and self.estimate_scale > 0):
            raise ValueError(f"estimate_scale={self.estimate_scale!r} is out of range; allowed: > 0")
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise={self.layerwise!r} must be a bool")

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for Flower config records and JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown method config keys {sorted(unknown)}; valid: {sorted(names)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        coerced: dict[str, Any] = {}
        for key, val in values.items():
            t = types[key]
            if t == "int" and isinstance(val, float) and val.is_integer():
                val = int(val)
            elif t == "float" and isinstance(val, int) and not isinstance(val, bool):
                val = float(val)
            elif t == "bool" and isinstance(val, int) and not isinstance(val, bool) and val in (0, 1):
                val = bool(val)
            coerced[key] = val
        return cls(**coerced)
