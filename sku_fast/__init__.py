"""sku-fast: Selective Knowledge negation Unlearning for large language models.

Four parts, each usable on its own: `sku_fast.engine` (streaming task-vector arithmetic over
safetensors, no torch), `sku_fast.ops` (fused token losses), `sku_fast.unlearn` (SKU and the
gradient-ascent baseline) and `sku_fast.eval` (judges, metrics, comparisons). The public API is
imported lazily, so `import sku_fast` (and `sku-fast negate`) pulls in no torch, transformers or
triton before they are needed.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from sku_fast.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    SkuFastError,
    TrainingError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS = {
    "task_arithmetic": "sku_fast.engine",
    "negate": "sku_fast.engine",
    "negate_lora": "sku_fast.engine",
    "token_loss": "sku_fast.ops",
    "cross_entropy": "sku_fast.ops",
    "kl_div": "sku_fast.ops",
    "TokenLoss": "sku_fast.ops",
    "fused_linear_token_loss": "sku_fast.ops",
    "FusedLinearTokenLoss": "sku_fast.ops",
    "UnlearnConfig": "sku_fast.unlearn.config",
    "run_unlearn": "sku_fast.unlearn.pipeline",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "SkuFastError",
    "TrainingError",
    "__version__",
    *_LAZY_EXPORTS,
]

if TYPE_CHECKING:  # pragma: no cover
    from sku_fast.engine import negate, negate_lora, task_arithmetic  # noqa: F401
    from sku_fast.ops import (  # noqa: F401
        FusedLinearTokenLoss,
        TokenLoss,
        cross_entropy,
        fused_linear_token_loss,
        kl_div,
        token_loss,
    )
    from sku_fast.unlearn.config import UnlearnConfig  # noqa: F401
    from sku_fast.unlearn.pipeline import run_unlearn  # noqa: F401


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sku_fast' has no attribute {name!r}")
    return getattr(import_module(module), name)
