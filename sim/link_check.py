"""Check the time-to-accuracy model on a real deployment behind rate-limited links.

    flock /tmp/conef-heavy.lock python -m sim.link_check --mbit 0,10,1 --methods efsgd,sgd --rounds 8 \
        --task-poll 0.2 --compute docs/results/experiments/time-to-accuracy/compute.json \
        --out docs/results/experiments/link-check/link_check_calibrated.json

For each method and bandwidth it starts a SuperLink and ``--supernodes`` SuperNodes on
loopback (:func:`sim.deploy.run_deployment`), each SuperNode behind its own
:mod:`sim.throttle` link (``--mbit`` both ways; 0 = unlimited), runs the MNIST
protocol's client work (``fraction-train`` 1, every client every round) and compares,
per round,

- **link level**: each message's transfer, from the proxy's chunk log: measured
  duration vs ``wire bytes / B``, and wire bytes vs the bytes the model uses
  (``rounds.json``);
- **client level**: first byte of the model sent to a SuperNode to last byte of its
  reply, vs the model's ``c_client + down/B + up/B`` (``c_client`` from
  ``sim.time_to_accuracy calibrate``);
- **round level**: the ServerApp's ``round_seconds`` vs the model.

**The calibrated model** (:func:`add_calibrated_model`). A Flower 1.41 deployment adds a
fixed cost to every round that the in-process model has no term for: each SuperNode's
SuperExec starts a new ``flwr-clientapp`` process per message (Python, torch and the
app imported, the partition loaded; ``--isolation process`` does not change that, the
external SuperExec starts one per message too), and Flower polls (SuperNode idle poll
3 s and ServerApp reply poll 3 s, both fixed in the code; SuperExec task poll 1 s, set
by ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, ``--task-poll``). That overhead is measured
once per method on the unthrottled link (the proxy still in the path), ``overhead =
measured − (c_client + c_server)``, and the model at bandwidth B is

    t_round(B) = overhead + c_client + c_server + up/B + down/B

It passes at a point when ``|measured − model| <= ROUND_TOLERANCE · model +
ROUND_SLACK_SECONDS`` for the mean over the analysed rounds (stated in the JSON's
``tolerance`` before any run). A point *discriminates* only when its transfer term
``up/B + down/B`` is larger than that tolerance: otherwise the model without the link
(``overhead + c``) would pass as well and the point cannot show the bandwidth term wrong.

**Alternating links** (``--alternate``, :func:`analyse_alternating`). The overhead drifts
with the machine's load between deployments minutes apart, so a separate unthrottled
calibration run can be off by more than the link's effect. With ``--alternate`` one
deployment per method and bandwidth switches every link between unlimited (rounds 1, 3,
5, ...) and throttled (2, 4, 6, ...; :class:`sim.throttle.Alternation`), and each
throttled round is compared with the mean of its two unlimited neighbours plus its
``up/B + down/B``: the calibration is measured a round before and after, and a load that
drifts linearly cancels. Same tolerance, on the mean over the paired rounds
(``--rounds 12``: rounds 4, 6, 8, 10)::

    flock /tmp/conef-heavy.lock python -m sim.link_check --alternate --mbit 1,10 --methods efsgd,sgd \
        --rounds 12 --task-poll 0.2 --compute docs/results/experiments/time-to-accuracy/compute.json \
        --out docs/results/experiments/link-check/link_check_alternating.json

The first round (start-up) and the last (evaluation) are left out. Whether each check
passed is reported, not asserted. The machine's load average is sampled during each
deployment (``load_average``).

**Revised model** (added 2026-12-02 before the 20-round confirmatory run; reported beside the
pre-registered one, which is unchanged, with the same tolerance). Flower 1.41's SuperNode creates
the ClientApp task before it pulls the message, so the new ``flwr-clientapp`` process starts
while the message downloads and only asks for it after its start-up ``S``; a download hides
behind that. :class:`ClientAppSampler` watches the deployment's ``flwr-clientapp`` processes in
``/proc`` (start, first socket = first request to the SuperNode, CPU seconds), ``S`` is measured
on the unlimited neighbours of each throttled round, and the revised model is
``mean(neighbours) + up/B + max(0, down/B − S)`` (:func:`analyse_alternating`). Each deployment
gets its own on-disk partition cache (:mod:`clients.partition_cache`): round 1's ClientApps fill
it, so ``clientapp_cpu_seconds`` compares a ClientApp message with and without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clients.partition_cache import ENV_VAR as PARTITION_CACHE_ENV
from sim.time_to_accuracy import round_bytes

log = logging.getLogger("sim.link_check")

#: A new transfer starts after this many seconds without a chunk in that direction.
GAP_SECONDS = 1.0
#: Transfers smaller than this (polls, heartbeats, small replies) are not messages of a round.
MIN_TRANSFER_BYTES = 20_000
#: Link level: measured rate within this fraction of the configured rate.
RATE_TOLERANCE = 0.05
#: Client level: |measured − model| within this fraction of the model plus ``CLIENT_SLACK_SECONDS``
#: (the SuperNode hands the message to its ClientApp process and back through its own API).
CLIENT_TOLERANCE = 0.10
CLIENT_SLACK_SECONDS = 1.5
#: Calibrated model, round and client level: |measured − model| within this fraction of the model plus
#: ``ROUND_SLACK_SECONDS`` (fixed before the runs of 2026-12-02, 06:00 UTC).
ROUND_TOLERANCE = 0.10
ROUND_SLACK_SECONDS = 1.0
#: An uplink transfer is a round's reply when it carries at least this fraction of the model's uplink bytes
#: (the SuperNode's requests while it downloads a message are ~20 KB and must not count as the reply).
REPLY_MIN_FRACTION = 0.5
#: Analysed rounds per point (first and last dropped) the calibrated check needs.
MIN_ANALYSED_ROUNDS = 4
#: Seconds between load-average samples during a deployment.
LOAD_SAMPLE_SECONDS = 10.0
#: Seconds between scans of /proc for the deployment's ``flwr-clientapp`` processes (:class:`ClientAppSampler`).
CLIENTAPP_SAMPLE_SECONDS = 0.1
#: A ClientApp process belongs to the round whose first download started at most this long after it.
CLIENTAPP_ROUND_LEAD_SECONDS = 1.0


def transfers(events: Sequence[Sequence[Any]], direction: str) -> list[dict[str, float]]:
    """Group a link's chunk log into transfers: runs of ``direction`` chunks with gaps < ``GAP_SECONDS``."""
    out: list[dict[str, float]] = []
    cur: dict[str, float] | None = None
    for t, d, n in events:
        if d != direction:
            continue
        if cur is None or t - cur["end"] >= GAP_SECONDS:
            if cur is not None:
                out.append(cur)
            cur = {"start": t, "end": t, "bytes": n, "first_chunk": n}
        else:
            cur["end"] = t
            cur["bytes"] += n
    if cur is not None:
        out.append(cur)
    return [x for x in out if x["bytes"] >= MIN_TRANSFER_BYTES]


