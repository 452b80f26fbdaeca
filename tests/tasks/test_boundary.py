"""The boundary between the library core and the apps' task code (conef_fl.tasks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "conef_fl"
CORE_FILES = sorted(p for p in PACKAGE.rglob("*.py") if "tasks" not in p.relative_to(PACKAGE).parts)
TASK_FILES = sorted((PACKAGE / "tasks").glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_file_lists_are_not_empty() -> None:
    assert len(CORE_FILES) > 20 and len(TASK_FILES) >= 4


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_never_imports_the_task_code(path: Path) -> None:
    bad = {m for m in _imported_modules(path) if m == "conef_fl.tasks" or m.startswith("conef_fl.tasks.")}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}: the core must not depend on the apps' tasks"


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.name)
def test_the_task_code_uses_no_flower_adapter_and_keeps_no_module_cache(path: Path) -> None:
    mods = _imported_modules(path)
    assert not {m for m in mods if m == "flwr" or m.startswith(("conef_fl.flower", "conef_fl.ddp", "flwr."))}
    text = path.read_text()
    assert "lru_cache" not in text and "functools.cache" not in text and "_CACHE" not in text
