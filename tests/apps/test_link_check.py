"""sim.link_check's calibrated model (overhead measured unthrottled + compute + bytes/B) and its helpers,
and sim.deploy's ``extra_env`` plumbing; no Flower process is started here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sim import deploy, link_check


def test_pair_transfers_skips_requests_sent_while_downloading() -> None:
    # a 100 KB download with 20 KB of requests going up meanwhile, then a 60 KB reply 5 s later
    events: list[list[Any]] = []
    for i in range(10):
        events += [[0.1 * i, "down", 10_000], [0.1 * i, "up", 2_000]]
    events += [[5.0 + 0.1 * i, "up", 10_000] for i in range(6)]
    pairs = link_check.pair_transfers(events, reply_min_bytes=30_000)
    assert len(pairs) == 1
    assert pairs[0]["down"]["bytes"] == 100_000
    assert pairs[0]["up"] is not None and pairs[0]["up"]["start"] == 5.0 and pairs[0]["up"]["bytes"] == 60_000
    # without the size floor the request traffic (it starts with the download) is still not the reply
    assert link_check.pair_transfers(events)[0]["up"]["start"] == 5.0
    # a reply floor above every uplink transfer: no reply
    assert link_check.pair_transfers(events, reply_min_bytes=1e9)[0]["up"] is None


def test_spread() -> None:
    s = link_check.spread([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert (s["min"], s["max"]) == (1.0, 3.0)
    assert link_check.spread([4.0])["std"] is None
    assert link_check.spread([]) == {"n": 0, "mean": None, "std": None, "min": None, "max": None}


def _run(method: str, mbit: float, measured: float, compute: float = 0.4, up: float = 75_000.0,
         down: float = 750_000.0) -> dict[str, Any]:
    transfer = (up + down) / (mbit * 1e6 / 8.0) if mbit else 0.0
    return {"method": method, "mbit": mbit, "round_seconds_mean": measured,
            "model_round_seconds_mean": compute + transfer, "client_span_seconds_mean": measured - 3.0,
            "model_client_seconds_mean": compute + transfer, "model_uplink_bytes_mean": up,
            "model_downlink_bytes_mean": down, "round_seconds_spread": {"n": 6}}


def test_calibrated_model_adds_overhead_and_judges_each_point() -> None:
    # unthrottled 25 s: overhead 24.6 s; at 1 Mbit/s the transfer is 825,000 B / 125,000 B/s = 6.6 s
    runs = [_run("a", 0.0, 25.0), _run("a", 1.0, 33.0), _run("a", 10.0, 25.2), _run("a", 1.0, 25.5),
            _run("b", 1.0, 30.0)]
    link_check.add_calibrated_model(runs)
    base, slow, fast, wrong, no_base = runs
    cb = base["calibrated_round"]
    assert cb["overhead_seconds"] == pytest.approx(24.6) and cb["model_seconds"] == pytest.approx(25.0)
    assert cb["within_tolerance"] and not cb["discriminates"]  # the calibration point itself
    c = slow["calibrated_round"]
    assert c["transfer_seconds"] == pytest.approx(6.6) and c["model_seconds"] == pytest.approx(31.6)
    assert c["error"] == pytest.approx(33.0 / 31.6 - 1.0)
    assert c["tolerance_seconds"] == pytest.approx(0.1 * 31.6 + 1.0)
    assert c["within_tolerance"] and c["discriminates"]  # 6.6 s of transfer > 4.16 s of tolerance
    assert c["model_without_transfer_seconds"] == pytest.approx(25.0)
    f = fast["calibrated_round"]
    assert f["within_tolerance"] and not f["discriminates"]  # 0.66 s of transfer is inside the tolerance
    # a measurement that ignores the link fails at the discriminating point
    assert not wrong["calibrated_round"]["within_tolerance"]
    # the client level is calibrated the same way, from the client span
    assert slow["calibrated_client"]["model_seconds"] == pytest.approx(22.0 + 0.4 + 6.6 - 0.4)
    # no unthrottled run of that method: no calibrated model
    assert "calibrated_round" not in no_base


def test_within_is_the_stated_tolerance() -> None:
    assert link_check.within(11.0 + 2.0, 11.0)  # 0.1 * 11 + 1 = 2.1
    assert not link_check.within(11.0 + 2.2, 11.0)
    assert not link_check.within(11.0 - 2.2, 11.0)


def test_recompute_and_markdown_from_rows_only(tmp_path: Path) -> None:
    rows = [{"round": r, "round_seconds": 25.0 + r, "client_span_seconds": 20.0 + r} for r in (2, 3, 4, 5)]
    runs = [{**_run("efsgd", 0.0, 28.5), "rounds": rows}, {**_run("efsgd", 1.0, 35.0), "rounds": rows},
            {"method": "sgd", "mbit": 1.0, "error": "flwr run exited with 1"}]
    for r in runs[:2]:
        r.pop("round_seconds_spread")
    results = link_check.recompute({"tolerance": {}, "runs": runs})
    assert results["runs"][0]["round_seconds_spread"]["n"] == 4
    assert results["runs"][0]["round_seconds_spread"]["mean"] == pytest.approx(28.5)
    assert results["tolerance"]["round_fraction"] == link_check.ROUND_TOLERANCE
    md = link_check.markdown(results)
    lines = [ln for ln in md.splitlines() if ln.startswith("| efsgd") or ln.startswith("| sgd")]
    assert len(lines) == 3
    assert "calibration" in lines[0] and "1 Mbit/s" in lines[1] and "failed" in lines[2]
    # the CLI's --report prints the same table from a JSON file
    p = tmp_path / "lc.json"
    p.write_text(json.dumps({"tolerance": {}, "runs": runs}))
    assert link_check.main(["--report", str(p)]) == 0


def test_load_sampler_records_load_averages() -> None:
    with link_check.LoadSampler(every=0.01) as load:
        pass
    s = load.summary()
    assert len(s["samples"]) >= 2 and all(len(x) == 4 for x in s["samples"])
    assert s["one_minute_min"] <= s["one_minute_mean"] <= s["one_minute_max"]


@pytest.mark.parametrize("argv", [["--rounds", "5", "--out", "x.json"], ["--task-poll", "0.001", "--out", "x.json"],
                                  ["--methods", "nope", "--out", "x.json"], []])
def test_cli_refuses_bad_settings_before_starting_anything(argv: list[str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def no_run(*a: object, **k: object) -> None:
        raise AssertionError("a deployment was started")

    monkeypatch.setattr(link_check, "run_one", no_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        link_check.main(argv)
    assert exc.value.code == 2
    assert not (tmp_path / "x.json").exists()


def test_run_deployment_passes_extra_env_and_closes_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class FakeProcesses:
        def __init__(self, home: Path | None) -> None:
            self.home = Path("/nonexistent")
            self.extra_env: dict[str, str] = {}
            seen["fp"] = self

        def start_superlink(self, **kw: object) -> str:
            seen["env_at_start"] = dict(self.extra_env)
            raise RuntimeError("SuperLink refused to start (test)")

        def close(self) -> list[int]:
            seen["closed"] = True
            return []

    monkeypatch.setattr(deploy, "FlowerProcesses", FakeProcesses)
    monkeypatch.setattr(deploy, "run_config_for", lambda cfg, n: (dict(cfg), Path("/nonexistent/run")))
    with pytest.raises(RuntimeError, match="refused"):
        deploy.run_deployment({}, num_supernodes=2, extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
    assert seen["env_at_start"] == {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
    assert seen["closed"]


def _alternating(n: int, *, mbit: float, base: float = 20.0, extra: float = 0.0,
                 switch_inside: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Synthetic rounds.json rows and two links' chunk logs of an ``--alternate`` deployment: round r (1-based)
    is throttled when r is even; a throttled round lasts ``base + transfer + extra`` seconds."""
    up, down = 80_000, 740_000
    transfer = (up + down) / (mbit * 1e6 / 8.0)
    rows, t = [], 5.0
    events: list[list[Any]] = [[0.1 + 0.01 * i, "down", 85_000] for i in range(10)]  # the FAB, before round 1
    for r in range(1, n + 1):
        throttled = r % 2 == 0
        dur = base + (transfer + extra if throttled else 0.0)
        rows.append({"round": r, "sampled": 2, "accepted": 2, "uplink_record_bytes_total": 2 * up,
                     "downlink_bytes_total": 2 * down, "round_seconds": dur})
        start = t + 1.0
        events += [[start + 0.01 * i, "down", down // 10] for i in range(10)]
        events += [[start + 0.01 * i, "up", 2_000] for i in range(10)]  # requests while downloading
        reply = start + dur - 2.0
        events += [[reply + 0.01 * i, "up", up // 4] for i in range(4)]
        if switch_inside == r:
            events.append([start + 1.0, "state", int(not throttled)])
        events.append([reply + 0.7, "state", int(not throttled)])
        t += dur
    events.sort(key=lambda e: e[0])
    return rows, [{"events": events}, {"events": events}]


def test_alternating_check_pairs_each_throttled_round_with_its_unlimited_neighbours() -> None:
    rows, links = _alternating(12, mbit=1.0)
    # 13 downloads (the FAB first) for 12 rounds: the FAB is dropped, round 1 is the first message
    assert len(link_check.transfers(links[0]["events"], "down")) == 13
    assert link_check.round_pairs(links[0], 12)[0]["down"]["start"] == pytest.approx(6.0)
    assert link_check.round_states(rows, links) == [0, 1] * 6
    a = link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05)
    c = a["calibrated_round"]
    assert [p["round"] for p in c["paired_rounds"]] == [4, 6, 8, 10] and c["n"] == 4
    assert c["transfer_seconds"] == pytest.approx(820_000 / 125_000)
    assert c["model_seconds"] == pytest.approx(20.0 + 6.56) and c["measured_seconds"] == pytest.approx(26.56)
    assert c["within_tolerance"] and c["discriminates"]
    assert c["unlimited"]["n"] == 5 and c["throttled"]["n"] == 5  # rounds 3..11 and 2..10
    assert c["unpaired"]["within_tolerance"]
    # a deployment whose throttled rounds are as fast as its unlimited ones fails the check
    rows_fast, links_fast = _alternating(12, mbit=1.0, extra=-6.56)
    assert not link_check.analyse_alternating(rows_fast, links_fast, 1.0, 0.4, 0.05)["calibrated_round"][
        "within_tolerance"]
    # at 10 Mbit/s the transfer (0.66 s) is inside the tolerance: the point does not discriminate
    rows10, links10 = _alternating(12, mbit=10.0)
    c10 = link_check.analyse_alternating(rows10, links10, 10.0, 0.4, 0.05)["calibrated_round"]
    assert c10["within_tolerance"] and not c10["discriminates"]
    with pytest.raises(ValueError, match="out of range"):
        link_check.analyse_alternating(rows, links, 0.0, 0.4, 0.05)


def test_alternating_check_drops_rounds_with_a_switch_inside_the_exchange() -> None:
    rows, links = _alternating(12, mbit=1.0, switch_inside=6)
    states = link_check.round_states(rows, links)
    assert states[5] is None  # round 6
    c = link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05)["calibrated_round"]
    assert 6 not in [p["round"] for p in c["paired_rounds"]]
    md = link_check.markdown({"alternate": True, "tolerance": {}, "runs": [
        {**link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05), "method": "efsgd"}]})
    assert md.count("| efsgd | 1 Mbit/s |") == 2


def test_cli_alternate_needs_enough_rounds_and_a_bandwidth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_check, "run_one", lambda *a, **k: (_ for _ in ()).throw(AssertionError("started")))
    for argv in (["--alternate", "--rounds", "11", "--mbit", "1"], ["--alternate", "--rounds", "12", "--mbit", "0,1"]):
        with pytest.raises(SystemExit) as exc:
            link_check.main([*argv, "--out", str(tmp_path / "x.json")])
        assert exc.value.code == 2


