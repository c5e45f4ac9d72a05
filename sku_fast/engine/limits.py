"""The numbers a user gives the engine, checked where they enter, with the reason in the message.

A task-vector weight (λ of a negation, a weight of `arithmetic --add`) is a small number: the
SKU paper uses λ ≈ 1, model merging uses 0.1–2. Weights far beyond that are not meaningful
task-vector weights, and they overflow half-precision outputs (bf16/f16 task vectors are ~1e-3,
f16 tops out at 65504), so |w| ≤ MAX_WEIGHT. A LoRA alpha is a small positive number too
(usually r or 2r), so a config's alphas are finite and in (0, MAX_LORA_ALPHA].
"""

from __future__ import annotations

import math
import os

MAX_WEIGHT = 1000.0
MAX_LORA_ALPHA = 1e6

_WHY_BOUNDED = (
    "larger weights are not meaningful task-vector weights (λ is usually 0.1–10) and overflow "
    "half-precision outputs"
)


def check_weight(value: float, what: str | os.PathLike, *, negation: bool = False) -> float:
    """A task-vector weight as a float: finite and |w| ≤ MAX_WEIGHT; with `negation` (λ of
    `negate` / `negate_lora`) also > 0. `what` names it: "scale", or the tuned input's path
    (then the message says "weight of PATH"). Raises ValueError with the value and the reason."""
    name = "scale" if negation else f"weight of {what}"
    try:
        weight = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(weight):
        raise ValueError(f"{name} must be finite, got {weight}")
    if negation and weight <= 0:
        raise ValueError(
            f"scale must be positive, got {weight:g}: λ is how much of the task vector to remove; "
            "a negative λ would add it. To add a task vector use `sku-fast arithmetic BASE OUT "
            "--add TUNED:WEIGHT` (task_arithmetic)"
        )
    if abs(weight) > MAX_WEIGHT:
        bound = f"at most {MAX_WEIGHT:g}" if negation else f"in [{-MAX_WEIGHT:g}, {MAX_WEIGHT:g}]"
        raise ValueError(f"{name} must be {bound}, got {weight:g}: {_WHY_BOUNDED}")
    return weight