def pair_transfers(events: Sequence[Sequence[Any]], reply_min_bytes: float = 0.0) -> list[dict[str, Any]]:
    """One ``{"down": transfer, "up": reply or None}`` per downlink transfer of a link's chunk log.

    The reply is the first uplink transfer that starts after the download ended (requests sent while
    downloading belong to the download) and carries at least ``reply_min_bytes``.
    """
    return pair_from_transfers(transfers(events, "down"), transfers(events, "up"), reply_min_bytes)


def pair_from_transfers(downs: Sequence[Mapping[str, float]], ups: Sequence[Mapping[str, float]],
                        reply_min_bytes: float = 0.0) -> list[dict[str, Any]]:
    """:func:`pair_transfers` on transfers already grouped (e.g. a JSON's ``link_transfers``)."""
    pairs = []
    for d in downs:
        u = next((x for x in ups if x["start"] >= d["end"] and x["bytes"] >= reply_min_bytes), None)
        pairs.append({"down": dict(d), "up": None if u is None else dict(u)})
    return pairs


def round_pairs(link: Mapping[str, Any], n_rounds: int, reply_min_bytes: float = 0.0) -> list[dict[str, Any]]:
    """One ``{"down", "up"}`` pair per round of a link, from its grouped ``transfers`` (``{"down": [...],
    "up": [...]}``, used when present) or its chunk log (``events``).

    A SuperNode downloads the app (FAB) before the first message's objects, a separate transfer when the
    two are a second or more apart; the rounds' messages are the last ``n_rounds`` downloads (the
    protocol evaluates centrally: no evaluate messages), so earlier ones are dropped.
    """
    if "transfers" in link:
        tr = link["transfers"]
        pairs = pair_from_transfers(tr.get("down", []), tr.get("up", []), reply_min_bytes)
    else:
        pairs = pair_transfers(link["events"], reply_min_bytes)
    return pairs[-n_rounds:] if len(pairs) > n_rounds else pairs


def spread(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (None for one value), min and max of ``values`` (all None when empty)."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def _model_check(paired: Sequence[dict[str, Any]], model_key: str, transfer_key: str,
                 startup_seconds: float) -> dict[str, Any]:
    """A (revised) model's check over paired rounds: means, error, tolerance, within, discriminating."""
    measured = statistics.fmean(p["measured"] for p in paired)
    model = statistics.fmean(p[model_key] for p in paired)
    transfer = statistics.fmean(p[transfer_key] for p in paired)
    tolerance = ROUND_TOLERANCE * model + ROUND_SLACK_SECONDS
    return {
        "n": len(paired), "measured_seconds": measured, "model_seconds": model,
        "transfer_seconds": transfer, "startup_seconds": startup_seconds,
        "error": measured / model - 1.0, "tolerance_seconds": tolerance,
        "within_tolerance": within(measured, model), "discriminates": transfer > tolerance,
        "difference_spread": spread([p["measured"] - p[model_key] for p in paired]),
    }


def within(measured: float, model: float) -> bool:
    """The calibrated check: ``|measured − model| <= ROUND_TOLERANCE · model + ROUND_SLACK_SECONDS``."""
    return abs(measured - model) <= ROUND_TOLERANCE * model + ROUND_SLACK_SECONDS


def add_calibrated_model(runs: list[dict[str, Any]]) -> None:
    """Add the calibrated model (overhead measured on the same method's unthrottled link) to each run, in place.

    Per level (``round``: the ServerApp's round time; ``client``: the proxy's client span) the
    unthrottled run gives ``overhead = measured − compute``; every run (the unthrottled one too, where
    the model equals the measurement by construction) gets ``model = overhead + compute + up/B + down/B``,
    the relative error, whether it is within :func:`within`'s tolerance, and whether the point
    discriminates: its transfer term alone is larger than the tolerance, so a model without the link
    could not pass at the same measurement (decided by the model, not the measurement).
    """
    levels = {"round": ("round_seconds_mean", "model_round_seconds_mean"),
              "client": ("client_span_seconds_mean", "model_client_seconds_mean")}
    for level, (measured_key, compute_key) in levels.items():
        base: dict[str, dict[str, Any]] = {}
        for r in runs:
            if r.get("mbit") == 0 and r.get(measured_key) is not None and r.get(compute_key) is not None:
                base[r["method"]] = r
        for r in runs:
            if r.get("alternate"):
                continue  # calibrated in the same deployment (analyse_alternating)
            b = base.get(r.get("method", ""))
            if b is None or r.get(measured_key) is None or r.get(compute_key) is None:
                continue
            # compute_key holds compute + transfer at this run's bandwidth (transfer 0 when unthrottled)
            overhead = b[measured_key] - b[compute_key]
            transfer = 0.0
            if r.get("mbit"):
                transfer = (r["model_uplink_bytes_mean"] + r["model_downlink_bytes_mean"]) / (r["mbit"] * 1e6 / 8.0)
            compute = r[compute_key] - transfer
            model = overhead + compute + transfer
            measured = r[measured_key]
            r[f"calibrated_{level}"] = {
                "overhead_seconds": overhead,
                "overhead_from": {"mbit": 0.0, "rounds": b.get(f"{measured_key[:-5]}_spread", {}).get("n")},
                "compute_seconds": compute,
                "transfer_seconds": transfer,
                "model_seconds": model,
                "measured_seconds": measured,
                "error": measured / model - 1.0,
                "tolerance_seconds": ROUND_TOLERANCE * model + ROUND_SLACK_SECONDS,
                "within_tolerance": within(measured, model),
                "model_without_transfer_seconds": overhead + compute,
                "discriminates": transfer > ROUND_TOLERANCE * model + ROUND_SLACK_SECONDS,
            }


def link_states(events: Sequence[Sequence[Any]]) -> list[tuple[float, int]]:
    """The ``--alternate`` switches of a link's chunk log: ``(time, 1 throttled | 0 unlimited)``, in order."""
    return [(float(t), int(n)) for t, d, n in events if d == "state"]


def state_at(states: Sequence[tuple[float, int]], t: float) -> int:
    """The link's state at time ``t`` (unlimited before the first switch)."""
    cur = 0
    for ts, st in states:
        if ts > t:
            break
        cur = st
    return cur


def round_states(rounds: Sequence[Mapping[str, Any]], links: Sequence[Mapping[str, Any]]) -> list[int | None]:
    """Per round: 1 if every link was throttled for the whole exchange (download start to reply end), 0 if
    unlimited throughout, None if the links disagree, a switch fell inside an exchange, or a transfer is
    missing."""
    reply_min = REPLY_MIN_FRACTION * min((round_bytes(r)[0] for r in rounds), default=0.0)
    per_link = [(round_pairs(link, len(rounds), reply_min), link_states(link.get("events", [])))
                for link in links]
    out: list[int | None] = []
    for i in range(len(rounds)):
        seen: set[int] = set()
        ok = bool(per_link)
        for pairs, states in per_link:
            if i >= len(pairs) or pairs[i]["up"] is None:
                ok = False
                break
            start, end = pairs[i]["down"]["start"], pairs[i]["up"]["end"]
            if any(start < ts <= end for ts, _ in states):
                ok = False
                break
            seen.add(state_at(states, start))
        out.append(seen.pop() if ok and len(seen) == 1 else None)
    return out