def test_reanalyse_reproduces_an_alternating_run_from_its_stored_transfers(tmp_path: Path) -> None:
    rows, links = _alternating(12, mbit=1.0, extra=-6.0)  # only ~0.56 s of the 6.56 s transfer shows
    a = link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05)
    c = a["calibrated_round"]
    assert not c["within_tolerance"]
    assert c["link_effect_spread"]["mean"] == pytest.approx(0.56)
    # the post-hoc reading: only the upload (80 KB: 0.64 s) adds to the round
    assert c["post_hoc_upload_only"]["upload_seconds"] == pytest.approx(0.64)
    assert c["post_hoc_upload_only"]["within_tolerance"]
    stored = {**a, "method": "efsgd",
              "link_transfers": [{d: link_check.transfers(k["events"], d) for d in ("down", "up")} for k in links],
              "link_states": [link_check.link_states(k["events"]) for k in links]}
    again = link_check.reanalyse({"alternate": True, "rounds": 12, "runs": [stored]})["runs"][0]
    assert again["reanalysed"] and again["round_states"] == a["round_states"]
    assert again["calibrated_round"]["model_seconds"] == pytest.approx(c["model_seconds"])
    assert again["calibrated_round"]["measured_seconds"] == pytest.approx(c["measured_seconds"])


