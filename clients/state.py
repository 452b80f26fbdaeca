"""The client's error state between rounds: in ``context.state`` and, optionally, on the device's disk.

``context.state`` keeps only the worker's serialized ``state_dict`` (count-sketch
tables, packed quantizer bytes, ...) as a ``bytes`` value — the small compressed
state, never a dense copy of the model.

Flower keeps ``context.state`` in the SuperNode's memory only, so a device that
restarts would lose its error (and the updates it still owes the model). With
``state-dir`` set (node config or run config), every round's state is also
written to the device's disk:

* **keyed by run and node**: ``<state-dir>/<run-key>/partition-<id>.r<round>.state``,
  where the run key is the run config's ``run-name`` (stable across a server
  resume) or Flower's run id, and the node is its ``partition-id`` (stable
  across SuperNode restarts, unlike the node id);
* **atomic**: written to a temporary file, fsynced, then renamed;
* **integrity-checked**: a header with a magic string, the payload length and its
  SHA-256; a file that fails the check is refused with a log line and the client
  starts from zero error instead of crashing;
* **bounded**: files larger than ``state-max-bytes`` are neither written nor read;
* **round-aware**: for round ``R`` the newest state saved *before* ``R`` is used,
  so a round that was aborted after the client saved does not poison a resume;
  only the two newest files are kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context

from clients.settings import ClientSettings
from conef_fl.config import MethodConfig
from conef_fl.worker import CompressionWorker

log = logging.getLogger(__name__)

STATE_KEY = "conef-state"
MAGIC = b"CONEFST1"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload length, sha256
_FILE_RE = re.compile(r"^partition-(\d+)\.r(\d+)\.state$")


class StateFileError(ValueError):
    """A state file on disk is corrupt, truncated, too large or for another configuration."""


def serialize_state(worker: CompressionWorker, server_round: int = 0) -> bytes:
    """``torch.save`` of the worker's state dict plus the round it belongs to."""
    buf = io.BytesIO()
    torch.save({"round": int(server_round), "worker": worker.state_dict()}, buf)
    return buf.getvalue()


def deserialize_state(blob: bytes) -> Mapping[str, object]:
    """The worker state dict inside :func:`serialize_state`'s bytes (``weights_only``: no code runs)."""
    obj = torch.load(io.BytesIO(blob), weights_only=True)
    if not isinstance(obj, Mapping) or "worker" not in obj:
        raise StateFileError("serialized state has no 'worker' entry")
    return obj["worker"]  # type: ignore[return-value]


def _run_key(context: Context) -> str:
    name = str(context.run_config.get("run-name", "") or "")
    key = name or f"run-{context.run_id}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def state_folder(context: Context, settings: ClientSettings) -> Path | None:
    """``<state-dir>/<run-key>`` or None when disk persistence is off."""
    if not settings.state_dir:
        return None
    return Path(settings.state_dir) / _run_key(context)


def write_state_file(folder: Path, partition_id: int, server_round: int, blob: bytes, max_bytes: int) -> Path:
    """Atomically write ``blob`` with an integrity header; keep the two newest files of this partition."""
    if len(blob) + _HEADER.size > max_bytes:
        raise StateFileError(f"state of {len(blob)} bytes exceeds state-max-bytes={max_bytes}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"partition-{partition_id}.r{server_round}.state"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    header = _HEADER.pack(MAGIC, len(blob), hashlib.sha256(blob).digest())
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in _state_files(folder, partition_id)[2:]:
        old[1].unlink(missing_ok=True)
    return path


def read_state_file(path: Path, max_bytes: int) -> bytes:
    """The payload of a state file after checking size, magic, length and SHA-256."""
    size = path.stat().st_size
    if size > max_bytes:
        raise StateFileError(f"{path.name}: {size} bytes exceeds state-max-bytes={max_bytes}")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise StateFileError(f"{path.name}: truncated ({len(data)} bytes, header needs {_HEADER.size})")
    magic, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateFileError(f"{path.name}: bad magic {magic!r}")
    blob = data[_HEADER.size :]
    if len(blob) != length:
        raise StateFileError(f"{path.name}: payload is {len(blob)} bytes, header says {length}")
    if hashlib.sha256(blob).digest() != digest:
        raise StateFileError(f"{path.name}: checksum mismatch (corrupt file)")
    return blob


def _state_files(folder: Path, partition_id: int) -> list[tuple[int, Path]]:
    """``(round, path)`` of this partition's state files, newest first."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _FILE_RE.match(p.name)
        if m and int(m.group(1)) == partition_id:
            out.append((int(m.group(2)), p))
    return sorted(out, reverse=True)


def _restore(worker: CompressionWorker, blob: bytes) -> None:
    # a fresh worker, discarded if this fails: no backup copy of its (zero) state is needed
    worker.load_state_dict(deserialize_state(blob), atomic=False)


def load_worker(
    context: Context,
    method: MethodConfig,
    shapes: Mapping[str, tuple[int, ...]],
    settings: ClientSettings,
    server_round: int = 0,
) -> CompressionWorker | None:
    """The worker restored from ``context.state``, else from disk; None means start from zero error."""
    worker = CompressionWorker(method, shapes)
    rec = context.state[STATE_KEY] if STATE_KEY in context.state else None
    if rec is not None:
        blob = rec.get("blob") if isinstance(rec, ConfigRecord) else None
        try:
            if not isinstance(blob, bytes):
                raise StateFileError("context.state record has no bytes")
            _restore(worker, blob)
            worker.restored_from = "memory"  # type: ignore[attr-defined]
            return worker
        except Exception as exc:  # config changed, corrupt bytes, ...
            log.warning("in-memory error state not restored (%s)", exc)
            worker = CompressionWorker(method, shapes)
    folder = state_folder(context, settings)
    if folder is None:
        return None
    for rnd, path in _state_files(folder, settings.partition_id):
        if server_round and rnd >= server_round:
            continue  # saved during this or a later (aborted) round
        try:
            _restore(worker, read_state_file(path, settings.state_max_bytes))
        except Exception as exc:
            log.warning("error state file %s refused (%s); starting from zero error", path, exc)
            return None
        log.warning("restored error state of partition %d from disk: %s", settings.partition_id, path)
        worker.restored_from = "disk"  # type: ignore[attr-defined]
        return worker
    return None


def save_worker(
    context: Context, worker: CompressionWorker, settings: ClientSettings, server_round: int = 0
) -> int:
    """Store the serialized state in ``context.state`` (and on disk with ``state-dir``); return its size."""
    blob = serialize_state(worker, server_round)
    context.state[STATE_KEY] = ConfigRecord({"blob": blob})
    folder = state_folder(context, settings)
    if folder is not None:
        try:
            write_state_file(folder, settings.partition_id, server_round, blob, settings.state_max_bytes)
        except (OSError, StateFileError) as exc:
            log.error("could not persist error state to %s: %s", folder, exc)
    return len(blob)
