"""``conef_fl.ddp.state``: the hook-state base (pickling, settings, binding, seeds, byte counters).

Single process: no process group is needed (``ConEFHookState`` and ``LIECHookState`` are the
concrete states).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from conef_fl.ddp import ConEFHookState, LIECHookState
from conef_fl.ddp.state import check_count

from .test_segments import FakeBucket


def _conef() -> ConEFHookState:
    return ConEFHookState.from_method("conef-cs", warmup_steps=3, k_ratio=0.2)


def _liec() -> LIECHookState:
    return LIECHookState.from_settings(k_ratio=0.2, down_compressor="top-k", average_every=7, warmup_steps=3)


@pytest.mark.parametrize("make", [_conef, _liec])
def test_state_pickles_without_process_group_and_its_generator_continues(make: Any) -> None:
    state = make()
    state.process_group = object()  # a process group never travels
    state.iter = 5
    draw = torch.randint(0, 100, (3,), generator=copy.deepcopy(state.rng))
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None and clone.iter == 5 and clone.warmup_steps == 3
    assert all(getattr(clone, s) == getattr(state, s) for s in type(state)._SETTINGS)
    assert torch.equal(torch.randint(0, 100, (3,), generator=clone.rng), draw)
    fresh = make()
    group = fresh.process_group = object()
    fresh.load_state_dict(clone.state_dict())
    assert fresh.iter == 5 and fresh.process_group is group  # load keeps the group


def test_load_rejects_other_settings_versions_and_missing_keys() -> None:
    saved = _conef().state_dict()
    with pytest.raises(ValueError, match="state_dict has config=.*expected"):
        ConEFHookState.from_method("efsgd").load_state_dict(saved)
    with pytest.raises(ValueError, match="state_dict has downlink="):
        LIECHookState.from_settings(k_ratio=0.2).load_state_dict(_liec().state_dict())
    with pytest.raises(ValueError, match="version=1 is not supported; allowed: 2"):
        _conef().load_state_dict({**saved, "_version": 1})
    with pytest.raises(ValueError, match=r"missing \['rng'\]"):
        _conef().load_state_dict({k: v for k, v in saved.items() if k != "rng"})
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        _conef().load_state_dict({**saved, "warmup_steps": -1})


def test_bind_names_segments_after_the_model() -> None:
    model = nn.Linear(3, 2)
    state = _conef()
    loose = torch.zeros(1)
    assert state.param_name(loose) == "param0"  # unbound: in the order seen
    state.bind(model)
    assert state.param_name(model.weight) == "weight" and state.param_name(model.bias) == "bias"
    with pytest.raises(ValueError, match="not in the bound model"):
        state.param_name(loose)
    with pytest.raises(ValueError, match="must be an nn.Module"):
        state.bind("model")  # type: ignore[arg-type]


def test_step_seed_comes_from_the_state_generator_once_per_iteration() -> None:
    state = _conef()
    rng_before = torch.random.get_rng_state()
    first = state._seed()
    assert state._seed() == first  # the same iteration: the same seed
    state.iter += 1
    assert state._seed() != first
    assert torch.equal(rng_before, torch.random.get_rng_state())


def test_byte_counters_close_an_iteration_at_the_last_bucket() -> None:
    state = _liec()
    state._count(1, sent=10, down=7, dense=40)
    assert not state._end_bucket(FakeBucket([], index=1, last=False), compressed=True)
    state._count(0, sent=5, down=3, dense=20)
    assert state._end_bucket(FakeBucket([], index=0, last=True), compressed=True)
    assert (state.last_bytes_sent, state.last_bytes_down, state.last_bytes_dense) == (15, 10, 60)
    assert state.last_bucket_bytes == {1: (10, 40), 0: (5, 20)}
    state._count(0, sent=60, down=60, dense=60)
    state._end_bucket(FakeBucket([]), compressed=False)
    stats = state.stats()
    assert (stats["bytes_sent_total"], stats["bytes_down_total"], stats["bytes_dense_total"]) == (75, 70, 120)
    assert stats["bytes_ratio_total"] == 75 / 120 and stats["last_bytes_down_ratio"] == 1.0
    assert (stats["iter"], stats["compressed_steps"], stats["dense_steps"]) == (2, 1, 1)
    assert state.steps_since_average == 1


def test_group_needs_an_initialized_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        _conef().group()


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_check_count_rejects_non_counts(value: object) -> None:
    with pytest.raises(ValueError, match=rf"={value!r} is out of range; allowed: integer >= 0"):
        check_count("steps", value)
