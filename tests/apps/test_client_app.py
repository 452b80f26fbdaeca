"""The project's ClientApp (train function + conef_mod) with a real Context: state persists with its size."""

from __future__ import annotations

import io
from unittest.mock import Mock

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from clients.partition_cache import ENV_VAR as PARTITION_CACHE_ENV
from conef_fl.flower import ConEF
from conef_fl.flower import protocol as P
from conef_fl.flower.client_state import STATE_KEY
from conef_fl.tasks import build_model, count_parameters, load_task_data

RUN_CONFIG = {"dataset": "digits", "partitioning": "iid", "seed": 0, "model": "auto", "local-epochs": 1,
              "batch-size": 16, "local-lr": 0.1, "run-name": "client-app-test"}


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture(autouse=True)
def private_partition_cache(tmp_path, monkeypatch):
    """The ClientApp's on-disk partition cache goes to a temporary folder, never the user's cache."""
    monkeypatch.setenv(PARTITION_CACHE_ENV, str(tmp_path / "partition-cache"))


def _strategy(method: str) -> ConEF:
    return ConEF(FedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1), method)


def _message(strategy: ConEF, rnd: int, model: torch.nn.Module):
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [7]
    (msg,) = strategy.configure_train(rnd, ArrayRecord(model.state_dict()), ConfigRecord(), grid)
    TaskIdentity.node_id = 7
    return msg


def _context(partition_id: int = 3) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id, "num-partitions": 10},
                   state=RecordDict(), run_config=dict(RUN_CONFIG))


def _stored_tensors(ctx: Context) -> dict:
    blob = ctx.state[STATE_KEY]["blob"]
    return torch.load(io.BytesIO(blob), weights_only=True)["worker"]["tensors"]


@pytest.mark.parametrize("method", ["conef-cs", "efsgd", "conef-q"])
def test_error_state_persists_with_declared_size(method: str) -> None:
    model = build_model(load_task_data("digits"), seed=0)
    d = count_parameters(model)
    strategy = _strategy(method)
    ctx = _context()
    for rnd in (1, 2):
        reply = client_app(_message(strategy, rnd, model), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = reply.content["metrics"]
        arrays = reply.content[P.PAYLOAD_RECORD]
        # the reply's bytes equal the compressor's claim, in wire dtypes (no dense float array dressed up)
        claimed = sum(strategy.compressor.expected_nbytes(tuple(v.shape)) for v in model.state_dict().values())
        assert metrics[P.M_UPLINK_BYTES] == claimed
        assert sum(a.numpy().nbytes for a in arrays.values()) == claimed
        assert claimed < 0.15 * 4 * d
        assert metrics[P.M_ERROR_STATE_BYTES] <= (4 * d if method == "efsgd" else 0.25 * 4 * d + 64 * 30)
        assert metrics[P.M_SERIALIZED_STATE_BYTES] == len(ctx.state[STATE_KEY]["blob"])
        assert metrics[P.M_STATE_SOURCE] == P.STATE_SOURCES["fresh" if rnd == 1 else "memory"]
        assert metrics["num-examples"] > 0 and "train-loss" in metrics


def test_efsgd_error_accumulates_across_rounds() -> None:
    model = build_model(load_task_data("digits"), seed=0)
    strategy = _strategy("efsgd")
    ctx = _context(1)
    norms = []
    for rnd in (1, 2):
        client_app(_message(strategy, rnd, model), ctx)
        norms.append(sum(float(v["stores"]["e"]["e"].norm()) for v in _stored_tensors(ctx).values()))
    # the same model is sent twice: e_2 = e_1 + u_2 − Δ_2 grows, it was not reset to one round's worth
    assert norms[0] > 0 and norms[1] > 1.2 * norms[0]


def test_a_bad_partition_is_refused_naming_it() -> None:
    model = build_model(load_task_data("digits"), seed=0)
    msg = _message(_strategy("conef-cs"), 1, model)
    with pytest.raises(ValueError, match="partition-id=12"):
        client_app(msg, _context(12))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, {"epochs": 0, "steps": 10}),                                    # the default: 10 steps on any partition size
    ({"local-epochs": 2}, {"epochs": 2, "steps": None}),                 # epochs, as typed, win over local-steps
    ({"local-epochs": 0, "local-steps": 3}, {"epochs": 0, "steps": 3}),
])
def test_local_work_is_local_steps_unless_local_epochs_is_set(monkeypatch, overrides: dict, expected: dict) -> None:
    import clients.client_app as ca

    seen: list[dict] = []
    real = ca.train_local
    monkeypatch.setattr(ca, "train_local", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    model = build_model(load_task_data("digits"), seed=0)
    strategy = _strategy("conef-cs")
    config = {k: v for k, v in RUN_CONFIG.items() if k != "local-epochs"} | overrides
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 3, "num-partitions": 10}, state=RecordDict(),
                  run_config=config)
    reply = client_app(_message(strategy, 1, model), ctx)
    assert not reply.has_error()
    assert {k: seen[0][k] for k in ("epochs", "steps")} == expected
