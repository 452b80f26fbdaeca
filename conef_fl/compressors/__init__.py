"""Gradient (update) compressors ``Q`` and their registry.

>>> q = make_compressor("random-block-k", ratio=0.1)
>>> payload = q.compress(x, seed=round_seed, key="layer1.weight")  # doctest: +SKIP
"""

from __future__ import annotations

from conef_fl.compressors.atomo import ATOMO
from conef_fl.compressors.base import (
    Compressor,
    Payload,
    Selection,
    SelectiveCompressor,
    normalized_weights,
    wire_value_dtype,
)
from conef_fl.compressors.identity import Identity
from conef_fl.compressors.powersgd import PowerSGD
from conef_fl.compressors.qsgd import QSGD
from conef_fl.compressors.random_block import RBSGD, RandomBlockK, SeededSelectiveCompressor
from conef_fl.compressors.random_k import RandomK
from conef_fl.compressors.sign import ScaledSign
from conef_fl.compressors.topk import TopK

__all__ = [
    "ATOMO",
    "COMPRESSORS",
    "Compressor",
    "Identity",
    "Payload",
    "PowerSGD",
    "QSGD",
    "RBSGD",
    "RandomBlockK",
    "RandomK",
    "ScaledSign",
    "SeededSelectiveCompressor",
    "SelectiveCompressor",
    "Selection",
    "TopK",
    "make_compressor",
    "normalized_weights",
    "register_compressor",
    "wire_value_dtype",
]

#: Registry: compressor name -> class.
COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(name: str, cls: type[Compressor]) -> None:
    """Register ``cls`` under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is empty, ``cls`` is not a :class:`Compressor` subclass, or
        ``name`` is already taken by a different class.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a non-empty string")
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"cls={cls!r} must be a subclass of Compressor")
    if COMPRESSORS.get(name, cls) is not cls:
        raise ValueError(f"compressor name {name!r} is already registered to {COMPRESSORS[name].__name__}")
    COMPRESSORS[name] = cls


def make_compressor(name: str, **kwargs: object) -> Compressor:
    """Instantiate the compressor registered as ``name`` with ``kwargs``.

    Raises
    ------
    ValueError
        If ``name`` is unknown (the message lists the valid names), or an argument is invalid.
    """
    try:
        cls = COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; valid names: {sorted(COMPRESSORS)}") from None
    return cls(**kwargs)


for _cls in (Identity, RandomBlockK, RandomK, TopK, ScaledSign, PowerSGD, QSGD, RBSGD, ATOMO):
    register_compressor(_cls.name, _cls)
del _cls
