"""ServerApp: the configured Flower strategy wrapped with ConEF; runs the rounds, writes results.

It reads ``[tool.flwr.app.config]`` through :mod:`conef_fl.app_config`, builds the
inner strategy named by ``inner-strategy`` (:mod:`server.strategies`), wraps it with
:class:`conef_fl.flower.ConEF` and runs it with central evaluation and a
checkpoint every round.

Outputs (in ``<output-dir>/<run-name>/``): ``rounds.json`` / ``rounds.csv`` (per
round: accuracy, loss, uplink/downlink bytes, client error memory, rejections),
``summary.json`` and ``model.pt`` (the final global model).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from conef_fl.app_config import method_settings, read_app_config
from conef_fl.config import MethodConfig
from conef_fl.flower import ConEF
from conef_fl.tasks import build_model, check_train_device, count_parameters, evaluate, load_task_data
from server.checkpoint import load_checkpoint, save_checkpoint
from server.results import save_model, write_results
from server.strategies import build_inner_strategy

log = logging.getLogger("conef_fl.server")

app = ServerApp()


def _setup_logging() -> None:
    """Our INFO logs on stderr (Flower streams them); not propagated, so nothing prints twice."""
    for name in ("conef_fl", "server"):
        lg = logging.getLogger(name)
        if not any(getattr(h, "_conef", False) for h in lg.handlers):
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            h._conef = True  # type: ignore[attr-defined]
            lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def downlink_config(cfg: Any, method: MethodConfig) -> MethodConfig | None:
    """The downlink compressor (server-side error feedback), or None for a dense downlink."""
    if cfg.downlink in ("", "dense"):
        return None
    return MethodConfig(feedback="efsgd", compressor=cfg.downlink, k_ratio=cfg.downlink_k_ratio,
                        value_dtype=method.value_dtype, rank=method.rank, seed=method.seed)


def build_strategy(cfg: Any) -> ConEF:
    """The inner strategy of ``cfg`` wrapped with ConEF and the configured method."""
    settings = method_settings(cfg)
    method = {k: v for k, v in settings.items() if k != "seed"}
    strategy = ConEF(
        build_inner_strategy(cfg), cfg.method, seed=cfg.seed, norm_guard=cfg.norm_guard,
        max_update_norm=cfg.max_update_norm or None, node_wait_seconds=cfg.node_wait_seconds,
        sampling=cfg.sampling, sample_by=cfg.sample_by, allow_state_reset=cfg.allow_state_reset,
        downlink_log_rounds=cfg.downlink_log_rounds, **method,
    )
    strategy.downlink_config = downlink_config(cfg, strategy.method)
    return strategy


def build_summary(
    settings: Any, strategy: ConEF, rows: list[dict[str, Any]], num_params: int, seconds: float
) -> dict[str, Any]:
    """Final numbers: accuracy, uplink bytes vs dense FedAvg, client error memory vs EFSGD."""
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    uplink = sum(r["uplink_payload_bytes_total"] for r in rows)
    dense = sum(r["dense_bytes_per_client"] * r["accepted"] for r in rows)
    efsgd_bytes = 4 * num_params
    err = max((r["client_error_state_bytes_mean"] for r in rows), default=0.0)
    return {
        "method": strategy.method_name,
        "method_config": strategy.method.to_dict(),
        "dataset": settings.dataset,
        "model": settings.model,
        "num_params": num_params,
        "inner_strategy": settings.inner_strategy,
        "rounds": len(rows),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": next((r["loss"] for r in reversed(rows) if r.get("loss") is not None), None),
        "uplink_bytes_total": uplink,
        "dense_fedavg_uplink_bytes_total": dense,
        "uplink_fraction_of_dense": uplink / dense if dense else None,
        "downlink_bytes_total": sum(r["downlink_bytes_total"] for r in rows),
        "client_error_state_bytes": err,
        "efsgd_error_state_bytes": efsgd_bytes,
        "error_memory_saving_vs_efsgd": 1.0 - err / efsgd_bytes if efsgd_bytes else None,
        "rejected_replies": sum(r["rejected"] for r in rows),
        "failed_replies": sum(r["failed"] for r in rows),
        "wall_seconds": seconds,
        # all rounds' wall time, also across a resume (wall_seconds is this process's share only)
        "rounds_seconds_total": sum(float(r.get("round_seconds", 0.0)) for r in rows),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training with the ConEF strategy."""
    _setup_logging()
    torch.set_num_threads(1)
    settings = read_app_config(context.run_config)
    task = load_task_data(settings.dataset, settings.data_dir or None, seed=settings.seed)
    model = build_model(task, settings.model, seed=settings.seed)
    num_params = count_parameters(model)
    eval_model = copy.deepcopy(model).to(check_train_device(settings.train_device))
    strategy = build_strategy(settings)
    log.info(
        "task %s (%d train / %d test), model %s with %d parameters, method %s, inner strategy %s",
        task.name, task.num_train, task.num_test, settings.model, num_params, settings.method,
        settings.inner_strategy,
    )

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        last = server_round == settings.num_server_rounds
        if server_round % settings.eval_every and not last and server_round != 0:
            return None
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        res = evaluate(eval_model, task.x_test, task.y_test)
        log.info("round %d: test accuracy %.4f, test loss %.4f", server_round, res["accuracy"], res["loss"])
        return MetricRecord({"accuracy": float(res["accuracy"]), "loss": float(res["loss"])})

    t0 = time.time()
    run_dir = Path(settings.output_dir) / (settings.run_name or f"{settings.method}-{settings.dataset}-{int(t0)}")
    ckpt_dir = Path(settings.checkpoint_dir) / run_dir.name if settings.checkpoint_dir else run_dir
    initial = ArrayRecord(model.state_dict())
    start_round, prior_evals = 1, {}
    if settings.resume:
        ckpt = load_checkpoint(ckpt_dir, model.state_dict())
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            initial = ArrayRecord(model.state_dict())
            strategy.load_state_dict(ckpt["strategy"])
            start_round = int(ckpt["round"]) + 1
            prior_evals = ckpt["evaluations"]
            log.info("resuming at round %d from %s", start_round, ckpt_dir)
        else:
            log.info("resume requested but no checkpoint in %s; starting at round 1", ckpt_dir)

    def checkpoint(server_round: int, arrays: ArrayRecord, res) -> None:
        evals = dict(prior_evals)
        evals.update({r: {k: float(v) for k, v in m.items()} for r, m in res.evaluate_metrics_serverapp.items()})
        save_checkpoint(ckpt_dir, server_round, arrays.to_torch_state_dict(), strategy.state_dict(), evals)

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=settings.num_server_rounds,
        evaluate_fn=central_eval,
        start_round=start_round,
        on_round_end=checkpoint,
    )
    for r, m in prior_evals.items():
        result.evaluate_metrics_serverapp.setdefault(int(r), MetricRecord(dict(m)))
    seconds = time.time() - t0
    rows: list[dict[str, Any]] = []
    for st in strategy.history:
        row = st.__dict__.copy()
        ev = result.evaluate_metrics_serverapp.get(st.round)
        row["accuracy"] = float(ev["accuracy"]) if ev is not None else None
        row["loss"] = float(ev["loss"]) if ev is not None else None
        rows.append(row)
    summary = build_summary(settings, strategy, rows, num_params, seconds)
    out_dir = run_dir
    write_results(out_dir, rows, summary)
    if result.arrays is not None:
        model.load_state_dict(result.arrays.to_torch_state_dict())
    save_model(out_dir, model.state_dict())
    acc = summary["final_accuracy"]
    log.info("=" * 60)
    log.info("SUMMARY %s (%s) on %s, %d rounds", settings.method, settings.inner_strategy, settings.dataset,
             len(rows))
    log.info("  final test accuracy      %s", f"{acc:.4f}" if acc is not None else "n/a")
    frac = summary["uplink_fraction_of_dense"]
    log.info(
        "  uplink                   %.2f MB (dense FedAvg: %.2f MB, %.1f %%)",
        summary["uplink_bytes_total"] / 1e6, summary["dense_fedavg_uplink_bytes_total"] / 1e6,
        100 * frac if frac is not None and math.isfinite(frac) else float("nan"),
    )
    log.info(
        "  client error memory      %.1f KB (EFSGD: %.1f KB, saving %.1f %%)",
        summary["client_error_state_bytes"] / 1e3, summary["efsgd_error_state_bytes"] / 1e3,
        100 * (summary["error_memory_saving_vs_efsgd"] or 0.0),
    )
    log.info("  rejected / failed replies %d / %d", summary["rejected_replies"], summary["failed_replies"])
    log.info("  results in %s", out_dir.resolve())
    log.info("=" * 60)
