"""Edge footprint of a client: peak RSS of the ClientApp process and the error state a SuperNode keeps.

    python -m sim.footprint                                  # outputs/footprint.{json,md}
    python -m sim.footprint --save                           # docs/results/footprint.{json,md}
    python -m sim.footprint --widths 700 --methods efsgd conef-cs --compressors   # one size, app Q only

In a deployment each training message runs the ClientApp in a fresh process
(``flwr-clientapp``); the error state lives between rounds in the SuperNode's
``context.state`` as serialized bytes. So for each method and model size this
script starts one fresh Python process per round and, in it, does exactly what
``clients.client_app.train`` does:

1. the global model arrives as an ``ArrayRecord`` and is loaded into the model;
2. ``x_global`` is cloned, the model is trained locally (SGD, one thread);
3. ``u = x_global − x_local`` in place, the worker is restored from the previous
   round's serialized state (round 2) or created (round 1), ``worker.step(u,
   seed, consume=True)``, the new state is serialized and the payload encoded
   into reply records.

At the end the process reads ``VmHWM`` (peak RSS) from ``/proc/self/status``.
Round 2 (state restored from bytes, as on a SuperNode) is the steady state and
is what the table reports. The model is an MLP on 28×28 inputs with two hidden
layers of width ``w`` (``conef_fl.tasks`` has no model of 1M–10M parameters),
the data are synthetic (fixed seed) MNIST-shaped samples. Method settings are
the app defaults of ``pyproject.toml`` (``k-ratio``, ``sketch-ratio`` ...).
``sgd`` (no error feedback, dense reply) is the reference for what training
alone costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sim.flower_runtime import REPO

log = logging.getLogger("sim.footprint")

MIB = 1024 * 1024
#: Gradient compressors Q of the per-Q comparison -> ``method_config`` overrides (as in ``sim.bench_core``).
COMPRESSORS: dict[str, dict[str, Any]] = {
    "random-block-k": {"k_ratio": 0.1},
    "random-k": {"k_ratio": 0.01},
    "top-k": {"k_ratio": 0.01},
    "scaled-sign": {},
}
#: Issue #13 target 6: ConEF's peak RSS <= EFSGD's peak - this fraction of 4d, for every Q.
PEAK_MARGIN_OF_4D = 0.8
DEFAULT_WIDTHS = (700, 2000, 2700)  # 1.05M, 5.59M, 9.44M parameters
DEFAULT_METHODS = ("sgd", "efsgd", "conef-cs")
#: The committed report (written only with ``--save``).
SAVED = REPO / "docs" / "results" / "footprint.json"


def _q_overrides(compressor: str) -> dict[str, Any]:
    try:
        return {"compressor": compressor, **COMPRESSORS[compressor]}
    except KeyError:
        raise ValueError(f"compressor={compressor!r} is not valid; allowed: {', '.join(COMPRESSORS)}") from None


def _label(method: str, compressor: str | None) -> str:
    """Row label: the method, with its Q when Q is set explicitly (``efsgd/top-k``)."""
    return f"{method}/{compressor}" if compressor else method


def mlp_params(width: int, in_features: int = 784, num_classes: int = 10) -> int:
    """Parameters of ``784 → w → w → 10`` with biases."""
    return in_features * width + width + width * width + width + width * num_classes + num_classes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


# --------------------------------------------------------------------------------------- one round, in a child
def child_round(method_name: str, width: int, samples: int, batch_size: int, epochs: int, lr: float,
                server_round: int, state_in: Path | None, state_out: Path,
                compressor: str | None = None) -> dict[str, Any]:
    """One whole client step in this (fresh) process, through the real ``conef_mod``; returns measurements.

    A train message built by the :class:`~conef_fl.flower.ConEF` wrapper goes through
    ``conef_mod`` around a train function (an MLP on synthetic MNIST-shaped data), so
    local training, the update, the error-feedback step, the state in ``context.state``
    and the encoded reply are exactly what a ClientApp does.
    """
    import io
    from unittest.mock import Mock

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from conef_fl.flower import ConEF, conef_mod
    from conef_fl.flower import protocol as P
    from conef_fl.flower.client_state import STATE_KEY
    from conef_fl.tasks import count_parameters, train_local
    from conef_fl.tasks.models import MLP

    torch.set_num_threads(1)  # as the ClientApp
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(server_round)
        incoming = ArrayRecord(MLP(784, (width, width), 10).state_dict())  # the global model in the message
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [1]
    from conef_fl.registry import method_config

    method = method_config(method_name, **_q_overrides(compressor)) if compressor else method_name
    strategy = ConEF(FedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1), method)
    (msg,) = strategy.configure_train(server_round, incoming, ConfigRecord(), grid)
    TaskIdentity.node_id = 1
    rss_ready = _status_kib("VmRSS")  # interpreter + torch + flwr + data, before the round's work

    phases: dict[str, int] = {}  # VmHWM after each step of the round: where the peak is reached

    def mark(name: str) -> None:
        phases[name] = _status_kib("VmHWM") * 1024

    result: dict[str, Any] = {}

    def train(m: Message, ctxt: Context) -> Message:
        model = MLP(784, (width, width), 10)
        model.load_state_dict(m.content["arrays"].to_torch_state_dict(), strict=True)
        result["num_params"] = count_parameters(model)
        mark("model_loaded")
        out = train_local(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=gen)
        result["train_loss"] = float(out["loss"])
        mark("trained")
        metrics = MetricRecord({"num-examples": int(out["num_examples"])})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=m)

    # the SuperNode hands the ClientApp its context.state: the previous round's serialized error state
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={"run-name": "footprint"})
    blob_in = 0
    if state_in is not None:
        record = torch.load(io.BytesIO(state_in.read_bytes()), weights_only=True)
        blob_in = len(record["blob"])
        context.state[STATE_KEY] = ConfigRecord(record)
        del record
    reply = conef_mod(msg, context, train)
    mark("reply_encoded")
    if reply.has_error():
        raise RuntimeError(f"conef_mod refused the round: {reply.error.reason}")
    stored = dict(context.state[STATE_KEY])
    buf = io.BytesIO()
    torch.save(stored, buf)
    state_out.write_bytes(buf.getvalue())
    metrics = reply.content["metrics"]
    d = result["num_params"]
    return {
        "method": method_name,
        "compressor": compressor,
        "width": width,
        "num_params": d,
        "round": server_round,
        "train_loss": result["train_loss"],
        "error_state_bytes": int(metrics[P.M_ERROR_STATE_BYTES]),
        "serialized_state_bytes": len(stored["blob"]),
        "restored_state_bytes": blob_in,
        "state_source": int(metrics[P.M_STATE_SOURCE]),
        "payload_bytes": int(metrics[P.M_UPLINK_BYTES]),
        "reply_array_bytes": int(sum(len(a.data) for a in reply.content[P.PAYLOAD_RECORD].values())),
        "dense_model_bytes": 4 * d,
        "rss_ready_bytes": rss_ready * 1024,
        "rss_end_bytes": _status_kib("VmRSS") * 1024,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "peak_rss_after_phase_bytes": phases,
    }


# --------------------------------------------------------------------------------------- a live deployment
_ROLES = (("flwr-clientapp", "clientapp"), ("flower-superexec", "superexec"), ("flower-supernode", "supernode"))


def _proc_mem(pid: int) -> tuple[str, int, int] | None:
    """(role, VmRSS, VmHWM) in bytes of a Flower process, None if gone or not a Flower process."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    role = next((r for key, r in _ROLES if key in cmd), None)
    if role is None:
        return None
    vals = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in status.splitlines()
            if ln.startswith(("VmRSS:", "VmHWM:"))}
    return role, vals.get("VmRSS", 0), vals.get("VmHWM", 0)


