"""Packaging: the wheel is the library only, the licence an SPDX string, Python as flwr needs it."""

from __future__ import annotations

import tomllib
from importlib.metadata import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_only_the_library_is_installed() -> None:
    assert PROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["conef_fl*"]


def test_licence_is_an_spdx_expression() -> None:
    assert PROJECT["project"]["license"] == "Apache-2.0"


def test_requires_python_is_what_the_installed_flwr_requires() -> None:
    ours = SpecifierSet(PROJECT["project"]["requires-python"])
    flwr = SpecifierSet(metadata("flwr")["Requires-Python"])
    for minor in range(8, 15):
        version = f"3.{minor}.0"
        if version in ours:
            assert version in flwr, f"requires-python admits {version}, which flwr does not support"
