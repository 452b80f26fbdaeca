"""The project's ServerApp, also recording every accepted train reply's metrics (one JSON line per reply).

The ServerApp keeps only per-round aggregates. To see *which* client did what —
e.g. on which Ray node each ClientApp ran (the ``ray-node`` metric) — this module
serves the same ServerApp (:data:`server.server_app.app`, same strategy, same
rounds) with one observer: the inner strategy's ``train_metrics_aggr_fn`` first
appends each accepted client reply's metrics (those carrying ``conef.server-round``) to
``<output-dir>/<run-name>/client_metrics.jsonl``, then aggregates as before.

:func:`write_probe_app` writes an app folder whose ``pyproject.toml`` is the
project's with ``serverapp = "sim.metrics_probe:app"``; ``flwr run`` on that
folder runs the probe (the code itself is imported from this repository through
``PYTHONPATH``, which :class:`sim.flower_runtime.FlowerProcesses` sets).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

import server.server_app as _server
from conef_fl.flower import protocol as P

#: Per-reply metrics file in the run's output folder.
METRICS_FILE = "client_metrics.jsonl"

_build_strategy = _server.build_strategy


def _recording(inner: Callable[[list[RecordDict], str], MetricRecord] | None, path: Path,
               ) -> Callable[[list[RecordDict], str], MetricRecord]:
    aggregate = inner or aggregate_metricrecords

    def record_then_aggregate(contents: list[RecordDict], weighted_by: str) -> MetricRecord:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            for content in contents:
                for metrics in content.metric_records.values():
                    if P.M_ROUND in metrics:  # a client's reply (the wrapper's own aggregate has no round)
                        fh.write(json.dumps(dict(metrics.items())) + "\n")
        return aggregate(contents, weighted_by)

    return record_then_aggregate


def build_strategy(cfg: Any):  # noqa: ANN201 - the ServerApp's own return type
    """The ServerApp's strategy, with the inner strategy's metrics aggregation recording each reply."""
    strategy = _build_strategy(cfg)
    run_dir = Path(cfg.output_dir) / (cfg.run_name or "probe")
    inner = strategy.inner
    inner.train_metrics_aggr_fn = _recording(getattr(inner, "train_metrics_aggr_fn", None), run_dir / METRICS_FILE)
    return strategy


_server.build_strategy = build_strategy  # main() looks the name up in its module at call time
app = _server.app


def write_probe_app(app_dir: Path, repo: Path) -> Path:
    """An app folder running this probe as the ServerApp and the project's ClientApp; returns ``app_dir``."""
    return write_app_dir(app_dir, repo, serverapp="sim.metrics_probe:app")


def write_app_dir(app_dir: Path, repo: Path, *, serverapp: str | None = None, clientapp: str | None = None) -> Path:
    """An app folder: the project's ``pyproject.toml`` with other ServerApp/ClientApp components.

    The FAB then holds only that file; the components are imported from ``repo``
    (on ``PYTHONPATH``). Returns ``app_dir``.
    """
    text = (repo / "pyproject.toml").read_text()
    for key, value in (("serverapp", serverapp), ("clientapp", clientapp)):
        if value is None:
            continue
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f'{key} = "{value}"', text)
        if n != 1:
            raise ValueError(f"{repo / 'pyproject.toml'} has {n} '{key} =' lines; expected 1")
    text = re.sub(r"(?m)^fab-include\s*=.*$", 'fab-include = ["pyproject.toml"]', text)
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir


def read_client_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The recorded metrics, one dict per accepted reply."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
