"""Stale-error comparison: EFSGD, partial EFSGD, ConEF-CS and the decayed-error control at matched rounds.

    python -m sim.stale_error --setting "partial (10 of 100)=docs/results/experiments/mnist" \
        --setting "partial (10 of 100)=docs/results/experiments/mnist-partial-10of100" \
        --setting "full (10 of 10)=docs/results/experiments/mnist-full-10of10-100r" \
        --methods sgd,efsgd,partial-efsgd-b0.5,decayed-efsgd-90,conef-cs-90 \
        --out docs/results/experiments/stale-error

``--pairs conef-cs-90:decayed-efsgd-90,...`` adds, per setting, the paired difference A − B
of the final accuracy on every seed both methods ran (mean ± std over those seeds): the
number that says whether ConEF's gain over EFSGD is its memory compression or the damping
of stale error that its control reproduces without compression.

Runs that did not finish count up to their last checkpoint (``checkpoint.pt``: the
strategy's per-round history and the evaluations so far), so a run stopped for lack of
time still gives its curve. Every method of a setting is compared at the same horizon:
the last evaluated round that *all* its runs reached. Columns: accuracy at that round,
mean of the last three evaluations up to it, best evaluation, and the mean absolute
change between consecutive evaluations over its second half (how much the curve jumps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def rounds_of(folder: Path) -> tuple[list[dict[str, Any]], bool]:
    """Per-round rows of a run folder and whether it finished (``rounds.json``) or stopped (``checkpoint.pt``)."""
    if (folder / "summary.json").exists() and (folder / "rounds.json").exists():
        rows = json.loads((folder / "rounds.json").read_text())
        return (rows if isinstance(rows, list) else rows.get("rounds", [])), True
    ckpt = folder / "checkpoint.pt"
    if not ckpt.exists():
        return [], False
    import torch

    data = torch.load(ckpt, weights_only=True)
    evals = {int(k): v for k, v in data.get("evaluations", {}).items()}
    rows = []
    for h in data["strategy"].get("history", []):
        row = dict(h)
        ev = evals.get(int(row["round"]))
        row["accuracy"] = float(ev["accuracy"]) if ev else None
        rows.append(row)
    return rows, False


def load(dirs: Sequence[Path], methods: Sequence[str], seeds: Sequence[int] = (),
         finished_only: bool = False) -> list[dict[str, Any]]:
    """Runs ``<method>-s<seed>`` of ``methods`` (and ``seeds``, if given) under ``dirs`` (first folder wins);
    with ``finished_only`` runs still in progress (checkpoint only) are left out."""
    seen, runs = set(), []
    for d in dirs:
        for meta in sorted(Path(d).glob("*/experiment.json")):
            name = meta.parent.name
            mid, _, seed = name.rpartition("-s")
            if mid not in methods or name in seen or not seed.isdigit() or (seeds and int(seed) not in seeds):
                continue
            rows, finished = rounds_of(meta.parent)
            if not rows or (finished_only and not finished):
                continue
            info = json.loads(meta.read_text())
            seen.add(name)
            runs.append({"method_id": mid, "seed": int(seed), "rows": rows, "finished": finished,
                         "planned_rounds": info["run_config"].get("num-server-rounds"),
                         "engine": info.get("engine", "inmemory"), "folder": str(meta.parent)})
    return runs


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pm(m: float, sd: float, n: int, signed: bool = False) -> str:
    mean = f"{m:+.2f}" if signed else f"{m:.2f}"
    return f"{mean} ± {sd:.2f}" if n > 1 else mean


def _evals(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    return {int(r["round"]): 100 * float(r["accuracy"]) for r in rows if r.get("accuracy") is not None}


def compare(runs: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: numbers at the common horizon of the setting (mean over seeds)."""
    present = [m for m in methods if any(r["method_id"] == m for r in runs)]
    if not present:
        return {"horizon": None, "methods": {}}
    common = set.intersection(*(set(_evals(r["rows"])) for r in runs if r["method_id"] in present))
    common.discard(0)
    if not common:
        return {"horizon": None, "methods": {}}
    horizon = max(common)
    rounds = sorted(x for x in common if x <= horizon)
    out: dict[str, Any] = {"horizon": horizon, "eval_rounds": rounds, "methods": {}}
    for m in present:
        rs = sorted((r for r in runs if r["method_id"] == m), key=lambda r: r["seed"])
        ev = [_evals(r["rows"]) for r in rs]
        at = [e[horizon] for e in ev]
        last3 = [statistics.fmean(e[x] for x in rounds[-3:]) for e in ev]
        half = [x for x in rounds if x >= horizon / 2]
        jumps = [statistics.fmean(abs(e[b] - e[a]) for a, b in zip(half, half[1:], strict=False)) for e in ev
                 if len(half) > 1]
        out["methods"][m] = {
            "seeds": [r["seed"] for r in rs], "finished": [r["finished"] for r in rs],
            "planned_rounds": sorted({r["planned_rounds"] for r in rs}), "engine": sorted({r["engine"] for r in rs}),
            "accuracy_at_horizon": statistics.fmean(at), "accuracy_at_horizon_std": _mean_std(at)[1],
            "accuracy_at_horizon_per_seed": at, "last3_mean": statistics.fmean(last3),
            "last3_std": _mean_std(last3)[1], "best": max(max(e[x] for x in rounds) for e in ev),
            "mean_abs_jump_second_half": statistics.fmean(jumps) if jumps else None,
            "curve": {x: statistics.fmean(e[x] for e in ev) for x in rounds},
            "folders": [r["folder"] for r in rs],
        }
    return out


