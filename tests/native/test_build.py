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
