"""SKU and the gradient-ascent baseline: settings, data, the objective, the trainer and the
pipeline that writes a run folder. Names are imported lazily: `UnlearnConfig` needs no torch."""

from importlib import import_module

_EXPORTS = {
    "UnlearnConfig": "sku_fast.unlearn.config",
    "run_unlearn": "sku_fast.unlearn.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sku_fast.unlearn' has no attribute {name!r}")
    return getattr(import_module(module), name)
