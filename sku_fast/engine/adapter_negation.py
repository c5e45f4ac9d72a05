"""`negate_lora`: the negated LoRA adapter itself. `lora_B` scaled by −λ gives `θ_o − λ·τ` once
merged: a few MB instead of a whole model.

The adapter file is written by the streaming engine (`sku_fast._C.combine`), like every other
output of sku-fast: each `lora_B` is a job whose base is weighted −λ, each tensor stored whole
is `base − λ·(tuned − base)` against the base model's tensor, the rest is copied. So memory is
bounded by the engine's chunks whatever the size of a tensor, and every result is computed in
fp32 (fp64 with F64) and rounded once by the same code as a whole-model negation.
"""

from __future__ import annotations

import os
from pathlib import Path

from sku_fast import _C
from sku_fast.engine.adapter import (
    ADAPTER_WEIGHTS,
    Adapter,
    BaseModel,
    check_against_base,
    is_adapter_dir,
    load_adapter,
)
from sku_fast.engine.checkpoint import (
    FLOAT_DTYPES,
    TensorEntry,
    check_output_parent,
    encode_header,
    open_checkpoint,
    path_kind,
)
from sku_fast.engine.limits import check_weight
from sku_fast.engine.output import check_output, copy_file, write_atomically
from sku_fast.errors import CheckpointError


def _jobs(
    adapter: Adapter,
    base_map: dict[str, TensorEntry],
    scale: float,
    header_size: int,
    files: list[Path],
) -> list[_C.Job]:
    """One engine job per tensor of the adapter file, in its order (inputs: `files`)."""
    b_keys = {mod.b for mod in adapter.modules.values()}
    replaced = {key: name for name, key in adapter.replaced.items()}

    def index(path: Path) -> int:
        if path not in files:
            files.append(path)
        return files.index(path)

    jobs, offset = [], header_size
    for e in adapter.weights.tensors:
        own = {"name": e.name, "numel": e.numel, "cols": e.shape[-1] if e.shape else 1,
               "out_dtype": e.dtype, "out_offset": offset}  # fmt: skip
        if e.name in replaced:
            theta = base_map[replaced[e.name]]
            _check_whole(e, theta)
            term = _C.DenseTerm(weight=-scale, input=index(e.file), offset=e.offset, dtype=e.dtype)
            jobs.append(_C.Job(**own, base_input=index(theta.file), base_offset=theta.offset,
                               base_dtype=theta.dtype, terms=[term]))  # fmt: skip
        else:
            weight = -scale if e.name in b_keys else 1.0
            jobs.append(_C.Job(**own, base_input=index(e.file), base_offset=e.offset,
                               base_dtype=e.dtype, base_weight=weight))  # fmt: skip
        offset += e.nbytes
    return jobs


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
    `scale` (λ) is positive and at most 1000 (ValueError otherwise). The engine streams every
    tensor in bounded chunks, so memory does not grow with their size. The input is never
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
    check_output_parent(out)

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

    header, _ = encode_header(
        weights.metadata, [(e.name, e.dtype, e.shape) for e in weights.tensors]
    )
    files: list[Path] = []
    jobs = _jobs(adapter_, base_map, scale, len(header), files)

    def write(tmp: Path) -> None:
        for f in sorted(adapter_.directory.iterdir()):
            if f.name != ADAPTER_WEIGHTS and path_kind(f) == "file":
                _copy_input(f, tmp / f.name)
        target = tmp / ADAPTER_WEIGHTS
        try:
            _C.combine(str(target), header, [str(f) for f in files], jobs, 1, None)
        except CheckpointError as error:  # name the output the user asked for
            error.args = (str(error).replace(str(tmp), str(out)),)
            raise

    write_atomically(out, write)
    return out


def _copy_input(src: Path, dst: Path) -> None:
    """copy_file, with a failure to read `src` named as such (not as a failed output)."""
    try:
        copy_file(src, dst)
    except OSError as error:
        if error.filename is None or os.fspath(error.filename) != os.fspath(src):
            raise
        raise CheckpointError(f"{src}: cannot read: {error.strerror or error}") from error


def _check_whole(e: TensorEntry, base: TensorEntry) -> None:
    if base.dtype not in FLOAT_DTYPES or e.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{e.file}: tensor {e.name!r} is {e.dtype} and base {base.name!r} is "
            f"{base.dtype}; only float tensors can be negated"
        )
