"""Plain numpy/torch version of the task-vector engine: the oracle of its tests.

Loads whole tensors (small checkpoints only) and follows the engine's contract literally:
arithmetic in fp32 (fp64 when the base or the output is float64), terms applied in order as
`acc = acc + w·(tuned − base)` or `acc = acc + w·(left @ right)`, with `left @ right` summed over
the rank in fp32, k = 0, 1, ..., and one rounding to the output dtype by torch. Integer and bool
tensors are the base's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# a term's source for one tensor: the tuned tensor, or the (left, right) fp32 factors of a delta
Source = torch.Tensor | tuple[np.ndarray, np.ndarray]


def _low_rank(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    total = np.zeros((left.shape[0], right.shape[1]), dtype=np.float32)
    for k in range(left.shape[1]):
        total = total + np.outer(left[:, k], right[k, :]).astype(np.float32)
    return total


def combine_reference(
    base: Mapping[str, torch.Tensor],
    terms: Sequence[tuple[float, Mapping[str, Source]]],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """`out = base + Σ wᵢ·deltaᵢ` per tensor. terms: (weight, {name: source}); a name missing
    from a term's mapping gets no contribution from it. dtype: output dtype of the floating
    tensors (default: each base tensor's)."""
    out = {}
    for name, b in base.items():
        if b.dtype not in FLOAT_DTYPES:
            out[name] = b.clone()
            continue
        out_dtype = dtype or b.dtype
        wide = torch.float64 in (b.dtype, out_dtype)
        np_dtype = np.float64 if wide else np.float32
        b_np = b.to(torch.float64 if wide else torch.float32).numpy()
        acc = b_np.copy()
        for weight, sources in terms:
            source = sources.get(name)
            if source is None:
                continue
            w = np_dtype(weight)
            if isinstance(source, tuple):
                delta = _low_rank(*source).astype(np_dtype)
            else:
                delta = source.to(torch.float64 if wide else torch.float32).numpy() - b_np
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, as intended
                acc = acc + w * delta
        acc = np.array(acc, dtype=np_dtype).reshape(b.shape)  # 0-d results come back as scalars
        out[name] = torch.from_numpy(acc).to(out_dtype)
    return out