def _clientapps(links: list[dict[str, Any]], n: int, startup: float) -> list[dict[str, Any]]:
    """Two ClientApp processes per round, started 0.2 s after the round's download began, ready after ``startup``;
    round 1's take 9 CPU-s (partition cache empty), later ones 3."""
    out = []
    for i, pair in enumerate(link_check.round_pairs(links[0], n)):
        t = pair["down"]["start"] + 0.2
        out += [{"pid": 100 + 2 * i + k, "start": t, "ready": t + startup, "end": t + 15.0,
                 "cpu_seconds": 9.0 if i == 0 else 3.0} for k in range(2)]
    return out


def test_revised_model_lets_the_clientapp_startup_hide_part_of_the_download() -> None:
    # a 4-s start-up hides 4 s of the 5.92-s download: throttled rounds are 6.56 - 4 = 2.56 s longer
    rows, links = _alternating(12, mbit=1.0, extra=-4.0)
    a = link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05, clientapps=_clientapps(links, 12, 4.0))
    c = a["calibrated_round"]
    assert not c["within_tolerance"]  # the pre-registered model (up/B + down/B) misses by 4 s
    v = c["revised"]
    assert v["n"] == 4 and v["startup_seconds"] == pytest.approx(4.0)
    assert v["transfer_seconds"] == pytest.approx(0.64 + 5.92 - 4.0)
    assert v["model_seconds"] == pytest.approx(v["measured_seconds"]) and v["within_tolerance"]
    assert not v["discriminates"]  # 2.56 s of link is inside ±(10 % + 1 s) of a 22.6-s round
    assert [r["processes"] for r in a["clientapp_rounds"]] == [2] * 12
    assert a["clientapp_cpu_seconds"]["round_1"]["mean"] == 9.0
    assert a["clientapp_cpu_seconds"]["later_rounds"]["mean"] == 3.0
    # a start-up longer than the download hides all of it: only the upload is left
    slow = link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05, clientapps=_clientapps(links, 12, 8.0))
    assert slow["calibrated_round"]["revised"]["transfer_seconds"] == pytest.approx(0.64)
    assert slow["calibrated_round"]["revised"]["model_seconds"] == pytest.approx(20.0 + 0.64)
    md = link_check.markdown({"alternate": True, "tolerance": {}, "runs": [{**a, "method": "efsgd"}]})
    assert "Revised model" in md and "Revised model 2" in md and md.count("| efsgd | 1 Mbit/s |") == 6
    # revised model 2: the ClientApp asks at S = 4 s, then at 5 s and 7 s; the 5.92-s download is there at 7 s
    r2 = c["revised_retry"]
    assert r2["n"] == 4 and r2["transfer_seconds"] == pytest.approx(0.64 + 3.0)
    assert r2["model_seconds"] == pytest.approx(20.0 + 3.64) and r2["within_tolerance"]
    # without ClientApp records (older JSONs) there is no revised model
    assert "revised" not in link_check.analyse_alternating(rows, links, 1.0, 0.4, 0.05)["calibrated_round"]


