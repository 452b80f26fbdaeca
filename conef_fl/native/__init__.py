"""Optional compiled CPU kernels of the count sketch and scaled-sign decoding, with a pure-torch fallback.

``conef_native.cpp`` defines these torch operators (``torch.ops.conef_native``):

* ``sketch_scatter_``: ``S[b] ← S[b]·f_b + α·Σ_{units in b} s·x_unit`` (+ the tail unit), per
  bucket, accumulated in float32 (float64 for float64 tables) and rounded into the table once;
  the optional per-bucket factor fuses ConEF's ``S ← S − (1−β)·C(ê)`` into the update;
* ``sketch_gather_add_`` / ``sketch_gather_add_csr_``: ``x_unit += α·s·S[h(unit)]`` for every
  unit (one-row recovery; unit order / bucket order), returning whether ``x`` was all finite
  before (the finite check of an update fused into this pass);
* ``sign_add_``: ``x_i += ±s`` from packed sign bits;
* ``sign_pack_``: the sign bits of ``x >= 0``, eight per byte (what ``pack_bits(x >= 0, 1)`` stores).

Each reproduces, term by term and in the same order, the arithmetic of the torch path it
replaces (sparse-CSR ``addmm_``, the 16-bit float32 scratch, ``addcmul_``, the numpy ``±s``
table): results are bit-identical (``tests/native/``; ``docs/design.md``, "Native kernels",
also for where the sketch uses them: ``sketch.NATIVE_WIDE_MIN_NUMEL``).

Built ahead of time by ``python -m conef_fl.native build`` (``scripts/setup.sh`` runs it) with
the system's C++ compiler against the installed torch (no ninja, no pybind), into
``<sys.prefix>/lib/conef_fl_native/`` (``CONEF_NATIVE_DIR`` overrides); the file name carries a
hash of the source, the torch version and the Python ABI, so a stale build is never loaded.
Nothing is ever compiled at import. :func:`ops` returns ``None`` (the fallback is used, logged
once) when the library is missing or fails to load, or when ``CONEF_NATIVE=0``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["ENV_SWITCH", "SOURCE", "available", "build", "build_attempted", "library_path", "ops", "source_path",
           "use_native"]

log = logging.getLogger(__name__)

#: Environment variable: ``0`` forces the pure-torch fallback (read on every call of :func:`ops`).
ENV_SWITCH = "CONEF_NATIVE"
#: Environment variable: folder of the built library (default ``<sys.prefix>/lib/conef_fl_native``).
ENV_DIR = "CONEF_NATIVE_DIR"
#: The kernels' C++ source (shipped as package data).
SOURCE = Path(__file__).with_name("conef_native.cpp")
#: Version of the operators' signatures; the library reports it (``abi_version``).
ABI_VERSION = 3

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "tried": False}
#: Set by :func:`use_native` (tests): overrides the environment variable when not ``None``.
_forced: list[bool | None] = [None]


def _cpu_features() -> str:
    """The CPU's instruction-set flags (Linux ``/proc/cpuinfo``), else the platform's names.

    Part of the build key because the library is compiled with ``-march=native``: a
    ``.venv`` moved to a CPU with other instructions finds no library (the fallback runs,
    and ``python -m conef_fl.native build`` builds one) instead of loading code that would
    stop the process with an illegal instruction.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


#: File in the library folder naming the source the last build compiled (see :func:`source_path`).
_SOURCE_RECORD = "source-path"


def source_path() -> Path:
    """The kernels' source: next to this module, else the one the last build recorded.

    A Flower app runs from its FAB, which holds only Python files (Flower's built-in FAB
    patterns exclude ``.cpp``): there this module has no source beside it, and the build
    key comes from the installed package's source that ``scripts/setup.sh`` compiled (the
    library folder is the environment's, shared by the FAB's processes). The operators'
    ``abi_version`` is checked on load either way.
    """
    if SOURCE.exists():
        return SOURCE
    try:
        recorded = Path((library_dir() / _SOURCE_RECORD).read_text().strip())
    except OSError:
        return SOURCE
    return recorded if recorded.name == SOURCE.name and recorded.is_file() else SOURCE


def _build_key() -> str:
    h = hashlib.sha256(source_path().read_bytes())
    h.update(_cpu_features().encode())
    h.update(torch.__version__.encode())
    h.update((sysconfig.get_config_var("SOABI") or sys.version).encode())
    h.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    return h.hexdigest()[:16]


