"""sim.time_to_accuracy and sim.link_check: the modeled wall-clock, time to target, speed-ups, transfer grouping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim import link_check
from sim import time_to_accuracy as tta


def _rounds(accs: dict[int, float], up: int, down: int, n: int = 4) -> list[dict[str, object]]:
    return [{"round": r, "sampled": 2, "accepted": 2, "replied": 2, "uplink_record_bytes_total": 2 * up,
             "downlink_bytes_total": 2 * down, "accuracy": accs.get(r), "round_seconds": 1.0 + r,
             "aggregate_seconds": 0.5} for r in range(1, n + 1)]


def test_compute_from_rounds_skips_warmup_and_evaluated_rounds() -> None:
    rows = _rounds({4: 0.9}, 10, 10)
    c = tta.compute_from_rounds(rows)
    # rounds 2 and 3 only: (3 - 0.5)/2 and (4 - 0.5)/2
    assert c["client_seconds_per_round"] == [1.25, 1.75] and c["client_seconds"] == 1.5
    with pytest.raises(ValueError, match="no round"):
        tta.compute_from_rounds(rows[:1])


def test_modeled_times_and_time_to_target() -> None:
    rows = _rounds({2: 0.5, 4: 0.96}, up=125_000, down=250_000)
    times = tta.modeled_times(rows, 1.0, 0.0, mbit=1.0)  # 1 Mbit/s = 125,000 B/s: 1 s up + 2 s down
    assert times == pytest.approx([4.0, 8.0, 12.0, 16.0])
    assert tta.modeled_times(rows, 1.0, 0.0, mbit=1.0, downlink_ratio=2.0)[0] == pytest.approx(3.0)
    assert tta.time_to_target(rows, times, 95.0) == pytest.approx(16.0)
    assert tta.time_to_target(rows, times, 50.0) == pytest.approx(8.0)
    assert tta.time_to_target(rows, times, 99.0) is None
    with pytest.raises(ValueError, match="out of range"):
        tta.modeled_times(rows, 1.0, 0.0, mbit=0.0)


def test_report_speedup_over_fedavg(tmp_path: Path) -> None:
    runs = [
        {"method_id": "sgd", "seed": 0, "rounds": _rounds({4: 0.95}, up=125_000, down=125_000)},
        {"method_id": "efsgd", "seed": 0, "rounds": _rounds({4: 0.95}, up=12_500, down=125_000)},
    ]
    compute = {"methods": {"sgd": {"client_seconds": 0.0, "server_seconds": 0.0},
                           "efsgd": {"client_seconds": 0.0, "server_seconds": 0.0}}}
    rep = tta.build_report(runs, compute, targets=[95.0], bandwidths=[1.0])
    sgd = rep["methods"]["sgd"]["bandwidths"]["1"]["time_to_target"]["95.0"]
    ef = rep["methods"]["efsgd"]["bandwidths"]["1"]["time_to_target"]["95.0"]
    assert sgd["seconds_mean"] == pytest.approx(8.0) and ef["seconds_mean"] == pytest.approx(4.4)
    assert ef["speedup_vs_fedavg"] == pytest.approx(8.0 / 4.4) and sgd["speedup_vs_fedavg"] == pytest.approx(1.0)
    md = tta.report_markdown(rep, {"sgd": "SGD", "efsgd": "EFSGD"})
    assert "| EFSGD |" in md and "1.82×" in md
    json.dumps(rep)  # serialisable
    with pytest.raises(ValueError, match="no compute calibration"):
        tta.build_report(runs, {"methods": {"sgd": compute["methods"]["sgd"]}}, targets=[95.0])


def test_link_check_groups_transfers_and_measures_rate() -> None:
    # a 100 KB download in 10 KB chunks every 0.1 s, a poll, then a 40 KB upload 5 s later
    events = [[0.1 * i, "down", 10_000] for i in range(10)] + [[2.0, "up", 300]]
    events += [[5.0 + 0.1 * i, "up", 10_000] for i in range(4)]
    downs, ups = link_check.transfers(events, "down"), link_check.transfers(events, "up")
    assert len(downs) == 1 and downs[0]["bytes"] == 100_000
    assert len(ups) == 1 and ups[0]["bytes"] == 40_000 and ups[0]["start"] == 5.0  # the poll is dropped
    assert link_check.measured_rate(downs[0]) == pytest.approx(90_000 / 0.9)
