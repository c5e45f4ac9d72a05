"""SKU and the gradient-ascent baseline: settings, data, the objective, the trainer and the
pipeline that writes a run folder."""

from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.pipeline import run_unlearn

__all__ = ["UnlearnConfig", "run_unlearn"]
