"""Moved to `sku_fast.eval.evaluate`; old imports keep working (same module)."""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("sku_fast.eval.evaluate")
