"""conef_fl.registry: the method registry."""

from __future__ import annotations

import pytest

from conef_fl.config import MethodConfig
from conef_fl.feedback import EFSGD, make_feedback
from conef_fl.registry import method_config


def test_registry() -> None:
    with pytest.raises(ValueError, match="conef-cs"):
        method_config("no-such-method")
    assert method_config("sgd", compressor="top-k").compressor == "identity"
    assert method_config("conef-cs").feedback == "conef"
    with pytest.raises(ValueError, match="unknown method setting"):
        MethodConfig.from_dict({"k_ratio": 0.1, "bogus": 1})
    assert isinstance(make_feedback(method_config("efsgd"), (5,)), EFSGD)