#: Local-training settings per dataset for the live deployment (the app defaults are tuned for digits; with
#: mnist, lr 0.2 and batch 8 can make a client's update non-finite, which the strategy then counts as failed).
DEPLOY_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"local-epochs": 1},
    "mnist": {"local-epochs": 0, "local-steps": 100, "batch-size": 32, "local-lr": 0.05},
}


def deployment_footprint(method: str, *, dataset: str, rounds: int, interval: float = 0.05,
                         timeout: float = 600) -> dict[str, Any]:
    """Run a 2-SuperNode loopback deployment and sample SuperNode 0's process tree.

    Every ``interval`` seconds the ``VmHWM`` of each process under SuperNode 0
    (the SuperNode, its SuperExec, each short-lived ``flwr-clientapp``) is read;
    the last sample of a process before it exits approximates its peak (a
    ClientApp living < ``interval`` can be missed). The sum of ``VmRSS`` over the
    tree is what the device holds at one time.
    """
    import threading

    from sim.deploy import run_config_for
    from sim.flower_runtime import FlowerProcesses, descendants

    peaks: dict[int, tuple[str, int]] = {}
    tree_peak = 0
    stop = threading.Event()
    fp = FlowerProcesses()
    try:
        conn = fp.start_superlink()
        nodes = [fp.start_supernode(f"supernode-{i}", node_config={"partition-id": i, "num-partitions": 2})
                 for i in range(2)]

        def sample() -> None:
            nonlocal tree_peak
            while not stop.is_set():
                total = 0
                for pid in [nodes[0].pid, *descendants(nodes[0].pid)]:
                    m = _proc_mem(pid)
                    if m is None:
                        continue
                    role, rss, hwm = m
                    total += rss
                    peaks[pid] = (role, max(hwm, peaks.get(pid, (role, 0))[1]))
                tree_peak = max(tree_peak, total)
                stop.wait(interval)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        with tempfile.TemporaryDirectory(prefix="conef-footprint-out-") as out:
            settings = {"method": method, "dataset": dataset, "num-server-rounds": rounds, "fraction-train": 1.0,
                        **DEPLOY_SETTINGS.get(dataset, {"local-epochs": 1})}
            cfg, run_dir = run_config_for({**settings, "output-dir": out, "run-name": "footprint"}, 2)
            assert fp.superlink_proc is not None
            code = fp.run_app(conn, cfg, timeout=timeout, stream_to=fp.home / "flwr-run.log",
                              watch=[fp.superlink_proc, *nodes])
            stop.set()
            th.join()
            summary_path = run_dir / "summary.json"
            if code != 0 or not summary_path.exists():
                raise RuntimeError(f"deployment run failed (flwr run exit {code}); logs:\n{fp.tail()}")
            summary = json.loads(summary_path.read_text())
    finally:
        stop.set()
        fp.close()
    by_role: dict[str, list[int]] = {}
    for role, hwm in peaks.values():
        by_role.setdefault(role, []).append(hwm)
    return {
        "method": method,
        "dataset": dataset,
        "num_params": summary["num_params"],
        "rounds": rounds,
        "run_config": settings,
        "failed_replies": summary["failed_replies"],
        "rejected_replies": summary["rejected_replies"],
        "client_error_state_bytes": summary["client_error_state_bytes"],
        "peak_rss_bytes": {role: max(v) for role, v in by_role.items()},
        "clientapp_processes_seen": len(by_role.get("clientapp", [])),
        "node_tree_peak_rss_bytes": tree_peak,
        "sample_interval_s": interval,
    }


