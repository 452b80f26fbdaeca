"""Client side of the compressed downlink: keep a copy of the global model, apply the updates it missed.

With a compressed downlink the server sends either the dense model
(``conef.downlink-mode = "dense"``) or the compressed updates ``Δ̃`` of the rounds
``base-version+1 .. model-version`` (``"delta"``). The client keeps the global
model it last received (``x_v``, serialized in ``context.state``) and applies the
updates in order, so it ends with exactly the server's ``x_{model-version}``.
A client whose stored version is not ``base-version`` refuses the message (the
server then sends it the dense model next time).

With a ``state-dir`` the copy lives on disk like the error state
(``<state-dir>/<run-key>/<owner>.model``, written atomically with a checksummed
header by :func:`conef_fl.flower.client_state.save_model_file`) and
``context.state`` keeps only its version, so a SuperNode's memory does not hold
one model per client between rounds and a restarted SuperNode still catches up.
A file that cannot be written is logged and the copy kept in memory; a file that
is refused (corrupt, another owner's, another version than the pointer's) makes
the client refuse the message.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from conef_fl.feedback import make_compressor_for
from conef_fl.flower import protocol as P
from conef_fl.flower.client_state import StateFileError, load_model_file, save_model_file
from conef_fl.flower.codec import decode_payloads
from conef_fl.validation import PayloadError, expected_spec

log = logging.getLogger(__name__)

MODEL_KEY = "conef-global-model"
#: What :func:`receive_global_model` raises on a message it cannot use.
DOWNLINK_ERRORS = (ValueError, KeyError, TypeError, PayloadError)


def stored_model(context: Context, *, state_dir: str = "",
                 max_bytes: int = 0) -> tuple[int, dict[str, torch.Tensor]] | None:
    """``(version, model)`` this client last received, or None.

    From ``context.state``, else (``state_dir`` set: the record is a pointer, or the
    SuperNode restarted) from the owner's model file; ``max_bytes`` bounds that file.

    Raises
    ------
    ValueError
        If the model file is refused or unreadable, or holds another version than
        the in-memory pointer names.
    """
    rec = context.state[MODEL_KEY] if MODEL_KEY in context.state else None
    rec = rec if isinstance(rec, ConfigRecord) else None
    blob = rec.get("blob") if rec is not None else None
    if isinstance(blob, bytes):
        return _unpack_model(blob, "the in-memory model copy")
    if not state_dir:
        return None
    try:
        found = load_model_file(context, state_dir=state_dir, max_bytes=max_bytes)
    except OSError as exc:
        raise ValueError(f"model file not readable: {exc}") from None
    if found is None:
        if rec is not None and rec.get("on-disk"):
            raise ValueError(f"the model copy of version {rec.get('version')} is not on disk any more")
        return None
    version, payload = found
    if rec is not None and rec.get("version") != version:
        raise ValueError(f"the model file holds version {version}, the client expected {rec.get('version')}")
    held = _unpack_model(payload, "the model file")
    if held[0] != version:
        raise ValueError(f"the model file's header says version {version}, its content {held[0]}")
    return held


def store_model(context: Context, version: int, model: Mapping[str, torch.Tensor], *, state_dir: str = "",
                max_bytes: int = 0) -> int:
    """Keep ``x_version``: on disk with ``state_dir`` (a pointer in ``context.state``), else in it; the bytes."""
    buf = io.BytesIO()
    torch.save({"version": int(version), "model": {k: v.detach().clone() for k, v in model.items()}}, buf)
    blob = buf.getvalue()
    if state_dir:
        try:
            save_model_file(context, version, blob, state_dir=state_dir, max_bytes=max_bytes)
        except (OSError, StateFileError) as exc:
            log.error("model copy of version %d not saved to disk (%s); kept in memory", version, exc)
        else:
            context.state[MODEL_KEY] = ConfigRecord({"version": int(version), "on-disk": True})
            return len(blob)
    context.state[MODEL_KEY] = ConfigRecord({"blob": blob})
    return len(blob)


def _unpack_model(blob: bytes | memoryview, where: str) -> tuple[int, dict[str, torch.Tensor]]:
    """``(version, model)`` of a serialized copy (``weights_only``: no code runs); ValueError if malformed."""
    try:
        obj = torch.load(io.BytesIO(blob), weights_only=True)
        version, model = int(obj["version"]), obj["model"]
    except Exception as exc:  # noqa: BLE001 - bytes from disk are untrusted: refuse, do not crash
        raise ValueError(f"{where} is not readable ({type(exc).__name__}: {exc})") from None
    if not (isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in model.items())):
        raise ValueError(f"{where} does not hold a model (name -> tensor)")
    return version, model


def receive_global_model(msg: Message, config: ConfigRecord, context: Context, *, state_dir: str = "",
                         max_bytes: int = 0) -> ArrayRecord:
    """The global model this train message carries or implies (dense, or stored copy + missed updates).

    ``state_dir`` / ``max_bytes``: where the copy is kept (see :func:`store_model`).
    """
    where = {"state_dir": state_dir, "max_bytes": max_bytes}
    mode = config.get(P.DOWNLINK_MODE_KEY)
    key = str(config.get(P.ARRAYS_KEY_KEY, "arrays"))
    if mode == "dense":
        arrays = msg.content[key]
        store_model(context, int(config[P.MODEL_VERSION_KEY]), arrays.to_torch_state_dict(), **where)
        return arrays
    if mode != "delta":
        raise ValueError(f"{P.DOWNLINK_MODE_KEY}={mode!r}; allowed: 'dense', 'delta'")
    have = stored_model(context, **where)
    base = int(config[P.BASE_VERSION_KEY])
    if have is None or have[0] != base:
        got = None if have is None else have[0]
        raise ValueError(f"client holds model version {got}, the update needs version {base}")
    version, model = have
    q = make_compressor_for(P.method_from_config(config, P.DOWN_PREFIX))
    rounds, seeds = list(config[P.DOWNLINK_ROUNDS_KEY]), list(config[P.DOWNLINK_SEEDS_KEY])
    if len(rounds) != len(seeds):
        raise ValueError(f"{len(rounds)} downlink rounds but {len(seeds)} seeds")
    for r, seed in zip(rounds, seeds, strict=True):
        specs = {k: expected_spec(q, tuple(v.shape), seed=int(seed), key=k) for k, v in model.items()}
        arrays_name, meta_name = P.downlink_record(int(r))
        payloads = decode_payloads(msg.content[arrays_name], msg.content[meta_name], specs)
        for k, p in payloads.items():
            model[k] = model[k] - q.decompress(p).view(model[k].shape)
        version = int(r)
    if version != int(config[P.MODEL_VERSION_KEY]):
        raise ValueError(f"after catching up the client has version {version}, expected "
                         f"{config[P.MODEL_VERSION_KEY]}")
    store_model(context, version, model, **where)
    return ArrayRecord(model)
