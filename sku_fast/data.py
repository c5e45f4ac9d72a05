"""Moved to `sku_fast.unlearn.data`; old imports keep working (same module)."""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("sku_fast.unlearn.data")