# --------------------------------------------------------------------------------------- the driver
def measure(method: str, width: int, *, samples: int, batch_size: int, epochs: int, lr: float,
            rounds: int = 2, compressor: str | None = None) -> list[dict[str, Any]]:
    """``rounds`` fresh processes, each one ClientApp round, the state passed on as bytes; one dict per round."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="conef-footprint-") as tmp:
        prev: Path | None = None
        for r in range(1, rounds + 1):
            out = Path(tmp) / f"state-{r}.bin"
            cmd = [sys.executable, "-m", "sim.footprint", "--child", "--method", method, "--width", str(width),
                   "--samples", str(samples), "--batch-size", str(batch_size), "--epochs", str(epochs),
                   "--lr", str(lr), "--round", str(r), "--state-out", str(out)]
            if prev is not None:
                cmd += ["--state-in", str(prev)]
            if compressor:
                cmd += ["--compressor", compressor]
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   "OMP_NUM_THREADS": "1"}
            t0 = time.monotonic()
            res = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["seconds"] = time.monotonic() - t0
            row["label"] = _label(method, compressor)
            rows.append(row)
            log.info("%-9s d=%9d round %d: peak RSS %.1f MiB, error state %.2f MiB (serialized %.2f MiB)",
                     row["label"], row["num_params"], r, row["peak_rss_bytes"] / MIB, row["error_state_bytes"] / MIB,
                     row["serialized_state_bytes"] / MIB)
            prev = out
    return rows


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the median peak RSS (lower median for an even count)."""
    ranked = sorted(rows, key=lambda r: r["peak_rss_bytes"])
    return ranked[(len(ranked) - 1) // 2]


def _key(r: dict[str, Any]) -> str:
    return r.get("label") or r["method"]


def summarize(rows: list[dict[str, Any]], reference: str = "efsgd", candidate: str = "conef-cs") -> list[dict]:
    """Per model size: last-round numbers of each row label (median over repeats), ``reference − candidate``.

    ``difference`` compares the plain labels (the app's Q); ``per_q`` compares
    ``reference/Q`` with ``candidate/Q`` for every Q run, with issue #13's target 6:
    ConEF's peak RSS ≤ EFSGD's − :data:`PEAK_MARGIN_OF_4D` · 4d.
    """
    steady = [r for r in rows if r["round"] == max(x["round"] for x in rows)]
    out = []
    for d in sorted({r["num_params"] for r in steady}):
        at_d = [r for r in steady if r["num_params"] == d]
        by = {m: _median_row([r for r in at_d if _key(r) == m]) for m in dict.fromkeys(_key(r) for r in at_d)}
        entry: dict[str, Any] = {"num_params": d, "dense_model_bytes": 4 * d, "methods": {}}
        for m, r in by.items():
            entry["methods"][m] = {
                "compressor": r.get("compressor"),
                "peak_rss_bytes": r["peak_rss_bytes"],
                "peak_rss_bytes_all_repeats": sorted(x["peak_rss_bytes"] for x in at_d if _key(x) == m),
                "peak_over_ready_bytes": r["peak_rss_bytes"] - r["rss_ready_bytes"],
                "error_state_bytes": r["error_state_bytes"],
                "serialized_state_bytes": r["serialized_state_bytes"],
                "payload_bytes": r["payload_bytes"],
                "peak_rss_after_phase_bytes": r["peak_rss_after_phase_bytes"],
            }
        if reference in by and candidate in by:
            entry["difference"] = _difference(by[reference], by[candidate], reference, candidate, d)
        per_q = {}
        for q in dict.fromkeys(r.get("compressor") for r in at_d if r.get("compressor")):
            a, b = by.get(_label(reference, q)), by.get(_label(candidate, q))
            if a is not None and b is not None:
                per_q[q] = _difference(a, b, _label(reference, q), _label(candidate, q), d)
        if per_q:
            entry["per_q"] = per_q
        out.append(entry)
    return out


def _difference(a: dict[str, Any], b: dict[str, Any], ref: str, cand: str, d: int) -> dict[str, Any]:
    """``a − b`` (reference − candidate) and target 6: ``b``'s peak ≤ ``a``'s − 0.8·4d."""
    need = PEAK_MARGIN_OF_4D * 4 * d
    saved = a["peak_rss_bytes"] - b["peak_rss_bytes"]
    return {
        "of": f"{ref} - {cand}",
        "peak_rss_bytes": saved,
        "peak_rss_saving_over_4d": saved / (4 * d),
        "peak_rss_repeats": {ref: sorted(a.get("peak_rss_bytes_all_repeats", [a["peak_rss_bytes"]])),
                             cand: sorted(b.get("peak_rss_bytes_all_repeats", [b["peak_rss_bytes"]]))},
        "target_peak_saving_bytes": need,
        "target_met": saved >= need,
        "error_state_bytes": a["error_state_bytes"] - b["error_state_bytes"],
        "serialized_state_bytes": a["serialized_state_bytes"] - b["serialized_state_bytes"],
        "error_state_ratio": (b["error_state_bytes"] / a["error_state_bytes"] if a["error_state_bytes"] else None),
    }


def markdown(report: dict[str, Any]) -> str:
    """A short table of the steady-state (round 2) numbers."""
    s = report["setup"]
    title = "# Edge footprint: ClientApp peak RSS and SuperNode error state"
    lines = [
        title,
        "",
        f"Measured by `{s.get('command', 'python -m sim.footprint')}` on {s['machine']} ({s['cpu_count']} cores), "
        f"Python {s['python']}, torch {s['torch']}, one thread. Each row is round {s['rounds']} (median of "
        f"{s['repeats']} repeats by peak RSS) of a fresh "
        "process per round doing what `clients.client_app.train` does (load the global model from an "
        "`ArrayRecord`, train, `u = x_global - x_local`, restore the worker from the previous round's "
        "serialized state, `worker.step(u, seed, consume=True)`, serialize the state, encode the reply). "
        f"Model: MLP 784-w-w-10; data: {s['samples']} synthetic MNIST-shaped samples, {s['epochs']} epoch, "
        f"batch {s['batch_size']}. Method settings: app defaults ({s['method_settings']}); rows `method/Q` use "
        f"Q with {s.get('compressors', {})} instead. Load average {s.get('load_avg_start')} → "
        f"{s.get('load_avg_end')}.",
        "",
        "Peak RSS = `VmHWM` of the ClientApp process; *over ready* = peak minus the RSS after imports, data "
        "and the incoming message (the part the round itself adds). Error state = `worker.nbytes` (what is "
        "kept between rounds); serialized = the bytes stored in the SuperNode's `context.state`.",
        "",
        "| params | method | peak RSS (MiB) | over ready (MiB) | error state (MiB) | serialized state (MiB) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for e in report["summary"]:
        for m, v in e["methods"].items():
            lines.append(
                f"| {e['num_params']:,} | {m} | {v['peak_rss_bytes'] / MIB:.1f} | "
                f"{v['peak_over_ready_bytes'] / MIB:.1f} | {v['error_state_bytes'] / MIB:.2f} | "
                f"{v['serialized_state_bytes'] / MIB:.2f} |"
            )
    lines += ["", "Difference EFSGD − ConEF (count sketch):", "",
              "| params | peak RSS (MiB) | error state (MiB) | ConEF state / EFSGD state |", "|---:|---:|---:|---:|"]
    for e in report["summary"]:
        dd = e.get("difference")
        if dd:
            lines.append(
                f"| {e['num_params']:,} | {dd['peak_rss_bytes'] / MIB:.1f} | {dd['error_state_bytes'] / MIB:.2f} | "
                f"{dd['error_state_ratio']:.3f} |"
            )
    per_q = [(e, q, dd) for e in report["summary"] for q, dd in e.get("per_q", {}).items()]
    if per_q:
        lines += ["", f"Whole client step per Q (issue #13 target 6: ConEF's peak RSS ≤ EFSGD's − "
                      f"{PEAK_MARGIN_OF_4D:g} × 4d; peaks of every repeat in the JSON):", "",
                  "| params | Q | EFSGD peak (MiB) | ConEF peak (MiB) | saving (MiB) | saving / 4d "
                  "| needed (MiB) | met |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for e, q, dd in per_q:
            ref, cand = dd["of"].split(" - ")
            a, b = e["methods"][ref], e["methods"][cand]
            lines.append(
                f"| {e['num_params']:,} | {q} | {a['peak_rss_bytes'] / MIB:.1f} | {b['peak_rss_bytes'] / MIB:.1f} | "
                f"{dd['peak_rss_bytes'] / MIB:.1f} | {dd['peak_rss_saving_over_4d']:.2f} | "
                f"{dd['target_peak_saving_bytes'] / MIB:.1f} | {'yes' if dd['target_met'] else '**no**'} |"
            )
    if report.get("deployment"):
        lines += [
            "",
            "Live loopback deployment (`--deployment`): processes under SuperNode 0, `VmHWM` sampled every "
            f"{report['deployment'][0]['sample_interval_s']} s; the node's total is the largest sum of `VmRSS` "
            "over its processes at one time.",
            "",
            "| dataset | params | method | SuperNode (MiB) | SuperExec (MiB) | ClientApp (MiB) | node total (MiB) |"
            " error state (KiB) |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for d in report["deployment"]:
            pk = d["peak_rss_bytes"]
            lines.append(
                f"| {d['dataset']} | {d['num_params']:,} | {d['method']} | {pk.get('supernode', 0) / MIB:.0f} | "
                f"{pk.get('superexec', 0) / MIB:.0f} | {pk.get('clientapp', 0) / MIB:.0f} | "
                f"{d['node_tree_peak_rss_bytes'] / MIB:.0f} | {d['client_error_state_bytes'] / 1024:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "footprint.json",
                    help="JSON report; a .md table is written beside it (default: %(default)s)")
    ap.add_argument("--save", action="store_true", help=f"write {SAVED} (and .md) instead of --out")
    ap.add_argument("--compressors", nargs="*", default=list(COMPRESSORS),
                    help="also run efsgd and conef-cs with each of these Q (per-Q comparison, target 6); "
                         "none: only --methods with the app's Q (default: %(default)s)")
    ap.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                    help="hidden widths w of the MLP 784-w-w-10 (default: %(default)s)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="default: %(default)s")
    ap.add_argument("--samples", type=int, default=600, help="local training samples (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=2, help="rounds, one fresh process each (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measure each (size, method) this often; the median is reported (default: %(default)s)")
    ap.add_argument("--deployment", nargs="*", default=None, metavar="DATASET",
                    help="also measure SuperNode/SuperExec/ClientApp RSS in a live loopback deployment "
                         "(2 SuperNodes) with these app datasets, e.g. --deployment digits mnist")
    ap.add_argument("--deployment-rounds", type=int, default=2)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--state-in", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--compressor", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        row = child_round(args.method, args.width, args.samples, args.batch_size, args.epochs, args.lr,
                          args.round, args.state_in, args.state_out, args.compressor)
        print(json.dumps(row))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for w in args.widths:
        if w < 1:
            raise SystemExit(f"--widths: {w} is out of range; allowed: >= 1")
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds} is out of range; allowed: >= 1")
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} is out of range; allowed: >= 1")
    import torch

    from sim.run import app_defaults

    defaults = app_defaults()
    for q in args.compressors:
        _q_overrides(q)  # refuse an unknown Q before anything runs
    runs = [(m, None) for m in args.methods] + [(m, q) for q in args.compressors for m in ("efsgd", "conef-cs")]
    rows: list[dict[str, Any]] = []
    load_start = list(os.getloadavg())
    for rep in range(args.repeats):  # interleaved, so slow drifts of the machine hit every method alike
        for w in args.widths:
            for m, q in runs:
                for row in measure(m, w, samples=args.samples, batch_size=args.batch_size, epochs=args.epochs,
                                   lr=args.lr, rounds=args.rounds, compressor=q):
                    rows.append({**row, "repeat": rep})
    deployments = []
    for ds in args.deployment or []:
        for m in [m for m in args.methods if m != "sgd"]:
            res = deployment_footprint(m, dataset=ds, rounds=args.deployment_rounds)
            log.info("deployment %s %s: %s", ds, m, res)
            if res["failed_replies"] or res["rejected_replies"]:
                log.warning("deployment %s %s: %d failed / %d rejected replies", ds, m, res["failed_replies"],
                            res["rejected_replies"])
            deployments.append(res)
    report = {
        "setup": {
            "machine": platform.machine() + " " + platform.system(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
            "model": "MLP 784-w-w-10",
            "widths": args.widths,
            "samples": args.samples,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "lr": args.lr,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "method_settings": ", ".join(f"{k}={defaults[k]}" for k in
                                         ("compressor", "k-ratio", "error-compressor", "sketch-ratio",
                                          "sketch-rows", "sketch-dtype", "value-dtype") if k in defaults),
            "process_per_round": True,
            "compressors": {q: COMPRESSORS[q] for q in args.compressors},
            "command": " ".join([Path(sys.executable).name, "-m", "sim.footprint", *sys.argv[1:]]),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_avg_start": load_start,
            "load_avg_end": list(os.getloadavg()),
        },
        "rows": rows,
        "summary": summarize(rows),
        "deployment": deployments,
    }
    out = SAVED if args.save else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown(report))
    print(markdown(report))
    log.info("wrote %s and %s", out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
