"""Building the native kernels: a failure is reported, remembered and never fatal (no compiler needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conef_fl import native


def test_a_failed_build_is_remembered_and_the_fallback_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    assert native.library_path().parent == tmp_path
    assert not native.build_attempted()
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native.build()
    assert native.build_attempted()  # the setup does not retry it
    assert native.library_path().with_suffix(".failed").read_text().startswith("no C++ compiler")


def test_the_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.ops() is None
    with native.use_native(False):
        assert native.ops() is None


def test_code_running_from_a_fab_loads_the_installed_kernels(tmp_path: Path) -> None:
    """A Flower FAB holds only the Python files: the kernels still load (the source the build recorded)."""
    import subprocess
    import sys

    if not native.available():
        pytest.skip("native kernels not built")
    native.build()  # records the source (idempotent)
    pkg = Path(native.__file__).parents[1]
    for f in pkg.rglob("*.py"):  # what a FAB carries of conef_fl: no .cpp
        dst = tmp_path / f.relative_to(pkg.parent)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import conef_fl.native as n; "
            "print(n.SOURCE.exists(), n.source_path() != n.SOURCE, n.ops() is not None, n.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    assert out[:3] == ["False", "True", "True"] and out[3].startswith(str(tmp_path))
