"""sku-fast: Selective Knowledge negation Unlearning for large language models.

The public API is imported lazily so that `import sku_fast` (and `sku-fast negate`) does not
pull in torch, transformers or triton before they are needed.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from sku_fast.errors import CheckpointError, DataError, SkuFastError, TrainingError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS = {
    "task_arithmetic": "sku_fast.arithmetic",
    "negate": "sku_fast.arithmetic",
    "negate_lora": "sku_fast.lora",
    "token_loss": "sku_fast.ops",
    "cross_entropy": "sku_fast.ops",
    "kl_div": "sku_fast.ops",
    "TokenLoss": "sku_fast.ops",
    "fused_linear_token_loss": "sku_fast.ops",
}

__all__ = [
    "CheckpointError",
    "DataError",
    "SkuFastError",
    "TrainingError",
    "__version__",
    *_LAZY_EXPORTS,
]

if TYPE_CHECKING:  # pragma: no cover
    from sku_fast.arithmetic import negate, task_arithmetic  # noqa: F401
    from sku_fast.lora import negate_lora  # noqa: F401
    from sku_fast.ops import (  # noqa: F401
        TokenLoss,
        cross_entropy,
        fused_linear_token_loss,
        kl_div,
        token_loss,
    )


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sku_fast' has no attribute {name!r}")
    return getattr(import_module(module), name)