def test_clientapp_sampler_records_start_first_socket_and_cpu(tmp_path: Path) -> None:
    script = tmp_path / "flwr-clientapp"
    script.write_text("import socket, sys\nsys.stdin.readline()\na, b = socket.socketpair()\nprint('ok', flush=True)\n"
                      "sys.stdin.readline()\n")
    sampler = link_check.ClientAppSampler()
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60.0
        while proc.pid not in sampler.records and time.monotonic() < deadline:
            sampler.scan()
            time.sleep(0.05)
        assert sampler.records[proc.pid]["ready"] is None  # no socket yet
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        sampler.scan()
        rec = sampler.records[proc.pid]
        assert rec["ready"] is not None and rec["start"] <= rec["ready"] <= rec["end"]
        assert rec["cpu_seconds"] >= 0.0
        proc.stdin.close()  # the child exits; until it is reaped it is a zombie, which has ended
        deadline = time.monotonic() + 60.0
        while link_check._proc_stat(proc.pid)[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        sampler.scan()
        end = rec["end"]
        sampler.scan()
        assert rec["end"] == end
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()
    sampler.scan()  # gone: the record stays
    (out,) = sampler.relative_to(rec["start"])
    assert out["start"] == 0.0 and out["ready"] >= 0.0


@pytest.mark.parametrize(("startup", "download", "wait"), [(6.0, 5.92, 0.0), (5.5, 5.92, 1.0), (4.0, 5.92, 3.0),
                                                          (2.0, 5.92, 7.0), (0.5, 20.0, 25.0)])
def test_retry_wait_follows_flowers_pull_backoff(startup: float, download: float, wait: float) -> None:
    # tries at S, S+1, S+3, S+7, S+15, then every 10 s (the cap): 0.5 + 25 = 25.5 is the first try >= 20
    assert link_check.retry_wait_seconds(startup, download) == pytest.approx(wait)
