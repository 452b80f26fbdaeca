"""The app config schema: one declaration, pyproject agrees, every key used, bad values named as typed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conef_fl import app_config as ac
from conef_fl.config import FIELD_SPECS, MethodConfig

REPO = Path(__file__).resolve().parents[1]


def _pyproject_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_agree_with_the_schema_key_for_key() -> None:
    assert list(_pyproject_config().items()) == list(ac.defaults().items())


def test_every_key_is_read_by_the_code() -> None:
    sources = "\n".join(p.read_text() for folder in ("clients", "server", "conef_fl/flower")
                        for p in (REPO / folder).rglob("*.py"))
    schema = (REPO / "conef_fl" / "app_config.py").read_text()
    sources += schema.split("APP_KEYS: tuple")[0] + schema.split("KEYS: dict")[1]  # not the declaration itself
    unread = [k.name for k in ac.APP_KEYS
              if not k.method_field and not re.search(rf"\.{k.attr}\b|[\"']{re.escape(k.name)}[\"']", sources)]
    assert unread == []
    method_fields = {k.method_field for k in ac.APP_KEYS if k.method_field}
    assert method_fields | {"feedback", "error_compressor", "seed"} == set(FIELD_SPECS)


def test_name_lists_agree_with_the_modules_that_own_them() -> None:
    from conef_fl.config import ERROR_COMPRESSORS, FEEDBACKS
    from conef_fl.feedback import ERROR_STORES, FEEDBACK_CLASSES
    from conef_fl.registry import available_methods
    from conef_fl.tasks import MODEL_NAMES, PARTITION_SCHEMES, TASK_NAMES
    from server.strategies import build_inner_strategy

    assert sorted(ac.METHODS) == available_methods()
    assert set(FEEDBACK_CLASSES) == set(FEEDBACKS) and set(ERROR_STORES) == set(ERROR_COMPRESSORS)
    assert ac.MODELS == MODEL_NAMES and ac.DATASETS == TASK_NAMES and ac.PARTITIONINGS == PARTITION_SCHEMES
    for name in ac.INNER_STRATEGIES:
        cfg = ac.read_app_config({"inner-strategy": name})
        assert type(build_inner_strategy(cfg)).__name__.lower() == name


def _wrong_values(spec) -> list:
    return {"int": ["3", 1.5, True, None, [1]], "float": ["fast", True, None, [0.1]],
            "str": [3, True, None, ["a"]], "bool": ["yes", 1, None]}[spec.kind]


@pytest.mark.parametrize("key", [k.name for k in ac.APP_KEYS])
def test_a_wrong_type_is_refused_naming_the_key_as_typed(key: str) -> None:
    for bad in _wrong_values(ac.KEYS[key].spec):
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}={re.escape(repr(bad))} "):
            ac.read_app_config({key: bad})


def test_out_of_range_values_and_unknown_keys_are_named() -> None:
    with pytest.raises(ValueError, match=r"local-lr='fast' is not a number"):
        ac.parse_overrides(["local-lr=fast"])
    with pytest.raises(ValueError, match=r"k-ratio=1.5 is out of range; allowed: a number in \(0, 1\]"):
        ac.read_app_config({"k-ratio": 1.5})
    with pytest.raises(ValueError, match=r"unknown app config key 'local_lr' \(did you mean 'local-lr'"):
        ac.parse_overrides(["local_lr=0.1"])
    with pytest.raises(ValueError, match=r"method='conef' is not valid \(did you mean 'conef-q'|'conef-cs'"):
        ac.read_app_config({"method": "conef"})
    with pytest.raises(ValueError, match="lr-decay-rounds"):
        ac.read_app_config({"lr-decay-rounds": "200;260"})
    with pytest.raises(ValueError, match="local-epochs=0 and local-steps=0"):
        ac.read_app_config({"local-epochs": 0, "local-steps": 0})


def test_overrides_parse_like_toml() -> None:
    got = ac.parse_overrides(["k-ratio=0.05", "layerwise=false", "method=efsgd", "num-server-rounds=3"])
    assert got == {"k-ratio": 0.05, "layerwise": False, "method": "efsgd", "num-server-rounds": 3}


@pytest.mark.parametrize("field,value", [
    ("k_ratio", "0.1"), ("sketch_ratio", None), ("estimate_scale", "1"), ("error_topk_ratio", [0.1]),
    ("k_ratio", True), ("sketch_ratio", True), ("error_topk_ratio", True), ("rank", 4.0), ("layerwise", 1),
    ("sketch_unit", 2**40), ("rank", 10**9), ("beta", 1.0), ("compressor", "topk"),
])
def test_method_config_checks_type_before_range(field: str, value) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        MethodConfig(**{field: value})


def test_method_config_replace_refuses_unknown_names_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown method setting 'k_ration' \\(did you mean 'k_ratio'"):
        MethodConfig().replace(k_ration=0.1)


def test_sim_run_refuses_a_bad_value_before_starting_anything() -> None:
    res = subprocess.run([sys.executable, "-m", "sim.run", "--set", "local-lr=fast"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert "local-lr='fast' is not a number" in res.stderr
    assert "SuperLink" not in res.stderr + res.stdout
