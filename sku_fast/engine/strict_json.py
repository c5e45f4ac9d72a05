"""JSON that says what it means: a key given twice is an error, not "the last one wins"."""

from __future__ import annotations

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
