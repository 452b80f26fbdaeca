"""The Flower App Bundle that `flwr run` builds from this repository stays small and holds the app's code only."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

REPO = Path(__file__).resolve().parents[2]


def test_fab_holds_the_app_code_and_fits_flowers_limit() -> None:
    fab = build_fab_from_disk(REPO)
    assert len(fab) < FAB_MAX_SIZE, f"FAB of {len(fab):,} bytes; Flower refuses more than {FAB_MAX_SIZE:,}"
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    code = [n for n in names if n.endswith(".py")]
    assert "server/server_app.py" in code and "clients/client_app.py" in code and "conef_fl/feedback.py" in code
    assert not [n for n in names if n.startswith(("docs/", "tests/"))]  # results and tests stay out
