"""Client side of the compressed downlink: keep a copy of the global model, apply the updates it missed.

With a compressed downlink the server sends either the dense model
(``downlink-mode = "dense"``) or the compressed updates ``Δ̃`` of the rounds
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
from flwr.app import ConfigRecord, Context, Message

from conef_fl.feedback import make_compressor_for
from conef_fl.flower.codec import decode_payloads
from conef_fl.flower.strategy import DOWNLINK_PREFIX, method_from_config
from conef_fl.validation import expected_spec

MODEL_KEY = "conef-global-model"


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


def receive_global_model(
    msg: Message, context: Context, template: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The global model this message carries or implies (dense, or stored copy + missed updates)."""
    cfg = msg.content["config"]
    mode = cfg.get("downlink-mode")
    if mode is None or mode == "dense":
        model = msg.content["arrays"].to_torch_state_dict()
        if mode is not None:
            store_model(context, int(cfg["model-version"]), model)
        return model
    if mode != "delta":
        raise ValueError(f"downlink-mode={mode!r}; allowed: dense, delta")
    have = stored_model(context)
    base = int(cfg["base-version"])
    if have is None or have[0] != base:
        got = None if have is None else have[0]
        raise ValueError(f"client holds model version {got}, the update needs version {base}")
    version, model = have
    down = method_from_config(cfg, DOWNLINK_PREFIX)
    q = make_compressor_for(down)
    rounds, seeds = list(cfg["downlink-rounds"]), list(cfg["downlink-seeds"])
    if len(rounds) != len(seeds):
        raise ValueError(f"{len(rounds)} downlink rounds but {len(seeds)} seeds")
    for r, seed in zip(rounds, seeds, strict=True):
        seed = int(seed)
        specs = {k: expected_spec(q, tuple(template[k].shape), seed=seed, key=k) for k in template}
        payloads = decode_payloads(msg.content[f"down-{r}"], msg.content[f"down-{r}-meta"], specs)
        for k, p in payloads.items():
            model[k] = model[k] - q.decompress(p).view(model[k].shape)
        version = int(r)
    if version != int(cfg["model-version"]):
        raise ValueError(f"after catching up the client has version {version}, expected {cfg['model-version']}")
    store_model(context, version, model)
    return model