def clientapps_by_round(clientapps: Sequence[Mapping[str, Any]], rounds: Sequence[Mapping[str, Any]],
                        links: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """The ``flwr-clientapp`` processes (:class:`ClientAppSampler` records, seconds on the proxy's clock) of
    each round: round r's start at its earliest download on any link (less ``CLIENTAPP_ROUND_LEAD_SECONDS``)
    and last until the next round's; a process belongs to the round it started in."""
    reply_min = REPLY_MIN_FRACTION * min((round_bytes(r)[0] for r in rounds), default=0.0)
    per_link = [round_pairs(link, len(rounds), reply_min) for link in links]
    starts: list[float | None] = []
    for i in range(len(rounds)):
        downs = [pairs[i]["down"]["start"] for pairs in per_link if i < len(pairs)]
        starts.append(min(downs) - CLIENTAPP_ROUND_LEAD_SECONDS if downs else None)
    out: list[list[dict[str, Any]]] = [[] for _ in rounds]
    for proc in clientapps:
        t = proc.get("start")
        if t is None:
            continue
        for i, st in enumerate(starts):
            nxt = next((x for x in starts[i + 1:] if x is not None), float("inf"))
            if st is not None and st <= t < nxt:
                out[i].append(dict(proc))
                break
    return out


def startup_seconds(procs: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean time from a ClientApp process's start to its first socket (its first request to the SuperNode,
    where it asks for the message): the part of a round a download can hide behind. None when none was seen."""
    vals = [p["ready"] - p["start"] for p in procs if p.get("ready") is not None and p.get("start") is not None]
    return statistics.fmean(vals) if vals else None


def retry_wait_seconds(startup: float, download: float) -> float:
    """How long after its start-up a ClientApp waits for a message whose download ends ``download`` seconds after
    the ClientApp started, with Flower 1.41's object-pull retries: it asks at ``startup``, then after
    ``PULL_INITIAL_BACKOFF`` (1 s), doubling up to ``PULL_BACKOFF_CAP`` (10 s) (``pull_objects``; its ±20 %
    jitter is left out), and gets the message at the first try at or after the download's end."""
    from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_INITIAL_BACKOFF

    t, delay = startup, float(PULL_INITIAL_BACKOFF)
    while t < download:
        t += delay
        delay = min(2.0 * delay, float(PULL_BACKOFF_CAP))
    return t - startup


def analyse_alternating(rounds: Sequence[Mapping[str, Any]], links: Sequence[Mapping[str, Any]], mbit: float,
                        client_seconds: float | None, server_seconds: float | None,
                        clientapps: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One ``--alternate`` deployment: each throttled round against the mean of its two unlimited neighbours.

    Per level (``round``: the ServerApp's round time; ``client``: the proxy's client span), for every
    analysed throttled round whose previous and next rounds are analysed and unlimited,
    ``model = mean(neighbours) + up/B + down/B`` (the neighbours' mean is ``overhead + compute``
    measured a round before and after, so a load that drifts linearly cancels); the check is on the means
    over those rounds, with :func:`within`'s tolerance. The unpaired variant (mean of every analysed
    unlimited round + transfer) is reported too.

    **Revised model** (with ``clientapps``, the deployment's :class:`ClientAppSampler` records; labelled
    ``revised``, the pre-registered model above is unchanged). In Flower 1.41 the SuperNode creates the
    ClientApp task before it pulls the message, so the new ``flwr-clientapp`` process starts while the
    message downloads and asks for it only after its start-up ``S`` (Python and Flower's imports): the
    download adds only what is left of it then. Per paired round
    ``revised = mean(neighbours) + up/B + max(0, down/B − S)``, with ``S`` (:func:`startup_seconds`)
    measured on the ClientApp processes of the two *unlimited* neighbours (where no download can delay
    it); same tolerance, same rounds. ``S`` counts from the process's start, a SuperExec poll (``--task-poll``)
    after the task was created, so the hidden part is slightly underestimated.

    **Revised model 2** (``revised_retry``; added after the first 20-round runs showed the retries, before
    the runs that test it): the ClientApp gets the message at its first object-pull try at or after the
    download's end (:func:`retry_wait_seconds`), so per paired round ``revised_retry = mean(neighbours) +
    up/B + max over the round's ClientApps of retry_wait_seconds(S_i, down/B)``, with each ``S_i`` measured
    on that round's own ClientApp processes (the start-up comes before any request, so the link cannot
    change it). Same tolerance.
    """
    if not mbit > 0:
        raise ValueError(f"mbit={mbit} is out of range; allowed: > 0 with --alternate")
    a = analyse(rounds, links, mbit, client_seconds, server_seconds)
    states = round_states(rounds, links)
    procs = clientapps_by_round(clientapps, rounds, links) if clientapps is not None else None
    if procs is not None:
        a["clientapp_rounds"] = [
            {"round": row.get("round"), "processes": len(ps), "startup_seconds": startup_seconds(ps),
             "cpu_seconds": [p.get("cpu_seconds") for p in ps]} for row, ps in zip(rounds, procs, strict=True)]
        cpu = [[p["cpu_seconds"] for p in ps if p.get("cpu_seconds") is not None] for ps in procs]
        # round 1's ClientApps find the partition cache empty (run_one gives each deployment its own)
        a["clientapp_cpu_seconds"] = {"round_1": spread(cpu[0] if cpu else []),
                                      "later_rounds": spread([c for per in cpu[1:] for c in per])}
    bps = mbit * 1e6 / 8.0
    by_round = {row["round"]: row for row in a["rounds"]}
    idx = [row.get("round") for row in rounds]
    for i, st in enumerate(states):
        if idx[i] in by_round:
            by_round[idx[i]]["throttled"] = st
    analysed = {i for i in range(1, len(rounds) - 1) if idx[i] in by_round}
    a["alternate"] = True
    a["round_states"] = states
    rates = [by_round[idx[i]].get("measured_rate_bytes_per_s") for i in analysed if states[i] == 1]
    rates = [r for r in rates if r is not None]
    a["measured_rate_bytes_per_s_mean"] = statistics.fmean(rates) if rates else None
    if rates:
        a["rate_error"] = a["measured_rate_bytes_per_s_mean"] / bps - 1.0
        a["rate_within_tolerance"] = abs(a["rate_error"]) <= RATE_TOLERANCE
    for level, key in (("round", "round_seconds"), ("client", "client_span_seconds")):
        paired = []
        for i in sorted(analysed):
            if states[i] != 1 or i - 1 not in analysed or i + 1 not in analysed:
                continue
            if states[i - 1] != 0 or states[i + 1] != 0:
                continue
            row, prev, nxt = by_round[idx[i]], by_round[idx[i - 1]], by_round[idx[i + 1]]
            if any(r.get(key) is None for r in (row, prev, nxt)):
                continue
            transfer = (row["model_uplink_bytes"] + row["model_downlink_bytes"]) / bps
            base = (prev[key] + nxt[key]) / 2.0
            upload = row["model_uplink_bytes"] / bps
            pair = {"round": idx[i], "measured": row[key], "neighbours": base, "transfer": transfer,
                    "model": base + transfer, "difference": row[key] - base - transfer,
                    "upload": upload, "link_effect": row[key] - base}
            if all(r.get("after_download_seconds") is not None for r in (row, prev, nxt)):
                # diagnostic: how much shorter the client's work after the download was than its neighbours'
                pair["after_download_shortening"] = ((prev["after_download_seconds"] + nxt["after_download_seconds"])
                                                     / 2.0 - row["after_download_seconds"])
            if procs is not None:
                s_neigh = [x for x in (startup_seconds(procs[i - 1]), startup_seconds(procs[i + 1])) if x is not None]
                if len(s_neigh) == 2:
                    startup = statistics.fmean(s_neigh)
                    revised_transfer = upload + max(0.0, row["model_downlink_bytes"] / bps - startup)
                    pair.update({"startup": startup, "revised_transfer": revised_transfer,
                                 "revised_model": base + revised_transfer})
                own = [x["ready"] - x["start"] for x in procs[i]
                       if x.get("ready") is not None and x.get("start") is not None]
                if own:
                    wait = max(retry_wait_seconds(x, row["model_downlink_bytes"] / bps) for x in own)
                    pair.update({"own_startups": own, "retry_transfer": upload + wait,
                                 "retry_model": base + upload + wait})
            paired.append(pair)
        unl = [by_round[idx[i]][key] for i in analysed if states[i] == 0 and by_round[idx[i]].get(key) is not None]
        thr = [by_round[idx[i]] for i in analysed if states[i] == 1 and by_round[idx[i]].get(key) is not None]
        res: dict[str, Any] = {"paired_rounds": paired, "unlimited": spread(unl),
                               "throttled": spread([r[key] for r in thr])}
        if paired:
            measured = statistics.fmean(p["measured"] for p in paired)
            model = statistics.fmean(p["model"] for p in paired)
            transfer = statistics.fmean(p["transfer"] for p in paired)
            res.update({
                "n": len(paired), "measured_seconds": measured, "model_seconds": model,
                "transfer_seconds": transfer, "overhead_plus_compute_seconds": model - transfer,
                "error": measured / model - 1.0, "tolerance_seconds": ROUND_TOLERANCE * model + ROUND_SLACK_SECONDS,
                "within_tolerance": within(measured, model),
                "discriminates": transfer > ROUND_TOLERANCE * model + ROUND_SLACK_SECONDS,
                "difference_spread": spread([p["difference"] for p in paired]),
                # measured throttled − unlimited neighbours: what the link added to a round
                "link_effect_spread": spread([p["link_effect"] for p in paired]),
                # post hoc (not the pre-stated check): the download overlaps the ClientApp process start
                # (the SuperNode creates the task before it pulls the message), so only the upload adds
                "post_hoc_upload_only": {
                    "model_seconds": statistics.fmean(p["neighbours"] + p["upload"] for p in paired),
                    "upload_seconds": statistics.fmean(p["upload"] for p in paired),
                    "within_tolerance": within(measured, statistics.fmean(p["neighbours"] + p["upload"]
                                                                          for p in paired)),
                },
            })
        rev = [p for p in paired if "revised_model" in p]
        if rev:
            res["revised"] = _model_check(rev, "revised_model", "revised_transfer",
                                          statistics.fmean(p["startup"] for p in rev))
        ret = [p for p in paired if "retry_model" in p]
        if ret:
            res["revised_retry"] = _model_check(ret, "retry_model", "retry_transfer",
                                                statistics.fmean(statistics.fmean(p["own_startups"]) for p in ret))
        shortening = [p["after_download_shortening"] for p in paired if "after_download_shortening" in p]
        if shortening:
            res["after_download_shortening_spread"] = spread(shortening)
        if unl and thr:
            transfer_all = statistics.fmean((r["model_uplink_bytes"] + r["model_downlink_bytes"]) / bps for r in thr)
            model_all = statistics.fmean(unl) + transfer_all
            res["unpaired"] = {"measured_seconds": statistics.fmean(r[key] for r in thr), "model_seconds": model_all,
                               "within_tolerance": within(statistics.fmean(r[key] for r in thr), model_all)}
        a[f"calibrated_{level}"] = res
    return a


def measured_rate(tr: Mapping[str, float]) -> float | None:
    """Bytes per second of a transfer: the first chunk passes at once (the bucket starts full)."""
    span = tr["end"] - tr["start"]
    return (tr["bytes"] - tr["first_chunk"]) / span if span > 0 else None


def analyse(rounds: Sequence[Mapping[str, Any]], links: Sequence[Mapping[str, Any]], mbit: float,
            client_seconds: float | None, server_seconds: float | None) -> dict[str, Any]:
    """Compare one deployment's measured rounds and link transfers with the model."""
    bps = mbit * 1e6 / 8.0 if mbit else None
    # transfers per link; round r (1-based) = the r-th of the last len(rounds) downlink transfers (the FAB
    # download before the first message is dropped) and the first reply-sized uplink after it
    reply_min = REPLY_MIN_FRACTION * min((round_bytes(r)[0] for r in rounds), default=0.0)
    n_rounds = len(rounds)
    per_link = [round_pairs(link, n_rounds, reply_min) for link in links]
    rows = []
    for i, row in enumerate(rounds):
        if i == 0 or i == n_rounds - 1:
            continue  # start-up round; the evaluated last round
        up_model, down_model = round_bytes(row)
        entry: dict[str, Any] = {"round": row["round"], "round_seconds": row.get("round_seconds"),
                                 "model_uplink_bytes": up_model, "model_downlink_bytes": down_model}
        spans, rates, wire, after = [], [], [], []
        for pairs in per_link:
            if i >= len(pairs) or pairs[i]["up"] is None:
                continue
            d, u = pairs[i]["down"], pairs[i]["up"]
            spans.append(u["end"] - d["start"])
            after.append(u["start"] - d["end"])
            wire.append((u["bytes"], d["bytes"]))
            rates += [r for r in (measured_rate(d), measured_rate(u)) if r is not None]
        if spans:
            entry["client_span_seconds"] = statistics.fmean(spans)
            # end of the download to the first byte of the reply: the client's work that the download did not hide
            entry["after_download_seconds"] = statistics.fmean(after)
            entry["wire_uplink_bytes"] = statistics.fmean(w[0] for w in wire)
            entry["wire_downlink_bytes"] = statistics.fmean(w[1] for w in wire)
        if rates:
            entry["measured_rate_bytes_per_s"] = statistics.fmean(rates)
        if client_seconds is not None:
            transfer = (up_model + down_model) / bps if bps else 0.0
            entry["model_client_seconds"] = client_seconds + transfer
            entry["model_round_seconds"] = client_seconds + (server_seconds or 0.0) + transfer
        rows.append(entry)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    out: dict[str, Any] = {"mbit": mbit, "rounds": rows}
    for key in ("round_seconds", "client_span_seconds"):
        out[f"{key}_spread"] = spread([r[key] for r in rows if r.get(key) is not None])
    for key in ("round_seconds", "client_span_seconds", "model_client_seconds", "model_round_seconds",
                "measured_rate_bytes_per_s", "wire_uplink_bytes", "wire_downlink_bytes", "model_uplink_bytes",
                "model_downlink_bytes"):
        out[f"{key}_mean"] = mean(key)
    if bps and out["measured_rate_bytes_per_s_mean"]:
        err = out["measured_rate_bytes_per_s_mean"] / bps - 1.0
        out["rate_error"] = err
        out["rate_within_tolerance"] = abs(err) <= RATE_TOLERANCE
    if out["client_span_seconds_mean"] is not None and out["model_client_seconds_mean"] is not None:
        gap = out["client_span_seconds_mean"] - out["model_client_seconds_mean"]
        out["client_gap_seconds"] = gap
        out["client_within_tolerance"] = abs(gap) <= CLIENT_TOLERANCE * out["model_client_seconds_mean"] \
            + CLIENT_SLACK_SECONDS
    if out["round_seconds_mean"] is not None and out["model_round_seconds_mean"] is not None:
        out["round_gap_seconds"] = out["round_seconds_mean"] - out["model_round_seconds_mean"]
    if out["wire_downlink_bytes_mean"] and out["model_downlink_bytes_mean"]:
        out["wire_over_model_bytes"] = ((out["wire_uplink_bytes_mean"] + out["wire_downlink_bytes_mean"])
                                        / (out["model_uplink_bytes_mean"] + out["model_downlink_bytes_mean"]))
    return out


def add_unthrottled_model(runs: list[dict[str, Any]]) -> None:
    """Second model, with the compute measured in the deployment itself: the client span of the same method's
    unthrottled run (ClientApp process start, data loading, training, Flower's hand-offs) plus bytes / B."""
    base = {r["method"]: r for r in runs if r.get("mbit") == 0 and r.get("client_span_seconds_mean") is not None}
    for r in runs:
        b = base.get(r.get("method", ""))
        if b is None or not r.get("mbit") or r.get("client_span_seconds_mean") is None:
            continue
        bps = r["mbit"] * 1e6 / 8.0
        model = b["client_span_seconds_mean"] + (r["model_uplink_bytes_mean"] + r["model_downlink_bytes_mean"]) / bps
        r["model_client_seconds_from_unthrottled"] = model
        r["client_error_vs_unthrottled_model"] = r["client_span_seconds_mean"] / model - 1.0
        r["client_within_tolerance_vs_unthrottled_model"] = (
            abs(r["client_span_seconds_mean"] - model) <= CLIENT_TOLERANCE * model + CLIENT_SLACK_SECONDS)


class LoadSampler:
    """Samples ``os.getloadavg()`` every ``every`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, every: float = LOAD_SAMPLE_SECONDS) -> None:
        self.every = every
        self.samples: list[list[float]] = []
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        self._t0 = time.monotonic()
        while True:
            self.samples.append([round(time.monotonic() - self._t0, 1), *os.getloadavg()])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (one last sample is taken)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.samples.append([self.samples[-1][0] if self.samples else 0.0, *os.getloadavg()])

    def summary(self) -> dict[str, Any]:
        """The samples ([seconds, 1-min, 5-min, 15-min]) and the range of the 1-minute load average."""
        one = [x[1] for x in self.samples]
        return {"samples": self.samples, "one_minute_min": min(one, default=None),
                "one_minute_max": max(one, default=None),
                "one_minute_mean": statistics.fmean(one) if one else None}


def _proc_stat(pid: int) -> tuple[str, int, float, float] | None:
    """``(state, ppid, start seconds since boot, CPU seconds)`` of a process from ``/proc/<pid>/stat``; None if
    gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    tck = os.sysconf("SC_CLK_TCK")
    return fields[0], int(fields[1]), int(fields[19]) / tck, (int(fields[11]) + int(fields[12])) / tck


class ClientAppSampler:
    """Watches the ``flwr-clientapp`` processes started under this process (one per message in Flower 1.41).

    Every ``every`` seconds it scans ``/proc`` for descendants of this process whose command is
    ``flwr-clientapp`` and records, in ``time.monotonic()`` seconds: ``start`` (the kernel's start time),
    ``ready`` (the first scan that finds a socket among its open files: its first request to the SuperNode,
    made after Python and Flower's imports, when it asks for the message), ``end`` (the last scan that saw
    it running) and ``cpu_seconds`` (user + system, as last seen; final once it has exited). Resolution:
    ``every``. Linux only (without ``/proc`` it records nothing).
    """

    def __init__(self, every: float = CLIENTAPP_SAMPLE_SECONDS) -> None:
        self.every = every
        self.root = os.getpid()
        self.records: dict[int, dict[str, Any]] = {}
        self._others: set[int] = set()
        self._finished: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clientapp-sampler", daemon=True)

    def _descendant(self, pid: int) -> bool:
        for _ in range(16):
            st = _proc_stat(pid)
            if st is None or st[1] <= 1:
                return False
            if st[1] == self.root:
                return True
            pid = st[1]
        return False

    def _is_clientapp(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return any(os.path.basename(a) == b"flwr-clientapp" for a in argv[:2])

    def _has_socket(self, pid: int) -> bool:
        try:
            with os.scandir(f"/proc/{pid}/fd") as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if os.readlink(e.path).startswith("socket:"):
                            return True
        except OSError:
            pass
        return False

    def scan(self) -> None:
        """One scan of ``/proc`` (the thread calls it every ``every`` seconds)."""
        now = time.monotonic()
        boot_minus_mono = time.clock_gettime(time.CLOCK_BOOTTIME) - now
        try:
            pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            return
        for pid in pids:
            if pid in self._others:
                continue
            rec = self.records.get(pid)
            if rec is None:
                if not self._descendant(pid):
                    self._others.add(pid)
                    continue
                if not self._is_clientapp(pid):
                    continue  # maybe forked and not yet exec'd: looked at again next scan
                st = _proc_stat(pid)
                if st is None:
                    continue
                rec = self.records[pid] = {"pid": pid, "start": st[2] - boot_minus_mono, "ready": None,
                                           "end": now, "cpu_seconds": st[3]}
            if pid in self._finished:
                continue
            st = _proc_stat(pid)
            if st is None:
                self._finished.add(pid)
                continue
            rec["cpu_seconds"] = st[3]  # a zombie (exited, not yet reaped by the SuperExec) keeps its final times
            if st[0] in ("Z", "X"):
                self._finished.add(pid)
                continue
            rec["end"] = now
            if rec["ready"] is None and self._has_socket(pid):
                rec["ready"] = now

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.scan()

    def __enter__(self) -> ClientAppSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def relative_to(self, t0: float) -> list[dict[str, Any]]:
        """The records, in start order, with times in seconds since ``t0`` (e.g. the proxy's start)."""
        out = []
        for rec in sorted(self.records.values(), key=lambda r: r["start"]):
            out.append({**rec, **{k: None if rec[k] is None else round(rec[k] - t0, 3)
                                  for k in ("start", "ready", "end")}})
        return out


def run_one(method: str, mbit: float, *, supernodes: int, rounds: int, extra: Mapping[str, Any],
            task_poll: float | None = None, alternate: bool = False) -> dict[str, Any]:
    """One throttled deployment; returns its rounds, the proxy's per-link log and the load average meanwhile.

    ``task_poll`` (seconds) sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for the SuperNodes' SuperExecs;
    ``alternate``: the links switch between unlimited and ``mbit`` at every exchange.
    """
    from sim import experiments as ex
    from sim.deploy import run_deployment

    spec = ex.TASKS["mnist"]
    env = {} if task_poll is None else {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{task_poll:g}"}
    with tempfile.TemporaryDirectory(prefix="conef-linkcheck-") as tmp, LoadSampler() as load, \
            ClientAppSampler() as apps:
        # a partition cache of its own: round 1's ClientApps compute the partitions, later ones read them
        env[PARTITION_CACHE_ENV] = str(Path(tmp) / "partition-cache")
        cfg = ex.run_config(spec, ex.METHODS[method], 0, rounds, Path(tmp), f"{method}-{mbit:g}mbit",
                            {"fraction-train": 1.0, "eval-every": rounds, **extra})
        cfg.pop("num-partitions", None)
        events = Path(tmp) / "throttle.json"
        res = run_deployment(cfg, num_supernodes=supernodes, throttle_mbit=mbit, throttle_events=events,
                             timeout=60.0 + rounds * 90.0, log_file=Path(tmp) / "flwr.log", extra_env=env,
                             throttle_alternate=alternate)
        stats = json.loads(events.read_text()) if events.exists() else {}
    links = stats.get("links", [])
    clientapps = apps.relative_to(stats["t0_monotonic"]) if "t0_monotonic" in stats else []
    return {"rounds": res.rounds, "links": links, "seconds": res.seconds, "stopped_pids": res.stopped_pids,
            "load_average": load.summary(), "clientapps": clientapps}


def reanalyse(results: dict[str, Any]) -> dict[str, Any]:
    """Analyse a JSON's runs again from what it stored (the analysed rows, ``link_transfers``, ``compute``):
    for a JSON written before :func:`round_pairs` dropped the FAB download. Rounds 1 and N (not stored)
    get the bytes of their neighbours and no time; only their transfers matter, to align the pairs."""
    compute: dict[str, Any] = {}
    if results.get("compute") and Path(results["compute"]).exists():
        compute = json.loads(Path(results["compute"]).read_text())["methods"]
    n = int(results.get("rounds") or 0)
    for i, run in enumerate(results.get("runs", [])):
        rows = run.get("rounds", [])
        if run.get("error") or not rows or "link_transfers" not in run or n < 3:
            continue

        def raw(row: Mapping[str, Any], r: int, seconds: float | None) -> dict[str, Any]:
            return {"round": r, "round_seconds": seconds, "sampled": 1, "accepted": 1,
                    "uplink_record_bytes_total": row["model_uplink_bytes"],
                    "downlink_bytes_total": row["model_downlink_bytes"]}

        raw_rounds = [raw(rows[0], 1, None), *(raw(x, x["round"], x.get("round_seconds")) for x in rows),
                      raw(rows[-1], n, None)]
        states = run.get("link_states") or [[] for _ in run["link_transfers"]]
        links = [{"transfers": lt, "events": [[t, "state", st] for t, st in sts]}
                 for lt, sts in zip(run["link_transfers"], states, strict=True)]
        c = compute.get(run["method"], {})
        if run.get("alternate"):
            a = analyse_alternating(raw_rounds, links, run["mbit"], c.get("client_seconds"), c.get("server_seconds"),
                                    clientapps=run.get("clientapps"))
        else:
            a = analyse(raw_rounds, links, run["mbit"], c.get("client_seconds"), c.get("server_seconds"))
        keep = {k: run[k] for k in ("method", "deployment_seconds", "load_average", "link_bytes", "link_transfers",
                                     "link_states", "clientapps") if k in run}
        results["runs"][i] = {**a, **keep, "reanalysed": True}
    if not results.get("alternate"):
        add_unthrottled_model(results["runs"])
        add_calibrated_model(results["runs"])
    return results


def recompute(results: dict[str, Any]) -> dict[str, Any]:
    """Fill the spreads and the calibrated model from the per-round rows (for a JSON written before they
    existed); the tolerance block is left as recorded, the calibrated tolerance added if missing."""
    if results.get("alternate"):
        return results
    for r in results.get("runs", []):
        rows = r.get("rounds", [])
        for key in ("round_seconds", "client_span_seconds"):
            r.setdefault(f"{key}_spread", spread([x[key] for x in rows if x.get(key) is not None]))
    results.setdefault("tolerance", {}).setdefault("round_fraction", ROUND_TOLERANCE)
    results["tolerance"].setdefault("round_slack_seconds", ROUND_SLACK_SECONDS)
    add_calibrated_model(results.get("runs", []))
    return results


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown_alternating(results: Mapping[str, Any]) -> str:
    """The ``--alternate`` check as a markdown table: per method and link, throttled rounds vs the model
    calibrated on their unlimited neighbours."""
    tol = results.get("tolerance", {})
    lines = [f"Alternating links: each throttled round vs the mean of its two unlimited neighbours + up/B + down/B; "
             f"tolerance ±{100 * tol.get('round_fraction', ROUND_TOLERANCE):.0f} % of the model "
             f"+ {tol.get('round_slack_seconds', ROUND_SLACK_SECONDS):g} s, on the mean over the paired rounds.", "",
             "| method | link | level | paired rounds | unlimited rounds: mean ± std (s) | throttled: measured (s) | "
             "model (s) | transfer (s) | error | within | discriminates | measured − model per round: mean ± std "
             "[min, max] (s) | link's effect: throttled − neighbours, mean ± std (s) | post hoc, upload only: "
             "up/B (s), model (s), within | rate / configured | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "**no**", None: "–"}
    for r in results.get("runs", []):
        if not r.get("alternate") and not r.get("error"):
            continue
        link = f"{r['mbit']:g} Mbit/s"
        if r.get("error"):
            lines.append(f"| {r['method']} | {link} | failed: {str(r['error'])[:80]} |" + " |" * 13)
            continue
        la = r.get("load_average", {})
        rate = r.get("rate_error")
        for level in ("round", "client"):
            c = r.get(f"calibrated_{level}", {})
            u, d = c.get("unlimited", {}), c.get("difference_spread", {})
            le, ph = c.get("link_effect_spread", {}), c.get("post_hoc_upload_only", {})
            lines.append(
                f"| {r['method']} | {link} | {level} | {c.get('n', 0)} | "
                f"{_fmt(u.get('mean'))} ± {_fmt(u.get('std'))} | "
                f"{_fmt(c.get('measured_seconds'))} | {_fmt(c.get('model_seconds'))} | "
                f"{_fmt(c.get('transfer_seconds'))} | "
                f"{_fmt(100 * c['error'] if 'error' in c else None, '+.1f')} % | {yes[c.get('within_tolerance')]} | "
                f"{'yes' if c.get('discriminates') else 'no'} | {_fmt(d.get('mean'), '+.2f')} ± {_fmt(d.get('std'))} "
                f"[{_fmt(d.get('min'), '+.1f')}, {_fmt(d.get('max'), '+.1f')}] | "
                f"{_fmt(le.get('mean'), '+.2f')} ± {_fmt(le.get('std'))} | "
                f"{_fmt(ph.get('upload_seconds'))}, {_fmt(ph.get('model_seconds'))}, "
                f"{yes[ph.get('within_tolerance')]} | "
                f"{_fmt(None if rate is None else 1.0 + rate, '.3f')} | "
                f"{_fmt(la.get('one_minute_min'), '.1f')}–{_fmt(la.get('one_minute_max'), '.1f')} |")
    revised = [r for r in results.get("runs", []) if r.get("alternate")
               and any("revised" in r.get(f"calibrated_{level}", {}) for level in ("round", "client"))]
    if revised:
        lines += ["", "Revised model (labelled, not the pre-registered one): each throttled round vs the mean of its "
                  "two unlimited neighbours + up/B + max(0, down/B − S), S = the ClientApp processes' start-up "
                  "(process start to first request) measured in the unlimited neighbours; same tolerance.", "",
                  "| method | link | level | paired rounds | start-up S (s) | down/B (s) "
                  "| up/B + max(0, down/B − S) (s) | measured (s) | revised model (s) | error | within | discriminates "
                  "| measured − revised per round: "
                  "mean ± std [min, max] (s) | diagnostic: reply-side work shortened by (s) | ClientApp CPU-s: "
                  "round 1 (cache empty) / later rounds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in revised:
            cpu = r.get("clientapp_cpu_seconds", {})
            c1, cl = cpu.get("round_1", {}), cpu.get("later_rounds", {})
            bps = r["mbit"] * 1e6 / 8.0
            down = r.get("model_downlink_bytes_mean")
            for level in ("round", "client"):
                c = r.get(f"calibrated_{level}", {})
                v = c.get("revised")
                if not v:
                    continue
                d, sh = v.get("difference_spread", {}), c.get("after_download_shortening_spread", {})
                lines.append(
                    f"| {r['method']} | {r['mbit']:g} Mbit/s | {level} | {v['n']} | {_fmt(v['startup_seconds'])} | "
                    f"{_fmt(None if down is None else down / bps)} | {_fmt(v['transfer_seconds'])} | "
                    f"{_fmt(v['measured_seconds'])} | {_fmt(v['model_seconds'])} | {100 * v['error']:+.1f} % | "
                    f"{yes[v['within_tolerance']]} | {'yes' if v['discriminates'] else 'no'} | "
                    f"{_fmt(d.get('mean'), '+.2f')} ± {_fmt(d.get('std'))} [{_fmt(d.get('min'), '+.1f')}, "
                    f"{_fmt(d.get('max'), '+.1f')}] | {_fmt(sh.get('mean'), '+.2f')} ± {_fmt(sh.get('std'))} | "
                    f"{_fmt(c1.get('mean'))} (n={c1.get('n', 0)}) / {_fmt(cl.get('mean'))} ± {_fmt(cl.get('std'))} "
                    f"(n={cl.get('n', 0)}) |")
    retried = [r for r in revised if any("revised_retry" in r.get(f"calibrated_{level}", {})
                                         for level in ("round", "client"))]
    if retried:
        lines += ["", "Revised model 2 (labelled, not the pre-registered one): each throttled round vs the mean of its "
                  "two unlimited neighbours + up/B + the ClientApp's wait for the message with Flower's object-pull "
                  "retries (1, 2, 4, ... s after its start-up S, measured on that round's ClientApps; the slowest "
                  "one); same tolerance.", "",
                  "| method | link | level | paired rounds | start-up S (s) | up/B + retry wait (s) | measured (s) | "
                  "revised model 2 (s) | error | within | discriminates | measured − model 2 per round: mean ± std "
                  "[min, max] (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in retried:
            for level in ("round", "client"):
                v = r.get(f"calibrated_{level}", {}).get("revised_retry")
                if not v:
                    continue
                d = v.get("difference_spread", {})
                lines.append(
                    f"| {r['method']} | {r['mbit']:g} Mbit/s | {level} | {v['n']} | {_fmt(v['startup_seconds'])} | "
                    f"{_fmt(v['transfer_seconds'])} | {_fmt(v['measured_seconds'])} | {_fmt(v['model_seconds'])} | "
                    f"{100 * v['error']:+.1f} % | {yes[v['within_tolerance']]} | "
                    f"{'yes' if v['discriminates'] else 'no'} | {_fmt(d.get('mean'), '+.2f')} ± {_fmt(d.get('std'))} "
                    f"[{_fmt(d.get('min'), '+.1f')}, {_fmt(d.get('max'), '+.1f')}] |")
    return "\n".join(lines) + "\n"


def markdown(results: Mapping[str, Any]) -> str:
    """The calibrated check as a markdown table: per method and link, measured vs model, within tolerance."""
    tol = results.get("tolerance", {})
    lines = [f"Calibrated model: overhead (unthrottled, same method) + compute + up/B + down/B; tolerance "
             f"±{100 * tol.get('round_fraction', ROUND_TOLERANCE):.0f} % of the model "
             f"+ {tol.get('round_slack_seconds', ROUND_SLACK_SECONDS):g} s, on the mean of the analysed rounds.", "",
             "| method | link | rounds | round: measured mean ± std [min–max] (s) | model (s) | error | within | "
             "discriminates | client span: measured (s) | model (s) | within | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if results.get("alternate"):
        return markdown_alternating(results)
    for r in results.get("runs", []):
        link = "unlimited" if not r.get("mbit") else f"{r['mbit']:g} Mbit/s"
        if r.get("error"):
            lines.append(f"| {r['method']} | {link} | failed: {str(r['error'])[:80]} |" + " |" * 9)
            continue
        sp = r.get("round_seconds_spread", {})
        cr, cc = r.get("calibrated_round", {}), r.get("calibrated_client", {})
        la = r.get("load_average", {})
        yes = {True: "yes", False: "**no**", None: "–"}
        calib = not r.get("mbit")
        lines.append(
            f"| {r['method']} | {link} | {sp.get('n', 0)} | {_fmt(sp.get('mean'))} ± {_fmt(sp.get('std'))} "
            f"[{_fmt(sp.get('min'), '.1f')}–{_fmt(sp.get('max'), '.1f')}] | {_fmt(cr.get('model_seconds'))} | "
            + ("calibration |  |  | " if calib else
               f"{_fmt(100 * cr['error'] if 'error' in cr else None, '+.1f')} % | {yes[cr.get('within_tolerance')]} | "
               f"{'yes' if cr.get('discriminates') else 'no'} | ")
            + f"{_fmt(cc.get('measured_seconds'))} | {_fmt(cc.get('model_seconds'))} | "
            + ("calibration" if calib else yes[cc.get("within_tolerance")])
            + f" | {_fmt(la.get('one_minute_min'), '.1f')}–{_fmt(la.get('one_minute_max'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.link_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbit", default="0,10,1", help="link bandwidths, Mbit/s (0: unlimited; needed first for "
                                                     "the calibrated model)")
    ap.add_argument("--methods", default="efsgd,sgd", help="method ids of sim.experiments")
    ap.add_argument("--rounds", type=int, default=2 + MIN_ANALYSED_ROUNDS,
                    help="server rounds per deployment (first and last are not analysed)")
    ap.add_argument("--supernodes", type=int, default=2)
    ap.add_argument("--compute", type=Path, help="compute.json of sim.time_to_accuracy calibrate")
    ap.add_argument("--task-poll", type=float, default=None,
                    help="seconds between the SuperExecs' task polls (FLWR_SUPEREXEC_TASK_POLL_INTERVAL; "
                         "Flower's default 1)")
    ap.add_argument("--alternate", action="store_true",
                    help="one deployment per method and bandwidth whose links switch between unlimited and the "
                         "bandwidth every round; each throttled round is checked against its unlimited neighbours "
                         f"(needs --rounds >= {2 * MIN_ANALYSED_ROUNDS + 4} and bandwidths > 0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, help="JSON to write (after every deployment)")
    ap.add_argument("--report", type=Path, help="only print the markdown table of this JSON")
    ap.add_argument("--reanalyse", action="store_true",
                    help="with --report: analyse its runs again from the stored transfers and rewrite the JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Ctrl-C must stop the deployments even when started with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from sim.deploy import signals_raise
    from sim.experiments import METHODS, parse_set

    if args.report is not None:
        results = json.loads(args.report.read_text())
        if args.reanalyse:
            results = reanalyse(results)
            args.report.write_text(json.dumps(results, indent=2))
        sys.stdout.write(markdown(recompute(results)))
        return 0
    if args.out is None:
        ap.error("--out is required (or --report)")
    if args.rounds < 2 + MIN_ANALYSED_ROUNDS:
        ap.error(f"--rounds={args.rounds} is out of range; allowed: >= {2 + MIN_ANALYSED_ROUNDS} "
                 f"(start-up and evaluated rounds are dropped, {MIN_ANALYSED_ROUNDS} must remain)")
    if args.alternate and args.rounds < 2 * MIN_ANALYSED_ROUNDS + 4:
        ap.error(f"--rounds={args.rounds} is out of range with --alternate; allowed: >= {2 * MIN_ANALYSED_ROUNDS + 4} "
                 f"({MIN_ANALYSED_ROUNDS} throttled rounds with unlimited rounds on both sides)")
    if args.task_poll is not None and not 0.01 <= args.task_poll <= 60:
        ap.error(f"--task-poll={args.task_poll} is out of range; allowed: 0.01 to 60 (Flower's limits)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method id(s) {unknown}; valid: {', '.join(METHODS)}")
    try:
        bandwidths = [float(b) for b in args.mbit.split(",") if b]
        extra = parse_set(args.set)
    except ValueError as exc:
        ap.error(str(exc))
    if args.alternate and not all(b > 0 for b in bandwidths):
        ap.error(f"--mbit={args.mbit} is out of range with --alternate; allowed: bandwidths > 0 (every deployment "
                 "has its unlimited rounds)")
    compute = json.loads(args.compute.read_text())["methods"] if args.compute else {}
    results: dict[str, Any] = {
        "tolerance": {"rate_fraction": RATE_TOLERANCE, "client_fraction": CLIENT_TOLERANCE,
                      "client_slack_seconds": CLIENT_SLACK_SECONDS, "gap_seconds": GAP_SECONDS,
                      "min_transfer_bytes": MIN_TRANSFER_BYTES, "round_fraction": ROUND_TOLERANCE,
                      "round_slack_seconds": ROUND_SLACK_SECONDS, "reply_min_fraction": REPLY_MIN_FRACTION},
        "supernodes": args.supernodes, "rounds": args.rounds, "task_poll_seconds": args.task_poll,
        "alternate": args.alternate,
        "compute": str(args.compute) if args.compute else None, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        c = compute.get(method, {})
        for mbit in bandwidths:
            log.info("%s at %g Mbit/s", method, mbit)
            try:
                with signals_raise():  # SIGTERM / SIGHUP: the deployment's processes are stopped by PID
                    raw = run_one(method, mbit, supernodes=args.supernodes, rounds=args.rounds, extra=extra,
                                  task_poll=args.task_poll, alternate=args.alternate)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                log.error("%s at %g Mbit/s failed: %s", method, mbit, exc)
                results["runs"].append({"method": method, "mbit": mbit, "error": str(exc)[-2000:]})
                continue
            if args.alternate:
                a = analyse_alternating(raw["rounds"], raw["links"], mbit, c.get("client_seconds"),
                                        c.get("server_seconds"), clientapps=raw["clientapps"])
            else:
                a = analyse(raw["rounds"], raw["links"], mbit, c.get("client_seconds"), c.get("server_seconds"))
            a.update({"method": method, "deployment_seconds": raw["seconds"], "load_average": raw["load_average"],
                      "clientapps": raw["clientapps"],
                      "link_bytes": [{k: v for k, v in link.items() if k != "events"} for link in raw["links"]],
                      "link_transfers": [{d: transfers(link["events"], d) for d in ("down", "up")}
                                         for link in raw["links"]],
                      "link_states": [link_states(link["events"]) for link in raw["links"]]})
            results["runs"].append(a)
            log.info("%s %g Mbit/s: round %.2f s (model in process %s), client span %s s, rate error %s, load %s",
                     method, mbit, a["round_seconds_mean"] or float("nan"), a.get("model_round_seconds_mean"),
                     a.get("client_span_seconds_mean"), a.get("rate_error"),
                     raw["load_average"].get("one_minute_max"))
            if not args.alternate:
                add_unthrottled_model(results["runs"])
                add_calibrated_model(results["runs"])
            args.out.write_text(json.dumps(results, indent=2))
    log.info("calibrated check:\n%s", markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
