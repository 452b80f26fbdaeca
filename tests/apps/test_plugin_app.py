"""A user's own Flower app, written here, gains ConEF with two changes and runs on Flower's simulation engine.

The app below knows nothing of this project's tasks: its own model, its own data
(Gaussian blobs drawn per node), its own training loop. It runs twice through
Flower's simulation engine (``flwr.simulation.run_simulation``, Ray actors), in a
subprocess of its own so that every process it starts is stopped with it:
plain FedAvg, and the same app with ``mods=[conef_mod]`` and ``ConEF(FedAvg(...))``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sim.flower_runtime import descendants, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 20

APP = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    USE_CONEF = sys.argv[1] == "conef"
    OUT = sys.argv[2]
    ROUNDS = int(sys.argv[3])
    CENTERS = np.random.default_rng(0).normal(0, 2.0, size=(4, 32)).astype(np.float32)

    def blobs(seed, n):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, n)
        x = CENTERS[y] + rng.normal(0, 1.5, size=(n, 32)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 4))

    mods = []
    if USE_CONEF:
        from conef_fl.flower import conef_mod
        mods = [conef_mod]                                    # change 1 of 2
    client = ClientApp(mods=mods)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model = net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = blobs(100 + int(context.node_config["partition-id"]), 64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "metrics": MetricRecord({"num-examples": 64, "train-loss": loss.item()})})
        return Message(reply, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = net()
        strategy = FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_available_nodes=10)
        if USE_CONEF:
            from conef_fl.flower import ConEF
            strategy = ConEF(strategy, "conef-cs", k_ratio=0.1, sketch_ratio=0.1)   # change 2 of 2
        uplink = []
        send = grid.send_and_receive

        def counting(messages, **kw):
            replies = list(send(messages, **kw))
            uplink.extend(sum(r.count_bytes() for r in m.content.array_records.values())
                          for m in replies if not m.has_error())
            return replies

        grid.send_and_receive = counting
        xt, yt = blobs(1, 2000)

        def accuracy(rnd, arrays):
            model.load_state_dict(arrays.to_torch_state_dict())
            with torch.no_grad():
                acc = float((model(xt).argmax(1) == yt).float().mean())
            return MetricRecord({"accuracy": acc})

        result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=ROUNDS, evaluate_fn=accuracy)
        out = {"accuracy": result.evaluate_metrics_serverapp[ROUNDS]["accuracy"], "uplink": sum(uplink),
               "replies": len(uplink), "dense_model_bytes": 4 * sum(p.numel() for p in model.parameters())}
        if USE_CONEF:
            out["error_state_bytes"] = max(h.client_error_state_bytes_mean for h in strategy.history)
            out["rejected"] = sum(h.rejected + h.failed for h in strategy.history)
        json.dump(out, open(OUT, "w"))

    # address "local": a Ray instance of its own, even where another Ray cluster runs on this machine
    run_simulation(server_app=server, client_app=client, num_supernodes=10,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "address": "local"}})
''')


def _run(tmp_path: Path, which: str) -> dict:
    script = tmp_path / "user_app.py"
    script.write_text(APP)
    out = tmp_path / f"{which}.json"
    # (RAY_TMPDIR: the short per-worker folder of conftest._private_ray_temp_dir, not tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(script), which, str(out), str(ROUNDS)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        group = [proc.pid, *descendants(proc.pid)]
        for pid in group:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert out.exists(), f"the {which} run wrote no result:\n{log[-4000:]}"
    return json.loads(out.read_text())


def test_own_app_with_the_mod_and_the_wrapper(tmp_path: Path) -> None:
    before = set(descendants(os.getpid()))
    dense = _run(tmp_path, "dense")
    conef = _run(tmp_path, "conef")
    assert dense["replies"] == conef["replies"] == 5 * ROUNDS and conef["rejected"] == 0
    assert conef["uplink"] <= 0.105 * dense["uplink"], (conef, dense)
    assert conef["error_state_bytes"] <= 0.10 * conef["dense_model_bytes"], conef
    assert dense["accuracy"] > 0.8
    assert conef["accuracy"] >= dense["accuracy"] - 0.05, (conef, dense)
    assert set(descendants(os.getpid())) - before == set()
