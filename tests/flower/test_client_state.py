"""Client error state in ``context.state`` and on disk: bound to run, owner, method and round; safe files.

Every file attack uses real files: symlinks, FIFOs, a read-only directory, a
file-size limit (``RLIMIT_FSIZE``) and ``kill -9`` in subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from conef_fl.flower import client_state as cs
from conef_fl.flower.client_state import (
    MAX_ROUND,
    STATE_KEY,
    LoadResult,
    SaveResult,
    StateOwner,
    check_server_round,
    load_worker,
    save_worker,
)
from conef_fl.registry import method_config
from conef_fl.worker import CompressionWorker

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"w": (20, 30), "b": (30,)}
METHOD = method_config("conef-cs")
MAX = 1 << 20


def _worker(steps: int, method=METHOD) -> CompressionWorker:
    w = CompressionWorker(method, SHAPES)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        w.step({k: torch.randn(s, generator=g) for k, s in SHAPES.items()}, seed=t)
    return w


def _ctx(partition: int | None = 0, run_name: str = "exp", node_id: int = 1) -> Context:
    node = {} if partition is None else {"partition-id": partition}
    return Context(run_id=9, node_id=node_id, node_config=node, state=RecordDict(), run_config={"run-name": run_name})


def _save(state_dir: Path | str, rnd: int, worker: CompressionWorker, ctx: Context | None = None,
          max_bytes: int = MAX) -> SaveResult:
    return save_worker(ctx or _ctx(), worker, state_dir=str(state_dir), max_bytes=max_bytes, server_round=rnd)


def _load(state_dir: Path | str, rnd: int, ctx: Context | None = None, method=METHOD,
          max_bytes: int = MAX) -> LoadResult:
    return load_worker(ctx or _ctx(), method, SHAPES, state_dir=str(state_dir), max_bytes=max_bytes,
                       server_round=rnd)


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _same_state(res: LoadResult, worker: CompressionWorker) -> bool:
    return res.worker is not None and _equal(res.worker.state_dict(), worker.state_dict())


def _saved_rounds(state_dir: Path, rounds: tuple[int, ...] = (1, 2, 3), partition: int = 0,
                  run_name: str = "exp") -> dict[int, CompressionWorker]:
    """Save rounds ``rounds`` of one owner through one context (as a running client does)."""
    ctx = _ctx(partition, run_name)
    workers = {}
    for rnd in rounds:
        workers[rnd] = _worker(rnd)
        res = _save(state_dir, rnd, workers[rnd], ctx)
        assert res.saved_to_disk and res.reason == "" and res.state_bytes > 0
    return workers


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --- what works: memory, disk, the two newest rounds, the state from before the round ------------------


def test_memory_then_disk_and_the_state_from_before_the_round(tmp_path: Path) -> None:
    ctx = _ctx()
    workers = {}
    for rnd in (1, 2, 3):
        workers[rnd] = _worker(rnd)
        assert _save(tmp_path, rnd, workers[rnd], ctx).saved_to_disk
    folder = tmp_path / "exp"
    assert sorted(p.name for p in folder.iterdir()) == ["partition-0.last", "partition-0.r2.state",
                                                         "partition-0.r3.state"]
    mem = _load(tmp_path, 4, ctx)  # with state-dir, context.state only points at the file
    assert (mem.source, mem.reason) == ("disk", "") and _same_state(mem, workers[3])
    disk = _load(tmp_path, 4)  # a restarted node: empty context.state
    assert (disk.source, disk.reason) == ("disk", "") and _same_state(disk, workers[3])
    rerun = _load(tmp_path, 3)  # round 3 aborted after the client saved: use round 2's state
    assert rerun.source == "disk" and _same_state(rerun, workers[2])
    # the in-memory state of round 3 is not used for a re-run of round 3 either
    rerun_mem = _load(tmp_path, 3, ctx)
    assert rerun_mem.source == "disk" and _same_state(rerun_mem, workers[2])
    assert _temps(folder) == []


def test_nothing_stored_is_fresh_and_memory_only_writes_no_file(tmp_path: Path) -> None:
    assert _load("", 1).source == "fresh"
    assert _load(tmp_path / "none", 1).source == "fresh"
    ctx = _ctx()
    res = _save("", 1, _worker(1), ctx)
    assert (res.saved_to_disk, res.reason) == (False, "") and res.state_bytes == len(ctx.state[STATE_KEY]["blob"])
    assert _load("", 2, ctx).source == "memory"
    assert list(tmp_path.iterdir()) == []


def test_in_memory_state_of_this_round_is_refused_without_state_dir() -> None:
    ctx = _ctx()
    _save("", 3, _worker(3), ctx)
    res = _load("", 3, ctx)
    assert (res.worker, res.source) == (None, "refused") and "round 3" in res.reason


def test_integrity_checks_refuse_with_a_logged_reason(tmp_path: Path, caplog) -> None:
    _saved_rounds(tmp_path, (1, 2))
    path = tmp_path / "exp" / "partition-0.r2.state"
    good = path.read_bytes()
    cases = {
        "checksum": good[:-1] + bytes([good[-1] ^ 0xFF]),
        "truncated": good[:20],
        "padded": good + b"\0",
        "magic": b"XXXXXXXX" + good[8:],
    }
    for word, data in cases.items():
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=cs.__name__):
            res = _load(tmp_path, 3)
        assert (res.worker, res.source) == (None, "refused"), word
        assert word in res.reason and "refused" in caplog.text and word in caplog.text, (word, res.reason)


def test_size_bound_on_write_and_on_read(tmp_path: Path) -> None:
    ctx = _ctx()
    res = _save(tmp_path, 1, _worker(1), ctx, max_bytes=100)
    assert not res.saved_to_disk and "state-max-bytes=100" in res.reason and res.state_bytes > 100
    assert _load(tmp_path, 2, ctx).source == "memory"  # the in-memory state is kept
    assert not (tmp_path / "exp" / "partition-0.r1.state").exists()
    _saved_rounds(tmp_path, (1,))
    size = (tmp_path / "exp" / "partition-0.r1.state").stat().st_size
    res = _load(tmp_path, 2, max_bytes=size - 1)
    assert res.source == "refused" and f"state-max-bytes={size - 1}" in res.reason
    assert _load(tmp_path, 2, max_bytes=size).source == "disk"


# --- binding: owner, run, round, pointer ---------------------------------------------------------------


def test_another_owners_file_is_refused(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1, 2), partition=0)
    _saved_rounds(tmp_path, (1, 2), partition=1)
    folder = tmp_path / "exp"
    os.replace(folder / "partition-1.r2.state", folder / "partition-0.r2.state")
    res = _load(tmp_path, 3)
    assert res.source == "refused" and "'partition-1'" in res.reason and res.worker is None
    os.replace(folder / "partition-1.last", folder / "partition-0.last")
    res = _load(tmp_path, 3)
    assert res.source == "refused" and "pointer" in res.reason and "partition-1" in res.reason


def test_another_runs_file_is_refused(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1, 2), run_name="a")
    _saved_rounds(tmp_path, (1, 2), run_name="b")
    shutil.copyfile(tmp_path / "a" / "partition-0.r2.state", tmp_path / "b" / "partition-0.r2.state")
    res = _load(tmp_path, 3, _ctx(run_name="b"))
    assert res.source == "refused" and "run 'a'" in res.reason


def test_a_file_whose_inside_round_differs_from_its_name_is_refused(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1, 2))
    folder = tmp_path / "exp"
    os.replace(folder / "partition-0.r1.state", folder / "partition-0.r2.state")  # round 1 posing as round 2
    res = _load(tmp_path, 3)
    assert res.source == "refused" and "inside round 1" in res.reason


def test_a_state_older_than_the_newest_completed_round_is_refused(tmp_path: Path) -> None:
    workers = _saved_rounds(tmp_path, (1, 2, 3))
    folder = tmp_path / "exp"
    r2 = (folder / "partition-0.r2.state").read_bytes()
    # the round-2 file renamed to round 4 (the replay of the issue): not in the pointer, never used
    (folder / "partition-0.r4.state").write_bytes(r2)
    res = _load(tmp_path, 5)
    assert res.source == "disk" and _same_state(res, workers[3])
    assert not (folder / "partition-0.r4.state").exists()  # removed at the owner's start
    # the newest completed round's file is gone: the older one left is not silently used
    (folder / "partition-0.r3.state").unlink()
    res = _load(tmp_path, 5)
    assert res.source == "refused" and "round 3" in res.reason and "missing" in res.reason
    assert "older states (rounds [2])" in res.reason


def test_state_files_without_their_pointer_are_refused(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1, 2))
    (tmp_path / "exp" / "partition-0.last").unlink()
    res = _load(tmp_path, 3)
    assert res.source == "refused" and "no round pointer" in res.reason
    # the next save starts a new pointer; the round after it loads again
    w = _worker(3)
    assert _save(tmp_path, 3, w).saved_to_disk
    res = _load(tmp_path, 4)
    assert res.source == "disk" and _same_state(res, w)


def test_server_round_is_validated() -> None:
    assert check_server_round(1, last_completed=None) == 1
    assert check_server_round(MAX_ROUND, last_completed=MAX_ROUND) == MAX_ROUND
    assert check_server_round(7, last_completed=7) == 7  # a re-run of an aborted round
    for bad in (True, False, 0, -1, MAX_ROUND + 1, 10**12, 1e12, 3.0, "3", None, [3]):
        with pytest.raises(ValueError, match="server-round"):
            check_server_round(bad, last_completed=None)
    with pytest.raises(ValueError, match="server-round=4 goes back below round 5"):
        check_server_round(4, last_completed=5)


def test_a_huge_server_round_writes_nothing_and_later_rounds_still_work(tmp_path: Path) -> None:
    workers = _saved_rounds(tmp_path, (1, 2))
    ctx = _ctx()
    assert _load(tmp_path, 3, ctx).source == "disk"
    for bad in (10**12, 1e12):
        with pytest.raises(ValueError, match="server-round"):
            _load(tmp_path, bad, ctx)
        with pytest.raises(ValueError, match="server-round"):
            _save(tmp_path, bad, workers[2], ctx)
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["partition-0.last", "partition-0.r1.state",
                                                                     "partition-0.r2.state"]
    w3 = _worker(3)
    assert _save(tmp_path, 3, w3, ctx).saved_to_disk
    res = _load(tmp_path, 4)  # after a restart
    assert res.source == "disk" and _same_state(res, w3)


def test_rounds_must_not_go_back(tmp_path: Path) -> None:
    workers = _saved_rounds(tmp_path, (3, 5))
    with pytest.raises(ValueError, match="goes back below round 5"):
        _load(tmp_path, 4)  # from the pointer on disk
    ctx = _ctx()
    _save("", 5, workers[5], ctx)
    with pytest.raises(ValueError, match="goes back below round 5"):
        _load("", 4, ctx)  # from the in-memory state
    with pytest.raises(ValueError, match="goes back below round 5"):
        _save("", 4, workers[5], ctx)
    res = _save(tmp_path, 4, workers[3])  # a fresh context: refused by the pointer, reported, not raised
    assert not res.saved_to_disk and "below round 5" in res.reason
    assert not (tmp_path / "exp" / "partition-0.r4.state").exists()
    assert _same_state(_load(tmp_path, 5), workers[3])  # a re-run of round 5 is allowed


def test_another_method_config_is_a_mismatch(tmp_path: Path) -> None:
    ctx = _ctx()
    _save(tmp_path, 1, _worker(1), ctx)
    other = METHOD.replace(sketch_rows=METHOD.sketch_rows + 2)
    for res in (_load(tmp_path, 2, ctx, method=other), _load(tmp_path, 2, method=other)):
        assert (res.worker, res.source) == (None, "mismatch") and "sketch_rows" in res.reason


def test_an_unusable_in_memory_record_is_refused_not_silently_fresh(tmp_path: Path) -> None:
    ctx = _ctx()
    ctx.state[STATE_KEY] = ConfigRecord({"blob": b"junk"})
    res = _load("", 2, ctx)
    assert res.source == "refused" and "lacks" in res.reason
    ctx = _ctx()
    _save("", 1, _worker(1), ctx)
    rec = ctx.state[STATE_KEY]
    ctx.state[STATE_KEY] = ConfigRecord({**dict(rec), "blob": b"junk" + rec["blob"]})
    res = _load("", 2, ctx)
    assert res.source == "refused" and "not restored" in res.reason
    ctx.state[STATE_KEY] = ConfigRecord({**dict(rec), "owner": "partition-1"})
    res = _load("", 2, ctx)
    assert res.source == "refused" and "partition-1" in res.reason
    # with a state dir the disk state is used instead, and only the refusal of memory is logged
    _saved_rounds(tmp_path, (1,))
    assert _load(tmp_path, 2, ctx).source == "disk"


def test_owner_and_run_key_from_the_context() -> None:
    assert StateOwner.from_context(_ctx(3)) == StateOwner("exp", "partition-3")
    assert StateOwner.from_context(_ctx(None, node_id=42)).owner == "node-42"
    no_name = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert StateOwner.from_context(no_name).run_key == "run-7"
    keys = {StateOwner.from_context(_ctx(run_name=n)).run_key for n in ("../x", "__x", "_.x", "a/b", "a_b")}
    assert len(keys) == 5 and all(not k.startswith(".") and "/" not in k for k in keys)
    for bad in (-1, True, "a", 1.5):
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": bad}, state=RecordDict(), run_config={})
        with pytest.raises(ValueError, match="partition-id"):
            StateOwner.from_context(ctx)
    with pytest.raises(ValueError, match="run_key"):
        StateOwner("..", "partition-0")


# --- safe files: symlinks, FIFOs, devices, directories ---------------------------------------------------


_HOSTILE_CHILD = r"""
import json, os, resource, signal, sys, time
import torch
from flwr.app import Context, RecordDict
from conef_fl.flower.client_state import load_worker
from conef_fl.registry import method_config

