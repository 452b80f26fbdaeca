"""Bidirectional compression: compressed downlink with server-side error feedback and catch-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from conef_fl.config import MethodConfig
from conef_fl.flower.downlink import DownlinkCompressor
from conef_fl.flower.downlink_client import stored_model
from sim.inmemory import run_inmemory

BASE = {"method": "conef-cs", "num-server-rounds": 6, "local-epochs": 1, "seed": 2, "eval-every": 6}


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def _rows(folder: Path) -> list[dict]:
    return json.loads((folder / "rounds.json").read_text())


@pytest.mark.parametrize("downlink", ["identity", "random-block-k"])
def test_lossless_downlink_reduces_to_unidirectional(tmp_path: Path, downlink: str) -> None:
    """identity, and random-block-k sharing the uplink's block, lose nothing: same model as unidirectional."""
    cfg = {**BASE, "fraction-train": 1.0, "output-dir": str(tmp_path)}
    run_inmemory({**cfg, "run-name": "uni"}, 4)
    run_inmemory({**cfg, "run-name": "bi", "downlink": downlink, "downlink-k-ratio": 0.1}, 4)
    a, b = _model(tmp_path / "uni"), _model(tmp_path / "bi")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    if downlink == "random-block-k":
        up, down = _rows(tmp_path / "bi"), _rows(tmp_path / "uni")
        # after round 1 (dense to everyone), each client receives one block per round
        assert sum(r["downlink_bytes_total"] for r in up[1:]) < 0.2 * sum(r["downlink_bytes_total"] for r in down[1:])


def test_clients_hold_exactly_the_servers_model_after_catch_up(tmp_path: Path, monkeypatch) -> None:
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    orig_step = DownlinkCompressor.step

    def recording_step(self, update, seed=None):
        if not snapshots:
            snapshots[0] = {k: v.clone() for k, v in self.model.items()}
        out = orig_step(self, update, seed)
        snapshots[self.version] = {k: v.clone() for k, v in self.model.items()}
        return out

    monkeypatch.setattr(DownlinkCompressor, "step", recording_step)
    grid = run_inmemory(
        {**BASE, "num-server-rounds": 10, "fraction-train": 0.4, "output-dir": str(tmp_path), "run-name": "p",
         "downlink": "top-k", "downlink-k-ratio": 0.05, "method": "ef-topk"},
        6,
    )
    checked = 0
    for ctx in grid.contexts.values():
        held = stored_model(ctx)
        if held is None:
            continue
        version, model = held
        for k in model:
            torch.testing.assert_close(model[k], snapshots[version][k], rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 4
    rows = _rows(tmp_path / "p")
    assert all(r["downlink_bytes_total"] > 0 and r["uplink_payload_bytes_total"] > 0 for r in rows)


def test_server_error_feedback_conserves_mass() -> None:
    model = {"w": torch.zeros(50, 40), "b": torch.zeros(40)}
    dl = DownlinkCompressor(MethodConfig(feedback="efsgd", compressor="top-k", k_ratio=0.05), model)
    g = torch.Generator().manual_seed(0)
    total = {k: torch.zeros_like(v) for k, v in model.items()}
    for _ in range(20):
        upd = {k: torch.randn(v.shape, generator=g) for k, v in model.items()}
        for k in total:
            total[k] += upd[k]
        payloads = dl.step(upd)
        assert all(p.nbytes < 0.15 * 4 * model[k].numel() for k, p in payloads.items())
    for k in model:  # x_0 − x_T + e_s == Σ updates: nothing lost, only delayed
        torch.testing.assert_close(-dl.model[k] + dl.error[k], total[k], rtol=1e-4, atol=1e-4)
    assert dl.error_norm > 0


def test_catch_up_plan() -> None:
    model = {"w": torch.zeros(100, 100)}
    dl = DownlinkCompressor(MethodConfig(feedback="efsgd", compressor="random-block-k", k_ratio=0.1), model,
                            max_log_rounds=3)
    assert dl.plan(5).dense  # unknown node
    dl.mark_synced(5, 0)
    for _ in range(2):
        dl.step({"w": torch.ones(100, 100)})
    plan = dl.plan(5)
    assert not plan.dense and plan.rounds == (1, 2) and plan.base == 0
    for _ in range(2):
        dl.step({"w": torch.ones(100, 100)})
    assert dl.plan(5).dense  # round 1 fell out of the log
    dl.mark_synced(6, 3)
    assert dl.plan(6).rounds == (4,)
    dl.forget(6)
    assert dl.plan(6).dense
    # catching up more than 10 rounds of 10 % blocks costs more than the dense model
    big = DownlinkCompressor(MethodConfig(feedback="efsgd", compressor="random-block-k", k_ratio=0.1), model,
                             max_log_rounds=50)
    big.mark_synced(1, 0)
    for _ in range(11):
        big.step({"w": torch.ones(100, 100)})
    assert big.plan(1).dense


# ---------------------------------------------------------------------------- the model copy on disk (state-dir)
def _ctx(partition: int = 0, state=None) -> Context:
    return Context(run_id=1, node_id=9, node_config={"partition-id": partition},
                   state=state if state is not None else RecordDict(), run_config={"run-name": "dl"})


def _copy() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(20, 5, generator=g), "b": torch.randn(5, generator=g)}


