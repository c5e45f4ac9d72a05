"""The package's JSON writer: standard JSON, a non-finite number written as null."""

import json
import math

from sku_fast.engine.strict_json import to_json


def _refuse_constant(name: str):
    raise AssertionError(f"{name} is not JSON")


def test_non_finite_numbers_are_written_as_null_wherever_they_are():
    value = {"nan": math.nan, "inf": math.inf, "rows": [{"x": -math.inf}, (1.5, math.nan)],
             "kept": [0.0, -2.5, 3, "NaN", None, True]}  # fmt: skip
    text = to_json(value, indent=2)
    assert json.loads(text, parse_constant=_refuse_constant) == {
        "nan": None, "inf": None, "rows": [{"x": None}, [1.5, None]],
        "kept": [0.0, -2.5, 3, "NaN", None, True],
    }  # fmt: skip


def test_options_pass_through_and_the_value_is_not_modified():
    value = {"é": math.nan}
    assert to_json(value, ensure_ascii=False) == '{"é": null}'
    assert math.isnan(value["é"])