signal.alarm(60)  # a read that hangs fails the test instead of hanging it
state_dir, names = sys.argv[1], json.loads(sys.argv[2])
ctx = lambda: Context(run_id=9, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={"run-name": "exp"})
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
load_worker(ctx(), method_config("conef-cs"), {"w": (20, 30), "b": (30,)}, state_dir=state_dir,
            max_bytes=1 << 20, server_round=9)  # warm up: torch's first load allocates
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), hard))  # reading /dev/zero would fail, not swap
out = {}
for name in names:
    os.replace(os.path.join(state_dir, "exp", name), os.path.join(state_dir, "exp", "partition-0.r2.state"))
    before, t0 = rss(), time.monotonic()
    try:
        res = load_worker(ctx(), method_config("conef-cs"), {"w": (20, 30), "b": (30,)}, state_dir=state_dir,
                          max_bytes=1 << 20, server_round=3)
        out[name] = [res.source, res.reason, rss() - before, time.monotonic() - t0]
    except BaseException as exc:
        out[name] = ["raised", repr(exc), rss() - before, time.monotonic() - t0]
print(json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    """The environment of a child that imports exactly the modules this process imports."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}


def test_symlinks_devices_fifos_and_huge_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    """In a subprocess with an address-space limit: a symlink to /dev/zero or a 1 TiB file costs no memory."""
    _saved_rounds(tmp_path, (1, 2))
    folder = tmp_path / "exp"
    os.symlink("/dev/zero", folder / "zero")
    with open(folder / "huge", "wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB of zeros without using the disk
    with open(tmp_path / "huge-outside", "wb") as f:
        f.truncate(1 << 40)
    os.symlink(tmp_path / "huge-outside", folder / "huge-link")
    os.mkfifo(folder / "fifo")
    names = ["zero", "huge", "huge-link", "fifo"]
    proc = subprocess.run([sys.executable, "-P", "-c", _HOSTILE_CHILD, str(tmp_path), json.dumps(names)], cwd=REPO,
                          env=_child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    words = {"zero": "symbolic link", "huge": "exceeds state-max-bytes", "huge-link": "symbolic link",
             "fifo": "a FIFO"}
    for name, (source, reason, rss_growth, _seconds) in out.items():
        assert source == "refused" and words[name] in reason, (name, source, reason)
        assert rss_growth < 64 << 20, (name, rss_growth)  # nothing of the file was read into memory
    assert _temps(folder) == []


def test_a_fifo_never_hangs_the_client(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1, 2))
    fifo = tmp_path / "exp" / "partition-0.r2.state"
    fifo.unlink()
    os.mkfifo(fifo)
    out: list[LoadResult] = []
    t = threading.Thread(target=lambda: out.append(_load(tmp_path, 3)), daemon=True)
    t.start()
    t.join(timeout=30)
    if t.is_alive():  # unblock the reader so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(timeout=10)
        pytest.fail("loading a FIFO blocked")
    assert out[0].source == "refused" and "FIFO" in out[0].reason
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left as it was


def test_a_symlink_or_a_directory_at_the_state_path_is_refused(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1, 2))
    folder = tmp_path / "exp"
    outside = tmp_path / "outside.state"
    os.replace(folder / "partition-0.r2.state", outside)  # a valid file, reached only through a symlink
    os.symlink(outside, folder / "partition-0.r2.state")
    res = _load(tmp_path, 3)
    assert res.source == "refused" and "symbolic link" in res.reason
    (folder / "partition-0.r2.state").unlink()
    (folder / "partition-0.r2.state").mkdir()
    res = _load(tmp_path, 3)
    assert res.source == "refused" and "a directory" in res.reason


def test_a_symlink_planted_at_the_temporary_path_is_never_followed(tmp_path: Path, monkeypatch) -> None:
    ctx = _ctx()
    assert _save(tmp_path, 1, _worker(1), ctx).saved_to_disk  # a running client: its next save is no start
    folder = tmp_path / "exp"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    fixed = "0" * 16
    planted = [folder / f".{stem}.{os.getpid()}.{fixed}.tmp" for stem in ("partition-0.r2", "partition-0.last")]
    planted.append(folder / f"partition-0.r2.tmp{os.getpid()}")  # clients/state.py's temporary name
    for link in planted:
        os.symlink(victim, link)
    used: list[str] = []
    tokens = iter([fixed, "1" * 16, fixed, "2" * 16])
    monkeypatch.setattr(cs, "_temp_token", lambda: used.append(next(tokens)) or used[-1])
    w = _worker(2)
    assert _save(tmp_path, 2, w, ctx).saved_to_disk
    assert victim.read_bytes() == b"precious" and all(link.is_symlink() for link in planted)
    assert used == [fixed, "1" * 16, fixed, "2" * 16]  # each planted name was skipped, never opened
    assert _same_state(_load(tmp_path, 3), w)  # the owner's next start removes the planted links
    assert not any(link.is_symlink() for link in planted) and victim.read_bytes() == b"precious"
    # every attempt finds a file there: nothing written, nothing followed, reported
    for stem in ("partition-0.r3", "partition-0.last"):
        os.symlink(victim, folder / f".{stem}.{os.getpid()}.{fixed}.tmp")
    monkeypatch.setattr(cs, "_temp_token", lambda: fixed)
    res = _save(tmp_path, 3, _worker(3), ctx)
    assert not res.saved_to_disk and "temporary name" in res.reason
    assert victim.read_bytes() == b"precious"


def test_symlinks_at_the_final_names_are_replaced_not_followed(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1,))
    folder = tmp_path / "exp"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, folder / "partition-0.r2.state")
    (folder / "partition-0.last").unlink()
    os.symlink(victim, folder / "partition-0.last")
    assert _load(tmp_path, 2).source == "refused"  # the pointer is a symlink
    w = _worker(2)
    assert _save(tmp_path, 2, w).saved_to_disk
    assert victim.read_bytes() == b"precious"
    assert not (folder / "partition-0.last").is_symlink() and not (folder / "partition-0.r2.state").is_symlink()
    assert _same_state(_load(tmp_path, 3), w)


def test_a_symlinked_run_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").mkdir()
    os.symlink(elsewhere, tmp_path / "state" / "exp")
    res = _save(tmp_path / "state", 1, _worker(1))
    assert not res.saved_to_disk and "symlink" in res.reason
    assert list(elsewhere.iterdir()) == []
    assert _load(tmp_path / "state", 2).source == "refused"


# --- temporaries: every failure path, crashed writers, kill -9 -----------------------------------------


@pytest.mark.parametrize(("op", "nth"), [("fsync", 1), ("fsync", 2), ("replace", 1), ("replace", 2), ("write", 1),
                                         ("write", 4)])
def test_a_failed_write_leaves_no_temporaries_and_is_reported(tmp_path: Path, monkeypatch, caplog, op, nth) -> None:
    workers = _saved_rounds(tmp_path, (1,))
    real = getattr(os, op)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, op, failing)
    with caplog.at_level(logging.ERROR, logger=cs.__name__):
        res = _save(tmp_path, 2, _worker(2))
    monkeypatch.undo()
    assert calls["n"] >= nth
    assert not res.saved_to_disk and "No space left on device" in res.reason and res.state_bytes > 0
    assert "not saved to disk" in caplog.text
    folder = tmp_path / "exp"
    assert _temps(folder) == []
    # the pointer still names round 1 (a state file renamed before the failure is not used) ...
    res = _load(tmp_path, 3)
    assert res.source == "disk" and _same_state(res, workers[1])
    # ... and that owner's start removed anything the failed write left
    assert sorted(p.name for p in folder.iterdir()) == ["partition-0.last", "partition-0.r1.state"]


def test_stale_temporaries_are_cleaned_at_the_owners_start(tmp_path: Path) -> None:
    _saved_rounds(tmp_path, (1,), partition=0)
    _saved_rounds(tmp_path, (1,), partition=1)
    folder = tmp_path / "exp"
    own = [".partition-0.r2.123.0123456789abcdef.tmp", ".partition-0.last.123.0123456789abcdef.tmp",
           "partition-0.r2.tmp123"]
    other_fresh = ".partition-1.r2.456.0123456789abcdef.tmp"
    other_old = ".partition-1.last.456.0123456789abcdef.tmp"
    for name in [*own, other_fresh, other_old]:
        (folder / name).write_bytes(b"x" * 100)
    os.utime(folder / other_old, (1.0, 1.0))
    (folder / "partition-0.r7.state").write_bytes(b"stray")  # not in the pointer
    (folder / "notes.txt").write_bytes(b"keep")
    ctx = _ctx()
    assert _load(tmp_path, 2, ctx).source == "disk"
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([other_fresh, "notes.txt", "partition-0.last", "partition-0.r1.state",
                           "partition-1.last", "partition-1.r1.state"])


_WRITER_CHILD = r"""
import json, os, resource, signal, sys, time
import torch
from flwr.app import Context, RecordDict
from conef_fl.flower.client_state import load_worker, save_worker
from conef_fl.registry import method_config
from conef_fl.worker import CompressionWorker

signal.alarm(120)
args = json.loads(sys.argv[1])
shapes = {"w": (20, 30), "b": (30,)}
method = method_config("conef-cs")
ctx = Context(run_id=9, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
              run_config={"run-name": "exp"})
kw = dict(state_dir=args["state_dir"], max_bytes=1 << 20)

def worker(steps):
    w = CompressionWorker(method, shapes)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        w.step({k: torch.randn(s, generator=g) for k, s in shapes.items()}, seed=t)
    return w

if args["mode"] == "block":  # start, then block inside the save's nth call of os.<op> until killed
    start = load_worker(ctx, method, shapes, server_round=args["round"], **kw)
    real, calls = getattr(os, args["op"]), [0]
    def hook(*a, **k):
        calls[0] += 1
        if calls[0] == args["nth"]:
            print("blocked", flush=True)
            time.sleep(600)
        return real(*a, **k)
    setattr(os, args["op"], hook)
    save_worker(ctx, worker(args["round"]), server_round=args["round"], **kw)
    print("not blocked", flush=True)
else:  # "fsize": round 1 fits, round 2 runs into the file-size limit
    r1 = save_worker(ctx, worker(1), server_round=1, **kw)
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["limit"], args["limit"]))
    r2 = save_worker(ctx, worker(2), server_round=2, **kw)
    print(json.dumps([[r.saved_to_disk, r.reason, r.state_bytes] for r in (r1, r2)]), flush=True)
