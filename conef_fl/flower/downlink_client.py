"""Client side of the compressed downlink: keep a copy of the global model, apply the updates it missed.

With a compressed downlink the server sends either the dense model
(``conef.downlink-mode = "dense"``) or the compressed updates ``Δ̃`` of the rounds
``base-version+1 .. model-version`` (``"delta"``). The client keeps the global
model it last received (``x_v``, serialized in ``context.state``) and applies the
updates in order, so it ends with exactly the server's ``x_{model-version}``.
A client whose stored version is not ``base-version`` refuses the message (the
server then sends it the dense model next time).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from conef_fl.feedback import make_compressor_for
from conef_fl.flower import protocol as P
from conef_fl.flower.codec import decode_payloads
from conef_fl.validation import PayloadError, expected_spec

MODEL_KEY = "conef-global-model"
#: What :func:`receive_global_model` raises on a message it cannot use.
DOWNLINK_ERRORS = (ValueError, KeyError, TypeError, PayloadError)


def stored_model(context: Context) -> tuple[int, dict[str, torch.Tensor]] | None:
    """``(version, model)`` this client last received, or None."""
    if MODEL_KEY not in context.state:
        return None
    rec = context.state[MODEL_KEY]
    blob = rec.get("blob") if isinstance(rec, ConfigRecord) else None
    if not isinstance(blob, bytes):
        return None
    obj = torch.load(io.BytesIO(blob), weights_only=True)
    return int(obj["version"]), obj["model"]


def store_model(context: Context, version: int, model: Mapping[str, torch.Tensor]) -> int:
    """Keep ``x_version`` in ``context.state``; returns the stored bytes."""
    buf = io.BytesIO()
    torch.save({"version": int(version), "model": {k: v.detach().clone() for k, v in model.items()}}, buf)
    blob = buf.getvalue()
    context.state[MODEL_KEY] = ConfigRecord({"blob": blob})
    return len(blob)


def receive_global_model(msg: Message, config: ConfigRecord, context: Context) -> ArrayRecord:
    """The global model this train message carries or implies (dense, or stored copy + missed updates)."""
    mode = config.get(P.DOWNLINK_MODE_KEY)
    key = str(config.get(P.ARRAYS_KEY_KEY, "arrays"))
    if mode == "dense":
        arrays = msg.content[key]
        store_model(context, int(config[P.MODEL_VERSION_KEY]), arrays.to_torch_state_dict())
        return arrays
    if mode != "delta":
        raise ValueError(f"{P.DOWNLINK_MODE_KEY}={mode!r}; allowed: 'dense', 'delta'")
    have = stored_model(context)
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
    store_model(context, version, model)
    return ArrayRecord(model)
