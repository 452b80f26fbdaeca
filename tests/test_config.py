"""conef_fl.config: MethodConfig's value checks."""

from __future__ import annotations

import pytest

from conef_fl.config import MethodConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k_ratio": 0.0}, "k_ratio"),
        ({"k_ratio": 1.2}, "k_ratio"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"sketch_ratio": 0.0}, "sketch_ratio"),
        ({"sketch_rows": 0}, "sketch_rows"),
        ({"sketch_dtype": "int8"}, "sketch_dtype"),
        ({"compressor": "zip"}, "compressor"),
        ({"feedback": "magic"}, "feedback"),
        ({"quant_levels": 0}, "quant_levels"),
        ({"rank": 0}, "rank"),
        ({"value_dtype": "float64"}, "value_dtype"),
    ],
)
def test_bad_config_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MethodConfig(**kwargs)
