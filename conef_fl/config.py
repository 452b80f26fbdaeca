"""One validated, frozen configuration object that describes a compression method.

Every part of the project (Flower client mod and strategy wrapper, DDP hook,
benchmarks) builds its compressors and error memories from a
:class:`MethodConfig`, so the same name means the same thing everywhere.

Each field is declared once, with its type, default, allowed values and a
one-line help (:data:`FIELD_SPECS`); the app's config schema
(:mod:`conef_fl.app_config`) derives the user-facing keys from the same
declaration. Validation is type-strict and names the field: ``bool`` is not a
number, strings are not numbers, and every refusal is a ``ValueError`` with
the bad value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
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
ERROR_COMPRESSORS = ("count-sketch", "quantizer", "identity", "top-k", "decayed")
VALUE_DTYPES = ("float32", "float16", "bfloat16")
SKETCH_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ValueSpec:
    """Type and allowed values of one setting (shared by :class:`MethodConfig` and the app schema).

    Parameters
    ----------
    kind:
        ``"int"``, ``"float"``, ``"bool"`` or ``"str"``.
    lo, hi:
        Inclusive bounds for numbers (``None``: unbounded).
    lo_open, hi_open:
        Make ``lo`` / ``hi`` exclusive.
    choices:
        Allowed strings (``kind="str"``); empty: any string.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        """The allowed range in words, for error messages."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return ", ".join(repr(c) for c in self.choices) if self.choices else "a string"
        what = "an integer" if self.kind == "int" else "a number"
        if self.lo is None and self.hi is None:
            return what
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        lo = "-inf" if self.lo is None else _fmt(self.lo)
        hi = "inf" if self.hi is None else _fmt(self.hi)
        return f"{what} in {left}{lo}, {hi}{right}"

    def check(self, name: str, value: Any) -> Any:
        """``value`` converted to this spec's type (int → float only); ``ValueError`` naming ``name`` otherwise."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is not true or false")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{name}={value!r} is not a string; allowed: {self.allowed()}")
            if self.choices and value not in self.choices:
                near = difflib.get_close_matches(value, self.choices, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"{name}={value!r} is not valid{hint}; allowed: {self.allowed()}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "an integer" if self.kind == "int" else "a number"
            raise ValueError(f"{name}={value!r} is not {what}; allowed: {self.allowed()}")
        if self.kind == "int":
            if not isinstance(value, int):
                raise ValueError(f"{name}={value!r} is not an integer; allowed: {self.allowed()}")
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is not finite; allowed: {self.allowed()}")
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            raise ValueError(f"{name}={value!r} is out of range; allowed: {self.allowed()}")
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            raise ValueError(f"{name}={value!r} is out of range; allowed: {self.allowed()}")
        return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def RATIO(**kw: Any) -> ValueSpec:  # noqa: N802 - a spec constructor, read like a type
    """A fraction in (0, 1]."""
    return ValueSpec("float", 0.0, 1.0, lo_open=True, **kw)


def _field(default: Any, spec: ValueSpec, help: str) -> Any:  # noqa: A002
    return field(default=default, metadata={"spec": spec, "help": help})


#: Largest sketch unit / PowerSGD rank a config may ask for (a sane bound; the model size bounds it further).
MAX_UNIT = 1 << 24
MAX_RANK = 4096


@dataclass(frozen=True)
class MethodConfig:
    """A compression method: gradient compressor Q, error feedback, error compressor C.

    Every field's type, allowed values and help text are declared with the field
    (see :data:`FIELD_SPECS`); construction validates all of them, type first.
    """

    feedback: str = _field("conef", ValueSpec("str", choices=FEEDBACKS),
                           "how the worker keeps its error (set by the method name)")
    compressor: str = _field("random-block-k", ValueSpec("str", choices=GRADIENT_COMPRESSORS),
                             "gradient compressor Q sent on the wire")
    k_ratio: float = _field(0.1, RATIO(), "fraction of coordinates Q keeps (random-block-k, random-k, top-k, rbSGD)")
    error_compressor: str = _field("count-sketch", ValueSpec("str", choices=ERROR_COMPRESSORS),
                                   "how ConEF/iConEF store the error (set by the method name)")
    sketch_ratio: float = _field(0.1, RATIO(), "count-sketch table entries as a fraction of each tensor's size")
    sketch_rows: int = _field(1, ValueSpec("int", 1, 15), "count-sketch hash rows v (1 recommended; 3 uses a median)")
    sketch_dtype: str = _field("float32", ValueSpec("str", choices=SKETCH_DTYPES), "storage dtype of the sketch table")
    sketch_unit: int = _field(0, ValueSpec("int", 0, MAX_UNIT),
                              "elements hashed together by the sketch's tensor trick (0 = automatic)")
    estimate_scale: float = _field(1.0, ValueSpec("float", 0.0, 1e6, lo_open=True),
                                   "factor on every recovered error estimate (1 = unbiased)")
    beta: float = _field(0.5, ValueSpec("float", 0.0, 1.0, hi_open=True),
                         "partial error feedback p = u + (1-beta)*e_hat; 0 is plain ConEF")
    quant_levels: int = _field(16, ValueSpec("int", 1, 127), "levels s of the error quantizer (conef-q, iconef)")
    error_topk_ratio: float = _field(0.05, RATIO(), "fraction of the error the top-k error store keeps (hefsgd)")
    rank: int = _field(4, ValueSpec("int", 1, MAX_RANK), "rank of PowerSGD / atom budget of ATOMO")
    qsgd_levels: int = _field(16, ValueSpec("int", 1, 255), "levels s of the QSGD gradient compressor")
    value_dtype: str = _field("float32", ValueSpec("str", choices=VALUE_DTYPES), "wire dtype of transmitted values")
    layerwise: bool = _field(True, ValueSpec("bool"), "compress each tensor separately (true) or one flat buffer")
    seed: int = _field(0, ValueSpec("int", 0, 2**63 - 1), "seed of hashes and private randomness")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = f.metadata["spec"].check(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with ``changes`` applied (validated); unknown names raise ``ValueError``."""
        check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for Flower config records and JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Build from a mapping (e.g. a Flower config record); unknown keys raise ``ValueError``.

        Integral floats are accepted for integer fields and ints for float fields (JSON
        and some transports do not keep the difference); nothing else is converted.
        """
        check_names(values)
        coerced: dict[str, Any] = {}
        for key, val in values.items():
            kind = FIELD_SPECS[key].kind
            if kind == "int" and isinstance(val, float) and val.is_integer() and abs(val) < 2**63:
                val = int(val)
            elif kind == "bool" and isinstance(val, int) and not isinstance(val, bool) and val in (0, 1):
                val = bool(val)
            coerced[key] = val
        return cls(**coerced)


#: Field name → its :class:`ValueSpec` (the one declaration of every method setting).
FIELD_SPECS: dict[str, ValueSpec] = {f.name: f.metadata["spec"] for f in dataclasses.fields(MethodConfig)}
#: Field name → one-line help.
FIELD_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in dataclasses.fields(MethodConfig)}


def check_names(values: Mapping[str, Any]) -> None:
    """``ValueError`` for names that are not :class:`MethodConfig` fields, with near matches."""
    unknown = sorted(set(values) - set(FIELD_SPECS))
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, FIELD_SPECS, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ValueError(f"unknown method setting {', '.join(hints)}; valid: {', '.join(FIELD_SPECS)}")
