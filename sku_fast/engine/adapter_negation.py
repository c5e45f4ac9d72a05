"""`negate_lora`: the negated LoRA adapter itself. `lora_B` scaled by −λ gives `θ_o − λ·τ` once
merged: a few MB instead of a whole model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sku_fast.engine.adapter import (
    ADAPTER_WEIGHTS,
    NUMPY_DTYPES,
    BaseModel,
    check_against_base,
    is_adapter_dir,
    load_adapter,
    to_float,
)
from sku_fast.engine.checkpoint import (
    FLOAT_DTYPES,
    TensorEntry,
    encode_header,
    open_checkpoint,
    read_tensor_bytes,
)
from sku_fast.engine.limits import check_weight
from sku_fast.engine.output import check_output, copy_file, write_atomically
from sku_fast.errors import CheckpointError


def _from_float(x: np.ndarray, dtype: str) -> bytes:
    """fp32/fp64 array -> bytes of `dtype`, rounded once to nearest even (NaN kept)."""
    if dtype != "BF16":
        return np.ascontiguousarray(x, dtype=NUMPY_DTYPES[dtype]).tobytes()
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")
    rounded[np.isnan(x)] = 0x7FC0  # the quiet NaN torch produces
    return rounded.tobytes()


def _write_safetensors(
    path: Path,
    metadata: dict[str, str],
    entries: tuple[TensorEntry, ...],
    produce: Callable[[TensorEntry], bytes],
) -> None:
    """Write `entries` (their dtype and shape, in this order) with the bytes `produce` gives
    for each, one tensor in memory at a time, then fsync."""
    header, _ = encode_header(metadata, [(e.name, e.dtype, e.shape) for e in entries])
    with open(path, "wb") as f:
        f.write(header)
        for e in entries:
            raw = produce(e)
            assert len(raw) == e.nbytes, e.name
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- negation


def negate_lora(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    scale: float = 1.0,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the negated LoRA adapter: merged onto the base it gives `θ_o − scale·τ`.

    Every `lora_B` / `lora_embedding_B` is multiplied by `−scale` (fp32, rounded once to its
    dtype); other tensors, adapter_config.json and the other files are copied unchanged. Tensors
    stored whole (`modules_to_save`, biases trained with bias="all"/"lora_only") become
    `base − scale·(tuned − base)`, which needs the base values: pass `base` (a .safetensors file,
    or a model directory, sharded or not) for those adapters; otherwise CheckpointError says so.
    `scale` (λ) is positive and at most 1000 (ValueError otherwise). The input is never
    modified; the output directory appears atomically. Returns its path.
    """
    scale = check_weight(scale, "scale", negation=True)
    out = Path(out)
    adapter_ = load_adapter(adapter)
    weights = adapter_.weights
    inputs = [Path(adapter), adapter_.directory, weights.path]
    base_map: dict[str, TensorEntry] = {}
    if base is not None:
        if is_adapter_dir(base):
            raise CheckpointError(f"{base}: the base must be a full checkpoint, not an adapter")
        base_ckpt = open_checkpoint(base)
        inputs += [Path(base), *(file.path for file in base_ckpt.files)]
        base_map = base_ckpt.tensor_map()
    check_output(out, inputs, overwrite)

    if base is not None:
        check_against_base(adapter_, BaseModel.of(base_ckpt))
    elif adapter_.replaced:
        names = sorted(adapter_.replaced)
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise CheckpointError(
            f"{weights.path}: stores tensors whole (modules_to_save or trained biases: {shown}); "
            "their negation base − λ·(tuned − base) needs the base model: pass base=PATH "
            "(CLI: --base PATH)"
        )

    b_keys = {mod.b for mod in adapter_.modules.values()}
    replaced_keys = {key: name for name, key in adapter_.replaced.items()}

    def produce(e: TensorEntry) -> bytes:
        raw = read_tensor_bytes(e)
        if e.name in b_keys:
            return _from_float(to_float(raw, e) * -scale, e.dtype)
        if e.name in replaced_keys:
            return _negated_whole(e, raw, base_map[replaced_keys[e.name]], scale)
        return raw

    def write(tmp: Path) -> None:
        for f in sorted(adapter_.directory.iterdir()):
            if f.is_file() and f.name != ADAPTER_WEIGHTS:
                copy_file(f, tmp / f.name)
        _write_safetensors(tmp / ADAPTER_WEIGHTS, weights.metadata, weights.tensors, produce)

    write_atomically(out, write)
    return out


def _negated_whole(e: TensorEntry, raw: bytes, base: TensorEntry, scale: float) -> bytes:
    """base − λ·(tuned − base) for a tensor stored whole, rounded once to the adapter's dtype."""
    if base.dtype not in FLOAT_DTYPES or e.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{e.file}: tensor {e.name!r} is {e.dtype} and base {base.name!r} is "
            f"{base.dtype}; only float tensors can be negated"
        )
    wide = np.float64 if "F64" in (e.dtype, base.dtype) else np.float32
    tuned = to_float(raw, e).astype(wide)
    theta = to_float(read_tensor_bytes(base), base).astype(wide)
    return _from_float(theta - wide(scale) * (tuned - theta), e.dtype)
