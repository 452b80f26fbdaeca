"""Per-round results (JSON + CSV), the final model and a summary, written to the output folder."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def write_results(out_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``rounds.json``, ``rounds.csv`` and ``summary.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    (out_dir / "rounds.json").write_text(json.dumps(clean, indent=1))
    if rows:
        keys = [k for k in rows[0] if k != "rejections"]
        with (out_dir / "rounds.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(clean)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def save_model(out_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """The final global model as a torch state dict (``model.pt``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt"
    torch.save(state, path)
    return path


__all__ = ["write_results", "save_model", "asdict"]