"""


def _writer(args: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-c", _WRITER_CHILD, json.dumps(args)], cwd=REPO, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_writes_leaves_no_temporaries_after_the_next_start(tmp_path: Path) -> None:
    workers = _saved_rounds(tmp_path, (1,))
    folder = tmp_path / "exp"
    # kill points: writing the state's temporary file, writing the pointer's, between the two renames
    points = [("fsync", 1, {".partition-0.r2"}), ("fsync", 2, {".partition-0.r3", ".partition-0.last"}),
              ("replace", 2, {"partition-0.r4.state", ".partition-0.last"})]
    for i, (op, nth, expected) in enumerate(points):
        proc = _writer({"mode": "block", "state_dir": str(tmp_path), "round": 2 + i, "op": op, "nth": nth})
        try:
            line = proc.stdout.readline()
            assert line == "blocked\n", proc.stderr.read()[-3000:] if proc.poll() is not None else line
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        left = {re.sub(r"\.\d+\.[0-9a-f]{16}\.tmp$", "", p.name) for p in folder.iterdir()}
        assert expected <= left, (op, nth, left)  # the kill hit the write where it was meant to
    res = _load(tmp_path, 5)  # the next start
    assert res.source == "disk" and _same_state(res, workers[1])
    assert sorted(p.name for p in folder.iterdir()) == ["partition-0.last", "partition-0.r1.state"]


def test_a_file_size_limit_is_reported_and_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = _writer({"mode": "fsize", "state_dir": str(tmp_path), "limit": 1024})
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    (ok1, reason1, _), (ok2, reason2, bytes2) = json.loads(stdout.strip().splitlines()[-1])
    assert (ok1, reason1) == (True, "")
    assert not ok2 and "File too large" in reason2 and bytes2 > 1024
    folder = tmp_path / "exp"
    assert sorted(p.name for p in folder.iterdir()) == ["partition-0.last", "partition-0.r1.state"]
    res = _load(tmp_path, 3)
    assert res.source == "disk" and _same_state(res, _worker(1))


@contextmanager
def _read_only_dir() -> Iterator[Path]:
    """A directory this process cannot write to; as root, by dropping the effective uid while inside."""
    top = Path(tempfile.mkdtemp(prefix="conef-ro-"))
    try:
        top.chmod(0o755)
        yield top
    finally:
        for p in [top, *top.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(top)


@contextmanager
def _without_write_permission(folder: Path) -> Iterator[None]:
    """``folder`` (mode 555) read-only for this process; as root, run as "nobody" owning the files while inside."""
    root = os.geteuid() == 0
    if root:  # root ignores permission bits; a client running as "nobody" with its own files does not
        try:
            for p in [folder, *folder.iterdir()]:
                os.chown(p, 65534, 65534, follow_symlinks=False)
        except OSError as exc:  # e.g. a user namespace without that uid
            pytest.skip(f"cannot hand the folder to uid 65534: {exc}")
    folder.chmod(0o555)
    if root:
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
        folder.chmod(0o755)


def test_a_read_only_state_directory_is_reported_not_raised(caplog) -> None:
    with _read_only_dir() as top:
        workers = _saved_rounds(top, (1,))
        folder = top / "exp"
        stale = folder / ".partition-0.r2.1.0123456789abcdef.tmp"
        stale.write_bytes(b"x")
        ctx = _ctx()
        with _without_write_permission(folder), caplog.at_level(logging.WARNING, logger=cs.__name__):
            res = _load(top, 2, ctx)  # reading works; the failed clean-up is logged
            assert res.source == "disk" and _same_state(res, workers[1])
            saved = _save(top, 2, _worker(2), ctx)
        assert not saved.saved_to_disk and "Permission denied" in saved.reason and saved.state_bytes > 0
        assert "not saved to disk" in caplog.text and "could not remove" in caplog.text
        assert _load(top, 3, ctx).source == "memory"  # the client goes on from its in-memory state
        assert sorted(p.name for p in folder.iterdir()) == [stale.name, "partition-0.last", "partition-0.r1.state"]


# --- with state-dir: only a pointer in context.state ---------------------------------------------------


def test_with_state_dir_context_state_keeps_only_a_pointer(tmp_path: Path) -> None:
    ctx = _ctx()
    worker = _worker(1)
    res = _save(tmp_path, 1, worker, ctx)
    assert (res.saved_to_disk, res.in_memory) == (True, False) and res.state_bytes > 1000
    rec = dict(ctx.state[STATE_KEY])
    assert "blob" not in rec and rec["on-disk"] is True and rec["round"] == 1
    assert ctx.state[STATE_KEY].count_bytes() < 1000 < res.state_bytes  # the pointer, not the state
    got = _load(tmp_path, 2, ctx)
    assert (got.source, got.reason) == ("disk", "") and _same_state(got, worker)


def test_memory_stays_flat_as_clients_grow_with_state_dir(tmp_path: Path) -> None:
    def held(state_dir: Path | str, clients: int) -> int:
        total = 0
        for i in range(clients):
            ctx = _ctx(partition=i)
            _save(state_dir, 1, _worker(1), ctx)
            total += ctx.state[STATE_KEY].count_bytes()
        return total

    in_memory = [held("", n) for n in (2, 8)]
    pointers = [held(tmp_path, n) for n in (2, 8)]
    per_state = (in_memory[1] - in_memory[0]) / 6
    assert per_state > 1000  # without state-dir every client holds its state's bytes
    assert (pointers[1] - pointers[0]) / 6 < per_state / 4  # with it only a pointer (a few hundred bytes)


def test_a_pointer_loads_exactly_its_round_and_refuses_otherwise(tmp_path: Path, caplog) -> None:
    ctx = _ctx()
    _save(tmp_path, 1, _worker(1), ctx)
    _save(tmp_path, 2, _worker(2), ctx)
    other = _ctx()  # another writer of the same owner moved the disk on to round 3
    other.state[STATE_KEY] = ConfigRecord(dict(ctx.state[STATE_KEY]))
    _save(tmp_path, 3, _worker(3), other)
    with caplog.at_level(logging.WARNING, logger=cs.__name__):
        res = _load(tmp_path, 4, ctx)  # ctx's pointer says round 2; the disk's newest is round 3
    assert (res.worker, res.source) == (None, "refused")
    assert "names round 3, not round 2" in res.reason and "refused" in caplog.text
    assert _load(tmp_path, 4, other).source == "disk"


def test_a_pointer_whose_file_is_gone_or_without_state_dir_is_refused_not_fresh(tmp_path: Path) -> None:
    ctx = _ctx()
    _save(tmp_path, 1, _worker(1), ctx)
    no_dir = _load("", 2, ctx)
    assert no_dir.source == "refused" and "no state-dir is set" in no_dir.reason
    shutil.rmtree(tmp_path / "exp")
    gone = _load(tmp_path, 2, ctx)
    assert gone.source == "refused" and "pointer names the state of round 1" in gone.reason


def test_a_malformed_pointer_is_refused() -> None:
    ctx = _ctx()
    _save("", 1, _worker(1), ctx)
    rec = dict(ctx.state[STATE_KEY])
    ctx.state[STATE_KEY] = ConfigRecord({**rec, "on-disk": True})  # bytes and a pointer at once
    res = _load("", 2, ctx)
    assert res.source == "refused" and "neither the state's bytes nor an on-disk pointer" in res.reason
