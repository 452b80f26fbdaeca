"""The client's error state between rounds: serialized compressed state in ``context.state``.

Only the worker's ``state_dict`` (count-sketch tables, quantized bytes, ...) is
kept — serialized with ``torch.save`` into a ``bytes`` value of a
ConfigRecord — so what persists per client is the small compressed state, never
a dense copy of the model.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context

from clients.settings import ClientSettings
from conef_fl.config import MethodConfig
from conef_fl.worker import CompressionWorker

log = logging.getLogger(__name__)

STATE_KEY = "conef-state"


def serialize_state(worker: CompressionWorker) -> bytes:
    """``torch.save`` of the worker's state dict."""
    buf = io.BytesIO()
    torch.save(worker.state_dict(), buf)
    return buf.getvalue()


def deserialize_state(blob: bytes) -> Mapping[str, object]:
    """Inverse of :func:`serialize_state` (``weights_only``: no arbitrary code)."""
    return torch.load(io.BytesIO(blob), weights_only=True)


def load_worker(
    context: Context, method: MethodConfig, shapes: Mapping[str, tuple[int, ...]], settings: ClientSettings
) -> CompressionWorker | None:
    """The worker restored from ``context.state``; None (start from zero error) if absent or incompatible."""
    rec = context.state.get(STATE_KEY) if STATE_KEY in context.state else None
    if rec is None:
        return None
    blob = rec.get("blob") if isinstance(rec, ConfigRecord) else None
    if not isinstance(blob, bytes):
        log.warning("client state record is malformed; starting from zero error")
        return None
    worker = CompressionWorker(method, shapes)
    try:
        worker.load_state_dict(deserialize_state(blob))
    except Exception as exc:  # config changed, corrupt bytes, ...
        log.warning("client error state not restored (%s); starting from zero error", exc)
        return None
    return worker


def save_worker(context: Context, worker: CompressionWorker, settings: ClientSettings) -> int:
    """Store the worker's serialized state in ``context.state``; returns its size in bytes."""
    blob = serialize_state(worker)
    context.state[STATE_KEY] = ConfigRecord({"blob": blob})
    return len(blob)
