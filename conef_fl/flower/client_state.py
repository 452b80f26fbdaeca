"""A client's error state between rounds: in ``context.state``, or on the device's disk.

Without a state directory, ``context.state`` keeps the worker's serialized state as
``bytes`` under :data:`STATE_KEY` with the round, run, owner and method it belongs to.
With one, every round's state is written atomically to ``<state-dir>/<run-key>/``
(``<owner>.r<round>.state`` and the round pointer ``<owner>.last``, both with a
checksummed header) and ``context.state`` keeps only a pointer, so the process's
memory does not grow with the number of clients. Loads refuse, with a logged reason,
anything that is not exactly the pointer's round of this run and owner; save errors
are reported in :class:`SaveResult`, never raised. The file format, the refusal rules
and the write protocol: ``docs/federated.md`` (*Client state on disk*).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import numbers
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context

from conef_fl.config import MethodConfig
from conef_fl.worker import CompressionWorker

log = logging.getLogger(__name__)

#: Key of the error state in ``context.state``.
STATE_KEY = "conef-state"
#: Largest accepted ``server-round``.
MAX_ROUND = 10_000_000
#: Magic of a state file and of a round pointer file.
STATE_MAGIC = b"CONEFST2"
POINTER_MAGIC = b"CONEFPT1"
#: Magic of a file holding the global model a compressed-downlink client last received.
MODEL_MAGIC = b"CONEFMD1"
#: Temporary files of other owners older than this (seconds) are removed at start.
STALE_TEMP_SECONDS = 600.0

_HEADER = struct.Struct("<8sIQ32s")  # magic, metadata bytes, payload bytes, sha256(metadata + payload)
_MAX_META_BYTES = 64 * 1024
_POINTER_MAX_BYTES = _HEADER.size + _MAX_META_BYTES
_KEEP = 2  # state files (rounds) kept per owner
_TEMP_ATTEMPTS = 8
_RUN_KEY_MAX = 64
_OWNER_RE = re.compile(r"^(?:partition|node)-\d+$")
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_STATE_RE = re.compile(r"^(?P<owner>(?:partition|node)-\d+)\.r(?P<round>\d+)\.state$")
_TEMP_RE = re.compile(r"^\.(?P<owner>(?:partition|node)-\d+)\.(?:r\d+|last|model)\.\d+\.[0-9a-f]{16}\.tmp$")
_LEGACY_TEMP_RE = re.compile(r"^(?P<owner>partition-\d+)\.r\d+\.tmp\d+$")  # clients/state.py's temporaries
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class StateFileError(ValueError):
    """A stored state is corrupt, truncated, too large, not a regular file, or bound to another owner."""


@dataclass(frozen=True)
class StateOwner:
    """Whose state a file is: the run and the node (or data partition) within it.

    Parameters
    ----------
    run_key:
        The run config's ``run-name`` when set (stable across a server resume),
        else ``run-<run id>``; characters outside ``[A-Za-z0-9._-]`` (and a
        leading dot) are replaced, and a changed name gets a hash suffix so that
        two names never share a folder.
    owner:
        ``partition-<partition-id>`` when the node config has ``partition-id``
        (stable across SuperNode restarts), else ``node-<node id>``.
    """

    run_key: str
    owner: str

    def __post_init__(self) -> None:
        if not (isinstance(self.run_key, str) and _RUN_KEY_RE.match(self.run_key)
                and len(self.run_key) <= _RUN_KEY_MAX + 11):
            raise ValueError(f"run_key={self.run_key!r} is not a safe folder name; allowed: [A-Za-z0-9._-], "
                             f"no leading dot")
        if not (isinstance(self.owner, str) and _OWNER_RE.match(self.owner)):
            raise ValueError(f"owner={self.owner!r} is not valid; allowed: 'partition-<n>' or 'node-<n>'")

    @classmethod
    def from_context(cls, context: Context) -> StateOwner:
        """The owner of ``context``'s state (see the class docstring)."""
        name = context.run_config.get("run-name", "")
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise ValueError(f"run-name={name!r} is not valid; allowed: a string")
        run_key = _safe_run_key(str(name)) if str(name) else f"run-{_non_negative('run id', context.run_id)}"
        if "partition-id" in context.node_config:
            owner = f"partition-{_non_negative('partition-id', context.node_config['partition-id'])}"
        else:
            owner = f"node-{_non_negative('node id', context.node_id)}"
        return cls(run_key, owner)


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_worker` found.

    ``source`` is ``"fresh"`` (nothing stored), ``"memory"``, ``"disk"``,
    ``"refused"`` (a stored state existed but was refused; ``reason`` says why)
    or ``"mismatch"`` (the stored state is for another method config).
    ``worker`` is None unless the source is memory or disk: start from zero error.
    """

    worker: CompressionWorker | None
    source: str
    reason: str


@dataclass(frozen=True)
class SaveResult:
    """What :func:`save_worker` did: the state's serialized bytes and whether the disk got them.

    ``in_memory`` is True when ``context.state`` holds the bytes (no state
    directory, or the save to disk failed), False when it holds only the pointer.
    """

    state_bytes: int
    saved_to_disk: bool
    reason: str
    in_memory: bool = True


def check_server_round(server_round: object, *, last_completed: int | None) -> int:
    """The server round as a validated ``int``.

    Parameters
    ----------
    server_round:
        The ``server-round`` value of the server's message: an integer (not a
        bool, float or string) in ``1..MAX_ROUND``.
    last_completed:
        The newest round this client saved a state for, or None. Rounds may
        repeat it (a re-run of an aborted round) but not go below it.

    Raises
    ------
    ValueError
        With the value and the allowed range.
    """
    if isinstance(server_round, bool) or not isinstance(server_round, numbers.Integral):
        raise ValueError(f"server-round={server_round!r} is not valid; allowed: integer 1..{MAX_ROUND}")
    rnd = int(server_round)
    if not 1 <= rnd <= MAX_ROUND:
        raise ValueError(f"server-round={rnd} is out of range; allowed: integer 1..{MAX_ROUND}")
    if last_completed is not None and rnd < last_completed:
        raise ValueError(f"server-round={rnd} goes back below round {last_completed}, the newest round this client "
                         f"completed; allowed: >= {last_completed}")
    return rnd


def load_worker(
    context: Context,
    method: MethodConfig,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    state_dir: str,
    max_bytes: int,
    server_round: int,
) -> LoadResult:
    """The worker for round ``server_round``, restored from ``context.state``, else from disk.

    The in-memory state is used when it was saved before ``server_round`` for the
    same owner; an in-memory pointer (the state is on disk) loads that round's
    state file and refuses any other round. Otherwise (and after a restart) the
    state file of the newest pointer round before ``server_round`` in
    ``state_dir`` (``""``: memory only).
    Refusals are logged and returned, never raised; the result says where the
    state came from.

    Raises
    ------
    ValueError
        If ``server_round`` is not valid or goes below the newest round this
        owner completed (see :func:`check_server_round`); nothing is read further.
    """
    rnd, owner, started, rec, problem = _begin(context, server_round, max_bytes)
    if rec is not None:
        if (rec.run_key, rec.owner) != (owner.run_key, owner.owner):
            problem = f"in-memory state belongs to {rec.run_key}/{rec.owner}, not {owner.run_key}/{owner.owner}"
        else:
            check_server_round(rnd, last_completed=rec.round)
            if rec.method != method.to_dict():
                return _mismatch(owner, rec.method, method, "in memory")
            if rec.round < rnd and rec.blob is None:
                found = _load_from_disk(owner, method, shapes, state_dir, max_bytes, rnd, False,
                                        expect_round=rec.round) if state_dir else None
                return _pointed(owner, rec.round, found)
            if rec.round < rnd:
                worker = CompressionWorker(method, shapes)
                try:
                    _restore(worker, rec.blob, rec.round)
                except Exception as exc:  # noqa: BLE001 - corrupt bytes, other shapes, ...: refuse, do not crash
                    problem = f"in-memory state of round {rec.round} not restored ({exc})"
                else:
                    return LoadResult(worker, "memory", "")
            else:
                problem = f"in-memory state is from round {rec.round}, not from before round {rnd}"
    if problem:
        log.warning("error state of %s: %s", owner.owner, problem)
    if not state_dir:
        if problem:
            return LoadResult(None, "refused", problem)
        return LoadResult(None, "fresh", "no state stored")
    result = _load_from_disk(owner, method, shapes, state_dir, max_bytes, rnd, started)
    if result.source == "refused":
        log.warning("error state of %s refused: %s; starting from zero error", owner.owner, result.reason)
    elif result.source == "disk":
        log.warning("restored error state of %s for round %d from disk", owner.owner, rnd)
    if result.source == "fresh" and problem:
        return LoadResult(None, "refused", f"{problem}; on disk: {result.reason}")
    return result


def save_worker(
    context: Context, worker: CompressionWorker, *, state_dir: str, max_bytes: int, server_round: int
) -> SaveResult:
    """Keep ``worker``'s state for the next round: in ``context.state``, or with ``state_dir`` on disk.

    With ``state_dir`` the state is written to disk and ``context.state`` keeps
    only a pointer to it. A disk that is read-only, full or over a size limit, a
    state larger than ``max_bytes``, a round below the one the owner's pointer
    file names, or anything else that fails with an OS error gives
    ``saved_to_disk=False`` and a logged reason; the state's bytes are then kept
    in ``context.state``.

    Raises
    ------
    ValueError
        If ``server_round`` is not valid or goes below the round of the state in
        ``context.state`` (nothing is stored).
    """
    rnd, owner, started, rec, _ = _begin(context, server_round, max_bytes)
    if rec is not None:
        check_server_round(rnd, last_completed=rec.round)
    blob = _serialize(worker, rnd)
    result = SaveResult(len(blob), False, "")
    if state_dir:
        try:
            _save_to_disk(owner, worker.config, blob, state_dir, max_bytes, rnd, started)
        except (OSError, StateFileError) as exc:
            reason = f"state of round {rnd} not saved to disk: {_describe(exc)}; kept in memory"
            log.error("error state of %s %s", owner.owner, reason)
            result = SaveResult(len(blob), False, reason)
        else:
            result = SaveResult(len(blob), True, "", in_memory=False)
    record: dict[str, Any] = {"round": rnd, "run-key": owner.run_key, "owner": owner.owner,
                              "method": json.dumps(worker.config.to_dict(), sort_keys=True)}
    if result.in_memory:
        record["blob"] = blob
    else:
        record["on-disk"] = True
    context.state[STATE_KEY] = ConfigRecord(record)
    return result


def save_model_file(context: Context, version: int, blob: bytes, *, state_dir: str, max_bytes: int) -> None:
    """Write ``blob`` (a serialized global model of ``version``) atomically to ``<owner>.model`` in the run folder.

    The compressed downlink's model copy, kept on disk like the error state so that
    the process's memory does not hold it between rounds and a restarted SuperNode
    still holds it. Same file protocol as the state files (checksummed header, a new
    temporary file moved into place, the folder fsynced).

    Raises
    ------
    OSError, StateFileError
        If the file cannot be written or would exceed ``max_bytes``.
    """
    _check_max_bytes(max_bytes)
    owner = StateOwner.from_context(context)
    meta = {"kind": "model", "run_key": owner.run_key, "owner": owner.owner, "version": int(version)}
    header, meta_bytes = _pack_bounded(MODEL_MAGIC, meta, blob, max_bytes, "model")
    dir_fd = _open_run_dir(state_dir, owner, create=True)
    try:
        tmp: str | None = _write_temp(dir_fd, f"{owner.owner}.model", (header, meta_bytes, blob))
        try:
            os.replace(tmp, _model_name(owner), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            tmp = None
        finally:
            if tmp is not None:
                _unlink_quietly(dir_fd, tmp)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_model_file(context: Context, *, state_dir: str, max_bytes: int) -> tuple[int, memoryview] | None:
    """``(version, blob)`` of this owner's model file, or None when there is none.

    Raises
    ------
    OSError, StateFileError
        If the file is refused (corrupt, truncated, too large, a symlink or not a
        regular file, another run's or owner's) or cannot be read.
    """
    _check_max_bytes(max_bytes)
    owner = StateOwner.from_context(context)
    try:
        dir_fd = _open_run_dir(state_dir, owner, create=False)
    except FileNotFoundError:
        return None
    try:
        name = _model_name(owner)
        try:
            meta, payload = _unpack(_read_bounded(dir_fd, name, max_bytes), MODEL_MAGIC, name)
        except FileNotFoundError:
            return None
    finally:
        os.close(dir_fd)
    if meta.get("kind") != "model" or (meta.get("run_key"), meta.get("owner")) != (owner.run_key, owner.owner):
        raise StateFileError(f"{name} belongs to {meta.get('run_key')}/{meta.get('owner')} "
                             f"({meta.get('kind')}), not the model of {owner.run_key}/{owner.owner}")
    version = meta.get("version")
    if type(version) is not int or version < 0:
        raise StateFileError(f"{name}: invalid model version {version!r}")
    return version, payload


# --- names and values -------------------------------------------------------------------------


def _safe_run_key(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:_RUN_KEY_MAX]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != name:  # keep distinct names apart after replacing characters
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return safe


def _begin(
    context: Context, server_round: object, max_bytes: int
) -> tuple[int, StateOwner, bool, _MemoryRecord | None, str]:
    """Validated round, the owner, whether this is the owner's start, and the in-memory record (or why not)."""
    rnd = check_server_round(server_round, last_completed=None)
    _check_max_bytes(max_bytes)
    owner = StateOwner.from_context(context)
    started = STATE_KEY not in context.state
    rec, problem = _memory_record(context)
    return rnd, owner, started, rec, problem


def _non_negative(name: str, value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"{name}={value!r} is not valid; allowed: integer >= 0")
    return int(value)


def _check_max_bytes(max_bytes: int) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"state-max-bytes={max_bytes!r} is out of range; allowed: integer >= 1")


def _state_name(owner: StateOwner, rnd: int) -> str:
    return f"{owner.owner}.r{rnd}.state"


def _model_name(owner: StateOwner) -> str:
    return f"{owner.owner}.model"


def _pointer_name(owner: StateOwner) -> str:
    return f"{owner.owner}.last"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror} [{errno.errorcode.get(exc.errno or 0, exc.errno)}]{where}"
    return str(exc)


def _mismatch(owner: StateOwner, stored: Mapping[str, Any], method: MethodConfig, where: str) -> LoadResult:
    changed = sorted(k for k in set(stored) | set(method.to_dict()) if stored.get(k) != method.to_dict().get(k))
    reason = f"state {where} is for another method config (differs in {', '.join(changed) or 'its keys'})"
    log.warning("error state of %s: %s", owner.owner, reason)
    return LoadResult(None, "mismatch", reason)


# --- the state itself ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _MemoryRecord:
    blob: bytes | None  # None: the state is on disk (the record is a pointer)
    round: int
    run_key: str
    owner: str
    method: dict[str, Any]


def _memory_record(context: Context) -> tuple[_MemoryRecord | None, str]:
    """The record in ``context.state`` or (None, why it is unusable; "" when there is none)."""
    if STATE_KEY not in context.state:
        return None, ""
    rec = context.state[STATE_KEY]
    if not isinstance(rec, ConfigRecord):
        return None, f"context.state[{STATE_KEY!r}] is a {type(rec).__name__}, not a ConfigRecord"
    blob, rnd, run_key, owner, method = (rec.get(k) for k in ("blob", "round", "run-key", "owner", "method"))
    on_disk = rec.get("on-disk", False)
    if not ((isinstance(blob, bytes) and on_disk is False) or (blob is None and on_disk is True)):
        return None, f"context.state[{STATE_KEY!r}] has neither the state's bytes nor an on-disk pointer"
    if not (type(rnd) is int and isinstance(run_key, str) and isinstance(owner, str) and isinstance(method, str)):
        return None, f"context.state[{STATE_KEY!r}] lacks round/run-key/owner/method"
    try:
        method_dict = json.loads(method)
    except ValueError:
        method_dict = None
    if not isinstance(method_dict, dict):
        return None, f"context.state[{STATE_KEY!r}] has an unreadable method config"
    return _MemoryRecord(blob, rnd, run_key, owner, method_dict), ""


def _serialize(worker: CompressionWorker, rnd: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"round": rnd, "worker": worker.state_dict()}, buf)
    return buf.getvalue()


def _restore(worker: CompressionWorker, payload: bytes | memoryview, rnd: int) -> None:
    """Load ``payload`` (``weights_only``: no code runs) into a fresh ``worker``."""
    obj = torch.load(io.BytesIO(payload), weights_only=True)
    if not isinstance(obj, Mapping) or "worker" not in obj:
        raise StateFileError("serialized state has no 'worker' entry")
    if obj.get("round") != rnd:
        raise StateFileError(f"serialized state is for round {obj.get('round')!r}, expected {rnd}")
    # a fresh worker, discarded if this fails: no backup copy of its (zero) state is needed
    worker.load_state_dict(obj["worker"], atomic=False)


# --- files --------------------------------------------------------------------------------------


def _pack(magic: bytes, meta: Mapping[str, Any], payload: bytes = b"") -> tuple[bytes, bytes]:
    """Header and metadata bytes of a file whose payload is ``payload``."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    digest = hashlib.sha256(meta_bytes)
    digest.update(payload)
    return _HEADER.pack(magic, len(meta_bytes), len(payload), digest.digest()), meta_bytes


def _pack_bounded(magic: bytes, meta: Mapping[str, Any], payload: bytes, max_bytes: int,
                  what: str) -> tuple[bytes, bytes]:
    """:func:`_pack`, refusing a file over ``max_bytes`` (``StateFileError`` naming ``what`` it is)."""
    header, meta_bytes = _pack(magic, meta, payload)
    size = len(header) + len(meta_bytes) + len(payload)
    if size > max_bytes:
        raise StateFileError(f"the {what} file would be {size} bytes, over state-max-bytes={max_bytes}")
    return header, meta_bytes


def _unpack(data: bytearray, magic: bytes, name: str) -> tuple[dict[str, Any], memoryview]:
    """Metadata and payload of a file's bytes after checking magic, lengths and SHA-256."""
    if len(data) < _HEADER.size:
        raise StateFileError(f"{name}: truncated ({len(data)} bytes, the header needs {_HEADER.size})")
    got_magic, meta_len, payload_len, digest = _HEADER.unpack_from(data)
    if got_magic != magic:
        raise StateFileError(f"{name}: bad magic {got_magic!r}, expected {magic!r}")
    if meta_len > _MAX_META_BYTES or _HEADER.size + meta_len + payload_len != len(data):
        raise StateFileError(f"{name}: truncated or padded ({len(data)} bytes, header says "
                             f"{_HEADER.size} + {meta_len} + {payload_len})")
    body = memoryview(data)[_HEADER.size :]
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"{name}: checksum mismatch (corrupt file)")
    try:
        meta = json.loads(bytes(body[:meta_len]))
    except ValueError as exc:
        raise StateFileError(f"{name}: unreadable metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise StateFileError(f"{name}: metadata is not an object")
    return meta, body[meta_len:]


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return kind
    return "not a regular file"


def _read_bounded(dir_fd: int, name: str, max_bytes: int) -> bytearray:
    """A regular file's bytes, never following a symlink, never blocking, never reading past ``max_bytes``.

    Raises ``FileNotFoundError`` when there is no such file, ``StateFileError``
    when it is refused and other ``OSError`` for I/O errors.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(f"{name}: is a symbolic link; refused") from exc
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):
            raise StateFileError(f"{name}: is not a regular file; refused") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(f"{name}: is {_file_kind(st.st_mode)}, not a regular file; refused")
        if st.st_size > max_bytes:
            raise StateFileError(f"{name}: {st.st_size} bytes exceeds state-max-bytes={max_bytes}")
        data = bytearray(st.st_size)
        view = memoryview(data)
        got = 0
        while got < len(data):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise StateFileError(f"{name}: truncated while reading ({got} of {len(data)} bytes)")
            got += n
        if os.read(fd, 1):
            raise StateFileError(f"{name}: grew while being read; refused")
        return data
    finally:
        os.close(fd)


def _temp_token() -> str:
    return secrets.token_hex(8)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", name, _describe(exc))


def _write_temp(dir_fd: int, stem: str, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to a new, exclusively created temporary file next to ``stem``; fsync it; its name.

    On any failure the temporary file is removed before the exception propagates.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TEMP_ATTEMPTS):
        tmp = f".{stem}.{os.getpid()}.{_temp_token()}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:  # someone else's file (or symlink) at that name: never touch it
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, f"no free temporary name after {_TEMP_ATTEMPTS} attempts", stem)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(dir_fd, tmp)
        raise
    return tmp


def _open_run_dir(state_dir: str, owner: StateOwner, *, create: bool) -> int:
    """A descriptor of ``<state_dir>/<run-key>`` (the run folder itself is never a followed symlink)."""
    if create:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    base = os.open(state_dir, _DIR_FLAGS)
    try:
        if create:
            try:
                os.mkdir(owner.run_key, 0o700, dir_fd=base)
            except FileExistsError:
                pass
        try:
            return os.open(owner.run_key, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=base)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StateFileError(f"{os.path.join(state_dir, owner.run_key)} is not a directory (or is a "
                                     f"symlink); refused") from exc
            raise
    finally:
        os.close(base)


def _own_state_rounds(dir_fd: int, owner: StateOwner) -> list[int]:
    """Rounds of this owner's state files in the folder, newest first."""
    out = []
    for name in os.listdir(dir_fd):
        m = _STATE_RE.match(name)
        if m and m["owner"] == owner.owner:
            out.append(int(m["round"]))
    return sorted(out, reverse=True)


def _read_pointer(dir_fd: int, owner: StateOwner) -> tuple[list[int] | None, str]:
    """The pointer's rounds (newest first), or (None, "") when there is none, or (None, why it is refused)."""
    name = _pointer_name(owner)
    try:
        meta, payload = _unpack(_read_bounded(dir_fd, name, _POINTER_MAX_BYTES), POINTER_MAGIC, name)
    except FileNotFoundError:
        return None, ""
    except (OSError, StateFileError) as exc:
        return None, f"round pointer {_describe(exc)}"
    rounds = meta.get("rounds")
    if meta.get("kind") != "pointer" or len(payload):
        return None, f"round pointer {name}: not a pointer file"
    if (meta.get("run_key"), meta.get("owner")) != (owner.run_key, owner.owner):
        return None, (f"round pointer {name} belongs to {meta.get('run_key')}/{meta.get('owner')}, "
                      f"not {owner.run_key}/{owner.owner}")
    if not (isinstance(rounds, list) and 1 <= len(rounds) <= _KEEP
            and all(type(r) is int and 1 <= r <= MAX_ROUND for r in rounds)
            and all(a > b for a, b in zip(rounds, rounds[1:], strict=False))):
        return None, f"round pointer {name}: invalid rounds {rounds!r}"
    return rounds, ""


def _pointer_at_start(dir_fd: int, owner: StateOwner, started: bool, folder: str) -> tuple[list[int] | None, str]:
    """:func:`_read_pointer`, after cleaning the owner's leftovers when this is its start (failures logged)."""
    rounds, problem = _read_pointer(dir_fd, owner)
    if started:
        try:
            _clean_start(dir_fd, owner, rounds)
        except OSError as exc:
            log.warning("could not clean %s: %s", folder, _describe(exc))
    return rounds, problem


def _clean_start(dir_fd: int, owner: StateOwner, rounds: list[int] | None) -> None:
    """At an owner's start: remove its temporaries (a killed writer's), others' old ones, its stray state files."""
    now = time.time()
    for name in os.listdir(dir_fd):
        m = _TEMP_RE.match(name) or _LEGACY_TEMP_RE.match(name)
        if m:
            if m["owner"] != owner.owner:
                try:
                    age = now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if age < STALE_TEMP_SECONDS:
                    continue  # may be another owner's write in progress
            log.info("removing stale temporary state file %s", name)
            _unlink_quietly(dir_fd, name)
            continue
        s = _STATE_RE.match(name)
        if rounds is not None and s and s["owner"] == owner.owner and int(s["round"]) not in rounds:
            # written by a writer killed before it moved the pointer, or left from an abandoned round
            log.info("removing state file %s (not in the round pointer %s)", name, rounds)
            _unlink_quietly(dir_fd, name)


def _load_from_disk(
    owner: StateOwner,
    method: MethodConfig,
    shapes: Mapping[str, tuple[int, ...]],
    state_dir: str,
    max_bytes: int,
    rnd: int,
    started: bool,
    *,
    expect_round: int | None = None,
) -> LoadResult:
    """The state file of the newest pointer round before ``rnd`` (refused if ``expect_round`` differs)."""
    folder = os.path.join(state_dir, owner.run_key)
    try:
        dir_fd = _open_run_dir(state_dir, owner, create=False)
    except FileNotFoundError:
        return LoadResult(None, "fresh", f"no state saved yet in {folder}")
    except (OSError, StateFileError) as exc:
        return LoadResult(None, "refused", f"state folder not readable: {_describe(exc)}")
    try:
        rounds, problem = _pointer_at_start(dir_fd, owner, started, folder)
        if problem:
            return LoadResult(None, "refused", problem)
        if rounds is None:
            stray = _own_state_rounds(dir_fd, owner)
            if stray:
                return LoadResult(None, "refused", f"state files of rounds {stray} but no round pointer "
                                                   f"{_pointer_name(owner)}; not used")
            return LoadResult(None, "fresh", f"no state saved yet in {folder}")
        check_server_round(rnd, last_completed=rounds[0])
        before = [r for r in rounds if r < rnd]
        if not before:
            return LoadResult(None, "fresh", f"no state saved before round {rnd} (saved rounds: {rounds})")
        want = before[0]
        if expect_round is not None and want != expect_round:
            return LoadResult(None, "refused", f"the round pointer {_pointer_name(owner)} names round {want}, "
                                               f"not round {expect_round}")
        name = _state_name(owner, want)
        try:
            meta, payload = _unpack(_read_bounded(dir_fd, name, max_bytes), STATE_MAGIC, name)
        except FileNotFoundError:
            older = [r for r in _own_state_rounds(dir_fd, owner) if r < want]
            note = f"; older states (rounds {older}) are not used" if older else ""
            return LoadResult(None, "refused", f"{name} (round {want}, the newest this {owner.owner} completed "
                                               f"before round {rnd}) is missing{note}")
        bound = (meta.get("kind"), meta.get("run_key"), meta.get("owner"), meta.get("round"))
        if bound[0] != "state":
            return LoadResult(None, "refused", f"{name}: not a state file")
        if bound[1] != owner.run_key:
            return LoadResult(None, "refused", f"{name} belongs to run {bound[1]!r}, not {owner.run_key!r}")
        if bound[2] != owner.owner:
            return LoadResult(None, "refused", f"{name} belongs to {bound[2]!r}, not {owner.owner!r}")
        if bound[3] != want:
            return LoadResult(None, "refused", f"{name}: its inside round {bound[3]!r} differs from its name "
                                               f"(round {want})")
        stored = meta.get("method")
        if not isinstance(stored, dict):
            return LoadResult(None, "refused", f"{name}: no method config")
        if stored != method.to_dict():
            return _mismatch(owner, stored, method, f"in {name}")
        worker = CompressionWorker(method, shapes)
        try:
            _restore(worker, payload, want)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: refuse, do not crash
            return LoadResult(None, "refused", f"{name}: not restored ({exc})")
        return LoadResult(worker, "disk", "")
    except (OSError, StateFileError) as exc:
        return LoadResult(None, "refused", _describe(exc))
    finally:
        os.close(dir_fd)


def _pointed(owner: StateOwner, pointed: int, found: LoadResult | None) -> LoadResult:
    """What the in-memory pointer to round ``pointed`` gives: ``found`` on disk (None: no state-dir) or a refusal.

    A missing file is a lost state, not a fresh start: it is refused like any other.
    """
    where = f"the in-memory pointer names the state of round {pointed} on disk"
    if found is None:
        result = LoadResult(None, "refused", f"{where}, but no state-dir is set")
    elif found.source in ("fresh", "refused"):
        result = LoadResult(None, "refused", f"{where}: {found.reason}")
    else:
        return found
    log.warning("error state of %s refused: %s; starting from zero error", owner.owner, result.reason)
    return result


def _save_to_disk(
    owner: StateOwner, method: MethodConfig, blob: bytes, state_dir: str, max_bytes: int, rnd: int, started: bool
) -> None:
    meta = {"kind": "state", "run_key": owner.run_key, "owner": owner.owner, "round": rnd,
            "method": method.to_dict()}
    header, meta_bytes = _pack_bounded(STATE_MAGIC, meta, blob, max_bytes, "state")
    dir_fd = _open_run_dir(state_dir, owner, create=True)
    try:
        rounds, problem = _pointer_at_start(dir_fd, owner, started, os.path.join(state_dir, owner.run_key))
        if problem:
            log.warning("error state of %s: %s; writing a new pointer", owner.owner, problem)
        if rounds is not None and rnd < rounds[0]:
            raise StateFileError(f"round {rnd} is below round {rounds[0]}, the newest saved by {owner.owner}")
        new_rounds = [rnd, *[r for r in rounds or [] if r < rnd]][:_KEEP]
        ptr_header, ptr_meta = _pack(POINTER_MAGIC, {"kind": "pointer", "run_key": owner.run_key,
                                                     "owner": owner.owner, "rounds": new_rounds})
        tmp_state: str | None = _write_temp(dir_fd, f"{owner.owner}.r{rnd}", (header, meta_bytes, blob))
        tmp_ptr: str | None = None
        try:
            tmp_ptr = _write_temp(dir_fd, f"{owner.owner}.last", (ptr_header, ptr_meta))
            os.replace(tmp_state, _state_name(owner, rnd), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            tmp_state = None
            os.replace(tmp_ptr, _pointer_name(owner), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            tmp_ptr = None
        finally:
            for tmp in (tmp_state, tmp_ptr):
                if tmp is not None:
                    _unlink_quietly(dir_fd, tmp)
        os.fsync(dir_fd)
        for old in rounds or []:
            if old not in new_rounds:
                _unlink_quietly(dir_fd, _state_name(owner, old))
    finally:
        os.close(dir_fd)
