"""The streaming task-vector engine: safetensors layouts and validation, task arithmetic and
negation over checkpoints of any size, PEFT LoRA adapters, atomic output. Needs the native
extension (and numpy for adapters), never torch or transformers. Names are imported lazily so
that a plain negation does not even load numpy."""

from importlib import import_module

_EXPORTS = {
    "negate": "sku_fast.engine.arithmetic",
    "task_arithmetic": "sku_fast.engine.arithmetic",
    "negate_lora": "sku_fast.engine.adapter_negation",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sku_fast.engine' has no attribute {name!r}")
    return getattr(import_module(module), name)