def library_dir() -> Path:
    """Folder of the built library."""
    return Path(os.environ.get(ENV_DIR) or Path(sys.prefix) / "lib" / "conef_fl_native")


def library_path() -> Path:
    """Where the library for this source, torch and Python is (or would be) built."""
    return library_dir() / f"conef_native-{_build_key()}.so"


def _compile_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or "g++"
    torch_lib = cpp_extension.library_paths()[0]
    gomp = Path(torch_lib) / "libgomp.so.1"
    cmd = [cxx, "-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", inc]
    cmd += [str(SOURCE), "-o", str(out), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
    if gomp.exists():  # torch's own OpenMP runtime (one runtime per process), not the compiler's
        cmd += [f"-Wl,--no-as-needed,{gomp}"]
    return cmd


def build(force: bool = False) -> Path:
    """Compile the kernels for the installed torch (idempotent); returns the library's path.

    Raises
    ------
    RuntimeError
        If no compiler is found or compilation fails (the message has the compiler's output).
    """
    if not SOURCE.exists():  # this module runs from a copy without its source (a FAB): nothing to compile
        raise RuntimeError(f"kernel source {SOURCE} is missing; build from the installed package")
    out = library_path()
    if out.exists() and not force:
        _record_source(out.parent)
        return out
    cxx = os.environ.get("CXX") or "g++"
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = out.with_suffix(".failed")
    if shutil.which(cxx) is None:
        msg = f"no C++ compiler {cxx!r} on PATH (set CXX)"
        failed.write_text(msg)
        raise RuntimeError(msg)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        proc = subprocess.run(_compile_command(part), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            msg = f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}"
            failed.write_text(msg)  # not retried by the setup (build(force=True) retries)
            raise RuntimeError(msg)
        os.replace(part, out)  # atomic: a concurrent reader sees no half-written file
    _record_source(out.parent)
    for old in out.parent.glob("conef_native-*"):  # earlier builds and failures (another source or torch)
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _record_source(folder: Path) -> None:
    """Name this source in ``folder`` for code that runs from a FAB (:func:`source_path`); atomic."""
    record = folder / _SOURCE_RECORD
    text = str(SOURCE.resolve())
    try:
        if record.read_text() == text:
            return
    except OSError:
        pass
    part = folder / f".{_SOURCE_RECORD}.{os.getpid()}"
    part.write_text(text)
    os.replace(part, record)


def build_attempted() -> bool:
    """Whether the library for this source and torch exists or its build has failed before."""
    out = library_path()
    return out.exists() or out.with_suffix(".failed").exists()


def _load() -> Any:
    """The loaded operators or ``None`` (tried once per process; the reason is logged once)."""
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        try:
            path = library_path()
        except OSError as exc:  # the source is missing (a broken install)
            log.info("native kernels unavailable (%s); using the pure-torch fallback", exc)
            return None
        if not path.exists():
            log.info("native kernels not built (%s missing; run `python -m conef_fl.native build`); "
                     "using the pure-torch fallback", path)
            return None
        try:
            torch.ops.load_library(str(path))
            ops = torch.ops.conef_native
            if int(ops.abi_version()) != ABI_VERSION:
                raise RuntimeError(f"abi_version {int(ops.abi_version())}, expected {ABI_VERSION}")
        except Exception as exc:  # noqa: BLE001 - any load failure means: use the fallback
            log.info("native kernels failed to load from %s (%s); using the pure-torch fallback", path, exc)
            return None
        log.debug("native kernels loaded from %s", path)
        _state["loaded"] = ops
        return ops


def ops() -> Any:
    """``torch.ops.conef_native`` when the kernels are built and enabled, else ``None``."""
    forced = _forced[0]
    if forced is False or (forced is None and os.environ.get(ENV_SWITCH, "1").strip() == "0"):
        return None
    return _load()


def available() -> bool:
    """Whether the kernels are built and load (ignores the switch)."""
    return _load() is not None


class use_native:  # noqa: N801 - used like a function: ``with use_native(False): ...``
    """Force the kernels on (``True``: where built) or off (``False``) inside a ``with`` block (tests)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._saved: bool | None = None

    def __enter__(self) -> use_native:
        self._saved = _forced[0]
        _forced[0] = self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        _forced[0] = self._saved