def test_with_a_state_dir_the_model_copy_is_on_disk_and_survives_a_restart(tmp_path: Path) -> None:
    from conef_fl.flower.downlink_client import MODEL_KEY, store_model

    where = {"state_dir": str(tmp_path), "max_bytes": 1 << 20}
    ctx, model = _ctx(), _copy()
    store_model(ctx, 7, model, **where)
    assert "blob" not in ctx.state[MODEL_KEY] and ctx.state[MODEL_KEY]["version"] == 7  # memory: a pointer only
    assert (tmp_path / "dl" / "partition-0.model").is_file()
    for context in (ctx, _ctx()):  # the same process, and a restarted SuperNode (empty context.state)
        version, held = stored_model(context, **where)
        assert version == 7 and all(torch.equal(held[k], model[k]) for k in model)
    assert stored_model(_ctx(partition=1), **where) is None  # another client's copy is not this one's
    assert not list((tmp_path / "dl").glob(".*.tmp"))


def test_a_refused_model_file_makes_the_client_refuse_and_an_unwritable_one_stays_in_memory(tmp_path: Path) -> None:
    from conef_fl.flower.downlink_client import MODEL_KEY, store_model

    where = {"state_dir": str(tmp_path), "max_bytes": 1 << 20}
    store_model(_ctx(), 7, _copy(), **where)
    path = tmp_path / "dl" / "partition-0.model"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        stored_model(_ctx(), **where)
    store_model(_ctx(partition=1), 7, _copy(), **where)
    (tmp_path / "dl" / "partition-1.model").replace(path)  # another client's file under this client's name
    with pytest.raises(ValueError, match="belongs to dl/partition-1"):
        stored_model(_ctx(), **where)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="symbolic link"):
        stored_model(_ctx(), **where)
    ctx = _ctx()
    store_model(ctx, 8, _copy(), **where)  # the pointer names version 8 ...
    store_model(_ctx(), 9, _copy(), **where)  # ... another writer moved the file on
    with pytest.raises(ValueError, match="holds version 9, the client expected 8"):
        stored_model(ctx, **where)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    ctx = _ctx()
    store_model(ctx, 3, _copy(), state_dir=str(blocked), max_bytes=1 << 20)  # cannot write: kept in memory
    assert isinstance(ctx.state[MODEL_KEY]["blob"], bytes) and stored_model(ctx)[0] == 3


def test_a_run_with_a_state_dir_keeps_no_model_copy_in_memory_and_trains_the_same_model(tmp_path: Path) -> None:
    cfg = {**BASE, "fraction-train": 0.5, "output-dir": str(tmp_path), "downlink": "top-k",
           "downlink-k-ratio": 0.05, "method": "ef-topk"}
    run_inmemory({**cfg, "run-name": "mem"}, 4)
    grid = run_inmemory({**cfg, "run-name": "disk", "state-dir": str(tmp_path / "state")}, 4)
    a, b = _model(tmp_path / "mem"), _model(tmp_path / "disk")
    assert all(torch.equal(a[k], b[k]) for k in a)
    held = [ctx for ctx in grid.contexts.values() if "conef-global-model" in ctx.state]
    assert held and all("blob" not in ctx.state["conef-global-model"] for ctx in held)
    assert len(list((tmp_path / "state" / "disk").glob("*.model"))) == len(held)
