"""``conef_mod``: ConEF as a Flower client mod, around the user's own train function.

Add it to any ClientApp whose train function returns the locally trained model
as an ``ArrayRecord`` (as every Flower quickstart does)::

    app = ClientApp(mods=[conef_mod])

and wrap the server's strategy with :class:`~conef_fl.flower.wrapper.ConEF`. On a
train message from that wrapper the mod

1. keeps the incoming global arrays (and, with a compressed downlink, rebuilds
   them from the client's stored copy and the updates it missed);
2. calls the user's train function;
3. forms ``u = x_global − x_local`` from the ``ArrayRecord`` it returns and runs
   one error-feedback step with the round's shared seed; the error state stays
   compressed in ``context.state``, or with ``state-dir`` on disk with only a
   small pointer in ``context.state`` (see :mod:`conef_fl.flower.client_state`);
4. replies with the compressed payload in its wire dtypes instead of the model,
   keeping the user's metrics and adding the ``conef.*`` byte and memory metrics
   (``conef.peak-rss-bytes``: the process's peak resident memory during this round's
   training and compression; on Linux the peak is reset when the message arrives).

A discovery message of the wrapper (:mod:`conef_fl.flower.sampling`) is answered
at once with the node's ``partition-id``; the user's train function does not run.
Other messages, and train messages from a server that is not wrapped, pass
through untouched. A train reply the mod cannot compress (arrays missing, keys
or shapes that differ from the global model, non-float arrays, NaN/Inf) becomes
an error reply naming the problem, and the stored error state is left as it was.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from conef_fl.app_config import check_key
from conef_fl.config import MethodConfig
from conef_fl.error_stores.base import NonFiniteError
from conef_fl.flower import protocol as P
from conef_fl.flower.client_state import check_server_round, load_worker, save_worker
from conef_fl.flower.codec import encode_payloads
from conef_fl.flower.downlink_client import DOWNLINK_ERRORS, receive_global_model
from conef_fl.flower.sampling import discovery_reply, is_discovery
from conef_fl.worker import CompressionWorker

log = logging.getLogger(__name__)

#: Flower's error code for a mod whose precondition failed.
MOD_ERROR_CODE = 6  # flwr.common.constant.ErrorCode.MOD_FAILED_PRECONDITION

ClientAppCallable = Callable[[Message, Context], Message]


class ModRefusal(ValueError):
    """The mod cannot handle this train message or reply (the message says why)."""


@dataclass(frozen=True)
class TrainRequest:
    """What the wrapper asked for in one train message."""

    method: MethodConfig
    server_round: int
    round_seed: int
    arrays_key: str
    global_arrays: ArrayRecord
    allow_state_reset: bool


def conef_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: compress the train reply's model update with (contractive) error feedback."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if is_discovery(msg):
        return discovery_reply(msg, _partition_id(ctxt))
    config = _conef_config(msg)
    if config is None:
        log.warning("conef_mod: the train message carries no ConEF settings (is the server strategy wrapped "
                    "with conef_fl.flower.ConEF?); passing it through uncompressed")
        return call_next(msg, ctxt)
    try:
        request = _read_request(msg, config, ctxt)
    except (ModRefusal, *DOWNLINK_ERRORS) as exc:
        return _error_reply(msg, f"conef_mod refused the train message: {exc}")
    _reset_peak_rss()  # the reply reports the peak of this round's training + compression
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    try:
        return _compress_reply(msg, reply, request, ctxt)
    except (ValueError, NonFiniteError) as exc:  # ModRefusal, a refused round number, NaN/Inf, ...
        log.warning("conef_mod: round %d: %s", request.server_round, exc)
        return _error_reply(msg, f"conef_mod could not compress the train reply: {exc}")


def _reset_peak_rss() -> None:
    """Reset this process's peak resident set size (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the process's lifetime
        pass