def paired(res: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per pair (A, B): A − B of the accuracy at the horizon on each seed both ran; mean ± std over those seeds."""
    out = []
    for a, b in pairs:
        ea, eb = res["methods"].get(a), res["methods"].get(b)
        if ea is None or eb is None:
            continue
        acc_a = dict(zip(ea["seeds"], ea["accuracy_at_horizon_per_seed"], strict=True))
        acc_b = dict(zip(eb["seeds"], eb["accuracy_at_horizon_per_seed"], strict=True))
        seeds = sorted(set(acc_a) & set(acc_b))
        if not seeds:
            continue
        diffs = [acc_a[s] - acc_b[s] for s in seeds]
        m, sd = _mean_std(diffs)
        out.append({"a": a, "b": b, "seeds": seeds, "diff_per_seed": diffs, "diff_mean": m, "diff_std": sd})
    return out


def markdown(settings: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    lines = ["# Stale error: matched-round comparison", ""]
    for name, res in settings.items():
        if res["horizon"] is None:
            lines += [f"## {name}", "", "no common evaluated round", ""]
            continue
        h = res["horizon"]
        engines = sorted({e for m in res["methods"].values() for e in m["engine"]})
        lines += [f"## {name}: horizon round {h}", "",
                  f"Engine: {', '.join(engines)} (inmemory = the in-process grid, sim/inmemory.py, running the real "
                  "ServerApp/ClientApp). Accuracy: mean ± std over the seeds listed (per seed in brackets).", "",
                  f"| method | seeds | runs finished | acc. @ {h} (%) | last-3 evals (%) | best (%) | "
                  "mean |jump| between evals, 2nd half (points) |", "|---|---|---|---|---|---|---|"]
        for m, e in res["methods"].items():
            fin = f"{sum(e['finished'])}/{len(e['finished'])} (of {'/'.join(map(str, e['planned_rounds']))} r)"
            jump = "–" if e["mean_abs_jump_second_half"] is None else f"{e['mean_abs_jump_second_half']:.2f}"
            per = " / ".join(f"{a:.2f}" for a in e["accuracy_at_horizon_per_seed"])
            n = len(e["seeds"])
            lines.append(f"| {labels.get(m, m)} | {','.join(map(str, e['seeds']))} | {fin} | "
                         f"{_pm(e['accuracy_at_horizon'], e.get('accuracy_at_horizon_std', 0.0), n)} ({per}) | "
                         f"{_pm(e['last3_mean'], e.get('last3_std', 0.0), n)} | {e['best']:.2f} | {jump} |")
        lines.append("")
        if res.get("pairs"):
            lines += ["Paired differences of the accuracy at the horizon (A − B, points, on the seeds both ran):", "",
                      "| A | B | seeds | A − B per seed | mean ± std |", "|---|---|---|---|---|"]
            for p in res["pairs"]:
                per = " / ".join(f"{d:+.2f}" for d in p["diff_per_seed"])
                lines.append(f"| {labels.get(p['a'], p['a'])} | {labels.get(p['b'], p['b'])} | "
                             f"{','.join(map(str, p['seeds']))} | {per} | "
                             f"{_pm(p['diff_mean'], p['diff_std'], len(p['seeds']), signed=True)} |")
            lines.append("")
        rounds = res["eval_rounds"]
        lines += ["Accuracy (%) at each evaluated round (mean over seeds):", "",
                  "| method | " + " | ".join(map(str, rounds)) + " |", "|---|" + "---|" * len(rounds)]
        for m, e in res["methods"].items():
            lines.append(f"| {labels.get(m, m)} | " + " | ".join(f"{e['curve'][x]:.1f}" for x in rounds) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.stale_error", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", action="append", required=True, metavar="NAME=DIR",
                    help="a setting and one grid folder of it (repeat a name to add folders)")
    ap.add_argument("--methods", required=True, help="comma-separated method ids")
    ap.add_argument("--seeds", default="", help="comma-separated seeds to compare (default: all found)")
    ap.add_argument("--finished-only", action="store_true", help="leave out runs still in progress")
    ap.add_argument("--pairs", default="", help="comma-separated A:B method pairs for paired differences")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",") if p]
    if any(len(p) != 2 or not all(p) for p in pairs):
        ap.error(f"--pairs={args.pairs!r} must be comma-separated A:B")
    from sim.experiments import METHODS

    methods = [m for m in args.methods.split(",") if m]
    folders: dict[str, list[Path]] = {}
    for s in args.setting:
        name, sep, d = s.partition("=")
        if not sep:
            ap.error(f"--setting {s!r} must be NAME=DIR")
        folders.setdefault(name, []).append(Path(d))
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        ap.error(f"--seeds={args.seeds!r} must be comma-separated integers")
    results = {name: compare(load(dirs, methods, seeds, args.finished_only), methods) for name, dirs in folders.items()}
    for res in results.values():
        if res["horizon"] is not None:
            res["pairs"] = paired(res, pairs)  # type: ignore[arg-type]
    labels = {m: METHODS[m].label if m in METHODS else m for m in methods}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stale_error.json").write_text(json.dumps(
        {"settings": {k: {"folders": [str(d) for d in v]} for k, v in folders.items()}, "seeds": seeds,
         "results": results}, indent=1))
    md = markdown(results, labels)
    (args.out / "stale_error.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
