"""JSON that says what it means: reading, a key given twice is an error, not "the last one
wins"; writing, a number that is not finite (NaN, ±Infinity: not JSON, and refused by most
readers other than Python's) is written as null."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from sku_fast.errors import CheckpointError


def unique_keys(path: Path) -> Callable[[list[tuple[str, object]]], dict]:
    """An `object_pairs_hook` for json.loads that refuses a duplicate key, naming `path`."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: duplicate key {key!r}")
            out[key] = value
        return out

    return hook


def to_json(value: object, **options) -> str:
    """`json.dumps(value, **options)` with every non-finite float written as null."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
