"""PNG plots of an experiment grid (matplotlib, Agg backend).

``plot_grid`` writes, into the grid's folder:

- ``accuracy_vs_round.png``: test accuracy (mean over seeds) against the round;
- ``accuracy_vs_uplink.png``: test accuracy against the cumulative uplink (MB, all clients);
- ``memory_per_client.png``: error-feedback memory kept by each client (KB), EFSGD as reference;
- ``perplexity_vs_round.png`` (text tasks): test perplexity against the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _curves(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[list[int], list[float], list[float],
                                                                             list[float]]]:
    """Per method: eval rounds, mean of ``key`` over seeds, cumulative uplink MB and uplink + downlink MB."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method_id"], []).append(r)
    out = {}
    for mid, rs in by_method.items():
        series = []
        for r in rs:
            cum, cum_total, pts = 0.0, 0.0, {}
            for row in r["rounds"]:
                cum += row.get("uplink_payload_bytes_total") or 0.0
                cum_total += (row.get("uplink_payload_bytes_total") or 0.0) + (row.get("downlink_bytes_total") or 0.0)
                v = row.get(key)
                if v is not None and math.isfinite(v):
                    pts[int(row["round"])] = (v, cum / 1e6, cum_total / 1e6)
            series.append(pts)
        common = sorted(set.intersection(*(set(s) for s in series))) if series else []
        xs = common
        ys = [sum(s[x][0] for s in series) / len(series) for x in xs]
        mb = [sum(s[x][1] for s in series) / len(series) for x in xs]
        tb = [sum(s[x][2] for s in series) / len(series) for x in xs]
        out[mid] = (xs, ys, mb, tb)
    return out


def _style(i: int) -> dict[str, Any]:
    return {"linestyle": ["-", "--", ":", "-."][(i // 10) % 4], "marker": "o" if i < 10 else "s", "markersize": 3}


def _seed_range(runs: Sequence[Mapping[str, Any]], mid: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """Rounds evaluated in every seed of ``mid``, with the seeds' minimum and maximum of ``key``."""
    series = [{int(row["round"]): row[key] for row in r["rounds"] if row.get(key) is not None}
              for r in runs if r["method_id"] == mid]
    if not series:
        return [], [], []
    xs = sorted(set.intersection(*(set(s) for s in series)))
    return xs, [min(s[x] for s in series) for x in xs], [max(s[x] for s in series) for x in xs]


def plot_highlight(runs: Sequence[Mapping[str, Any]], labels: Mapping[str, str], methods: Sequence[str],
                   path: Path, text: bool = False) -> Path | None:
    """Accuracy vs round of ``methods`` only, over the second half of the run: the mean over seeds and,
    shaded, the range between the seeds' lowest and highest accuracy at each evaluation."""
    acc = _curves(runs, "accuracy")
    present = [m for m in methods if acc.get(m) and acc[m][0]]
    if not present:
        return None
    last = max(acc[m][0][-1] for m in present)
    fig, ax = plt.subplots(figsize=(8, 5))
    lows = []
    for i, mid in enumerate(present):
        xs, ys = acc[mid][0], acc[mid][1]
        keep = [j for j, x in enumerate(xs) if x >= last / 2]
        line = ax.plot([xs[j] for j in keep], [100 * ys[j] for j in keep], label=labels.get(mid, mid), **_style(i))
        rx, lo, hi = _seed_range(runs, mid, "accuracy")
        pairs = [(x, a, b) for x, a, b in zip(rx, lo, hi, strict=True) if x >= last / 2]
        if pairs and any(a != b for _, a, b in pairs):
            ax.fill_between([p[0] for p in pairs], [100 * p[1] for p in pairs], [100 * p[2] for p in pairs],
                            color=line[0].get_color(), alpha=0.15, linewidth=0)
        lows += [100 * ys[j] for j in keep]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 1.0), None)  # the means; a seed's range may be cut off below
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)" + (" (per character)" if text else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("mean over seeds; shaded: lowest to highest seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grid(runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], out: Path,
              text: bool = False, highlight: Sequence[str] = ()) -> list[Path]:
    """Write the grid's plots into ``out``; returns the paths written."""
    labels = {r["method_id"]: r["label"] for r in rows}
    order = [r["method_id"] for r in rows]
    written = []
    acc = _curves(runs, "accuracy")
    for fname, xi, xlabel in [("accuracy_vs_round.png", 0, "round"),
                              ("accuracy_vs_uplink.png", 2, "cumulative uplink, all clients (MB, log scale)"),
                              ("accuracy_vs_total_bytes.png", 3,
                               "cumulative uplink + downlink, all clients (MB, log scale)")]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, mid in enumerate(order):
            c = acc.get(mid)
            if not c or not c[0]:
                continue
            ax.plot(c[xi], [100 * y for y in c[1]], label=labels[mid], **_style(i))
        ax.set_xlabel(xlabel)
        if xi >= 2:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_ylabel("test accuracy (%)" + (" (per character)" if text else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("mean over seeds")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    if highlight:
        main = plot_highlight(runs, labels, highlight, out / "accuracy_vs_round_main.png", text=text)
        if main is not None:
            written.append(main)
    if text:
        loss = _curves(runs, "loss")
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, mid in enumerate(order):
            c = loss.get(mid)
            if not c or not c[0]:
                continue
            ax.plot(c[0], [math.exp(min(y, 20)) for y in c[1]], label=labels[mid], **_style(i))
        ax.set_xlabel("round")
        ax.set_ylabel("test perplexity (per character)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "perplexity_vs_round.png", dpi=110)
        plt.close(fig)
        written.append(out / "perplexity_vs_round.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    mem = [(labels[m], r["error_memory_kb"]) for m, r in zip(order, rows, strict=True)]
    ax.barh([m[0] for m in mem], [m[1] for m in mem], color="tab:blue")
    ef = rows[0]["efsgd_error_memory_kb"] if rows else 0.0
    ax.axvline(ef, color="tab:red", linestyle="--", label=f"EFSGD: {ef:.0f} KB (4·d bytes)")
    for y, (_, v) in enumerate(mem):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("error-feedback memory kept per client between rounds (KB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory_per_client.png", dpi=110)
    plt.close(fig)
    written.append(out / "memory_per_client.png")
    return written


def plot_time_to_accuracy(report: Mapping[str, Any], labels: Mapping[str, str], path: Path) -> Path:
    """Test accuracy against modeled wall-clock (log scale), one panel per link bandwidth
    (``report`` from :func:`sim.time_to_accuracy.build_report`; mean over seeds)."""
    bws = [f"{b:g}" for b in report["bandwidths_mbit"]]
    fig, axes = plt.subplots(1, len(bws), figsize=(5 * len(bws), 4.2), sharey=True, squeeze=False)
    lows = []
    for ax, bw in zip(axes[0], bws, strict=True):
        for i, (mid, e) in enumerate(report["methods"].items()):
            curve = e["bandwidths"][bw]["curve_seconds_accuracy"]
            if not curve:
                continue
            ax.plot([p[0] / 60 for p in curve], [p[1] for p in curve], label=labels.get(mid, mid), **_style(i))
            lows += [p[1] for p in curve[len(curve) // 4:]]
        for t in report["targets_percent"]:
            ax.axhline(t, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel(f"modeled wall-clock (min), {bw} Mbit/s links")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    if lows:
        axes[0][0].set_ylim(max(0.0, min(lows) - 2.0), None)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("accuracy vs modeled wall-clock (measured client compute + bytes / bandwidth; mean over seeds)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