def _peak_rss() -> int:
    """Peak resident bytes since :func:`_reset_peak_rss` (``VmHWM``), else the lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=MOD_ERROR_CODE, reason=reason), reply_to=msg)


def _conef_config(msg: Message) -> ConfigRecord | None:
    for record in msg.content.config_records.values():
        if P.ROUND_SEED_KEY in record:
            return record
    return None


def _read_request(msg: Message, config: ConfigRecord, ctxt: Context) -> TrainRequest:
    try:
        method = P.method_from_config(config)
        server_round = check_server_round(config.get(P.SERVER_ROUND_KEY), last_completed=None)
    except ValueError as exc:
        raise ModRefusal(str(exc)) from None
    seed = config.get(P.ROUND_SEED_KEY)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ModRefusal(f"{P.ROUND_SEED_KEY}={seed!r} is not an integer in [0, 2**63)")
    key = config.get(P.ARRAYS_KEY_KEY, "arrays")
    if not isinstance(key, str):
        raise ModRefusal(f"{P.ARRAYS_KEY_KEY}={key!r} is not a string")
    if P.DOWNLINK_MODE_KEY in config:
        state_dir, max_bytes = _settings(ctxt)
        msg.content[key] = receive_global_model(msg, config, ctxt, state_dir=state_dir, max_bytes=max_bytes)
    arrays = msg.content.array_records.get(key)
    if arrays is None:
        raise ModRefusal(f"the train message has no ArrayRecord {key!r} (has {sorted(msg.content.keys())})")
    _check_against_model(method, arrays)
    return TrainRequest(method, server_round, seed, key, arrays, bool(config.get(P.ALLOW_STATE_RESET_KEY, False)))


def _check_against_model(method: MethodConfig, arrays: ArrayRecord) -> None:
    """Refuse server-sent sizes that make no sense for this model (they would only cost memory)."""
    shapes = [tuple(int(d) for d in a.shape) for a in arrays.values()]
    numels = [math.prod(s) for s in shapes] or [0]
    total = sum(numels)
    if method.sketch_unit > (max(numels) if method.layerwise else total):
        raise ModRefusal(f"sketch_unit={method.sketch_unit} exceeds the largest tensor to sketch "
                         f"({max(numels) if method.layerwise else total} elements)")
    if method.compressor in ("powersgd", "atomo"):
        widest = max((min(s[0], math.prod(s[1:])) for s in shapes if len(s) >= 2), default=1)
        widest = max(widest, math.isqrt(max(total, 1)))  # flat vectors are compressed as a square-ish matrix
        if method.rank > widest:
            raise ModRefusal(f"rank={method.rank} exceeds every tensor's matrix rank (at most {widest}) for "
                             f"{method.compressor}")


def _local_arrays(reply: Message, key: str) -> tuple[str, ArrayRecord]:
    records = reply.content.array_records
    if key in records:
        return key, records[key]
    if len(records) == 1:
        return next(iter(records.items()))
    raise ModRefusal(f"the train function's reply must carry the local model as one ArrayRecord; it has "
                     f"{len(records)} ({sorted(records)})")


def _update(global_arrays: ArrayRecord, local: ArrayRecord) -> dict[str, torch.Tensor]:
    """``u = x_global − x_local`` per array, float32; refuses what cannot be compressed."""
    want, got = list(global_arrays.keys()), set(local.keys())
    if set(want) != got:
        raise ModRefusal(f"the local model's arrays differ from the global model's: missing "
                         f"{sorted(set(want) - got)}, unexpected {sorted(got - set(want))}")
    update: dict[str, torch.Tensor] = {}
    for name in want:
        g, x = global_arrays[name], local[name]
        if tuple(g.shape) != tuple(x.shape):
            raise ModRefusal(f"array {name!r} has shape {tuple(x.shape)}, the global model's is {tuple(g.shape)}")
        for which, arr in (("local", x), ("global", g)):
            if np.dtype(arr.dtype).kind != "f":
                raise ModRefusal(f"{which} array {name!r} has dtype {arr.dtype}: ConEF compresses floating-point "
                                 "arrays only (keep integer buffers out of the ArrayRecord)")
        u = torch.from_numpy(np.asarray(g.numpy(), dtype=np.float32))
        u.sub_(torch.from_numpy(np.asarray(x.numpy(), dtype=np.float32)))
        update[name] = u
    return update


def _partition_id(ctxt: Context) -> int:
    pid = ctxt.node_config.get("partition-id", -1)
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < 2**31 else -1


def _settings(ctxt: Context) -> tuple[str, int]:
    """``state-dir`` and ``state-max-bytes`` (node config over run config)."""
    out: dict[str, Any] = {}
    for name, default in (("state-dir", ""), ("state-max-bytes", 64 * 1024 * 1024)):
        value, where = default, "default"
        for src, label in ((ctxt.run_config, "run config"), (ctxt.node_config, "node config")):
            if name in src:
                value, where = src[name], label
        out[name] = check_key(name, value, where=where)
    return out["state-dir"], out["state-max-bytes"]


def _compress_reply(msg: Message, reply: Message, req: TrainRequest, ctxt: Context) -> Message:
    local_key, local = _local_arrays(reply, req.arrays_key)
    update = _update(req.global_arrays, local)
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    state_dir, max_bytes = _settings(ctxt)
    loaded = load_worker(ctxt, req.method, shapes, state_dir=state_dir, max_bytes=max_bytes,
                         server_round=req.server_round)
    if loaded.source == "mismatch" and not req.allow_state_reset:
        raise ModRefusal(f"the stored error state is for another method config ({loaded.reason}); the run must "
                         "set allow-state-reset=true to discard it")
    if loaded.source in ("refused", "mismatch"):
        log.warning("conef_mod: round %d: stored error state not used (%s); starting from zero error",
                    req.server_round, loaded.reason)
    worker = loaded.worker or CompressionWorker(req.method, shapes)
    payloads = worker.step(update, seed=req.round_seed, consume=True)
    del update
    saved = save_worker(ctxt, worker, state_dir=state_dir, max_bytes=max_bytes, server_round=req.server_round)
    arrays, meta = encode_payloads(payloads)
    records: dict[str, Any] = {k: v for k, v in reply.content.items() if k != local_key}
    records[P.PAYLOAD_RECORD], records[P.PAYLOAD_META_RECORD] = arrays, meta
    metrics = next(iter(reply.content.metric_records.values()), None)
    if metrics is None:
        metrics = records["metrics"] = MetricRecord()
    metrics.update({
        P.M_ROUND: req.server_round,
        P.M_UPLINK_BYTES: int(sum(p.nbytes for p in payloads.values())),
        P.M_DENSE_BYTES: 4 * worker.numel,
        P.M_ERROR_STATE_BYTES: int(worker.nbytes),
        P.M_SERIALIZED_STATE_BYTES: int(saved.state_bytes),
        P.M_STATE_SOURCE: P.STATE_SOURCES[loaded.source],
        P.M_STATE_SAVED: int(saved.saved_to_disk or not state_dir),
        P.M_PEAK_RSS: _peak_rss(),
        P.M_PARTITION: _partition_id(ctxt),
    })
    return Message(RecordDict(records), reply_to=msg)
