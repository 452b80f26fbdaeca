"""Method names → the :class:`MethodConfig` settings each name fixes.

``method_config("conef-cs", k_ratio=0.1)`` gives a validated :class:`MethodConfig`;
:func:`conef_fl.feedback.make_feedback` turns it into per-tensor workers through the
feedback registry (``feedback`` names the class). Settings a name *fixes* (e.g. ``sgd``
fixes the identity compressor) win over the caller's overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conef_fl.config import MethodConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: the config values it fixes (``feedback`` among them)."""

    name: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, description: str = "", **fixed: Any) -> None:
    """Register ``name`` with the config values it fixes (validated now; ``feedback`` is required)."""
    if "feedback" not in fixed:
        raise ValueError(f"method {name!r} must fix feedback=...")
    MethodConfig().replace(**fixed)  # fail early on bad presets
    _METHODS[name] = MethodSpec(name, dict(fixed), description)


def available_methods() -> list[str]:
    """Registered method names."""
    return sorted(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available_methods())}") from None


def method_config(name: str, **overrides: Any) -> MethodConfig:
    """A validated config for method ``name``: defaults, then ``overrides``, then the fixed values."""
    spec = method_spec(name)
    base = MethodConfig.from_dict(overrides) if overrides else MethodConfig()
    clashes = {k: v for k, v in overrides.items() if k in spec.fixed and spec.fixed[k] != v}
    if clashes:
        log.debug("method %s fixes %s; ignoring %s", name, dict(spec.fixed), clashes)
    return base.replace(**spec.fixed)


register_method("sgd", "dense FedAvg / SGD", feedback="none", compressor="identity")
register_method("efsgd", "error feedback, dense fp32 error", feedback="efsgd")
register_method(
    "conef-cs", "partial ConEF, error in a count sketch", feedback="conef", error_compressor="count-sketch"
)
register_method(
    "partial-efsgd", "partial EFSGD (Abdi & Fekri 2020): p = u + (1-β)·e, dense fp32 error",
    feedback="conef", error_compressor="identity",
)
register_method(
    "conef-q", "ConEF, error stochastically quantized", feedback="conef", error_compressor="quantizer",
    beta=0.0,
)
register_method(
    "decayed-efsgd", "partial EFSGD whose dense error ages like ConEF-CS's sketch (stale-error control)",
    feedback="conef", error_compressor="decayed",
)
register_method("iconef-v1", "improved ConEF v1 (C twice)", feedback="iconef-v1", error_compressor="quantizer")
register_method("iconef-v2", "improved ConEF v2 (Q then C)", feedback="iconef-v2", error_compressor="quantizer")
register_method("hefsgd", "EFSGD keeping the top-k of its error", feedback="hefsgd")
register_method("qsgd", "QSGD, unbiased, no memory", feedback="none", compressor="qsgd")
register_method("rbsgd", "random block scaled by d/k, no memory", feedback="none", compressor="rbsgd")
register_method("atomo", "ATOMO SVD atoms, no memory", feedback="none", compressor="atomo")
register_method("ef-topk", "error feedback with top-k", feedback="efsgd", compressor="top-k")
register_method("ef-sign", "error feedback with scaled sign", feedback="efsgd", compressor="scaled-sign")
register_method("ef-powersgd", "error feedback with PowerSGD", feedback="efsgd", compressor="powersgd")
register_method(
    "conef-powersgd", "ConEF (count sketch) with PowerSGD", feedback="conef", compressor="powersgd",
    error_compressor="count-sketch",
)
