"""`negate_lora`: the negated LoRA adapter itself. `lora_B` scaled by −λ gives `θ_o − λ·τ` once
merged: a few MB instead of a whole model.

Tensors are streamed: each is read, negated and written in chunks of at most CHUNK_BYTES of
stored data (`os.pread` at file offsets), so memory stays bounded whatever the size of a
`lora_B` or of a whole-stored module. The arithmetic is elementwise, fp32 (fp64 with F64)
rounded once to the tensor's dtype, so chunking changes no bit of the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from sku_fast.engine.adapter import (
    ADAPTER_WEIGHTS,
    NUMPY_DTYPES,
    BaseModel,
    check_against_base,
    is_adapter_dir,
    load_adapter,
)
from sku_fast.engine.checkpoint import (
    FLOAT_DTYPES,
    ITEMSIZE,
    TensorEntry,
    check_output_parent,
    encode_header,
    open_checkpoint,
    path_kind,
)
from sku_fast.engine.limits import check_weight
from sku_fast.engine.output import check_output, copy_file, write_atomically
from sku_fast.errors import CheckpointError

# stored bytes per chunk; a bf16 chunk's fp32 copies and rounding temporaries take ~10× that
CHUNK_BYTES = 4 << 20


def _decode(raw: bytes | bytearray, dtype: str) -> np.ndarray:
    """Stored bytes of a float tensor -> flat fp32 array (fp64 for F64)."""
    a = np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype])
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float64 if dtype == "F64" else np.float32)


def _from_float(x: np.ndarray, dtype: str) -> bytes:
    """fp32/fp64 array -> bytes of `dtype`, rounded once to nearest even (NaN kept)."""
    if dtype != "BF16":
        return np.ascontiguousarray(x, dtype=NUMPY_DTYPES[dtype]).tobytes()
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")
    rounded[np.isnan(x)] = 0x7FC0  # the quiet NaN torch produces
    return rounded.tobytes()


class _Reader:
    """Reads tensors of the input files in chunks at their offsets, one open file each."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def read(self, e: TensorEntry, start: int, count: int) -> bytes:
        """The stored bytes of elements [start, start + count) of `e`."""
        itemsize = ITEMSIZE[e.dtype]
        try:
            fd = self.fds.get(e.file)
            if fd is None:
                fd = self.fds[e.file] = os.open(e.file, os.O_RDONLY)
            raw = os.pread(fd, count * itemsize, e.offset + start * itemsize)
        except OSError as error:
            raise CheckpointError(
                f"{e.file}: tensor {e.name!r}: cannot read: {error.strerror or error}"
            ) from error
        if len(raw) != count * itemsize:
            raise CheckpointError(f"{e.file}: tensor {e.name!r}: file shrank while reading")
        return raw

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _spans(e: TensorEntry) -> Iterator[tuple[int, int]]:
    """(first element, count) of each chunk of `e`."""
    step = max(1, CHUNK_BYTES // ITEMSIZE[e.dtype])
    for start in range(0, e.numel, step):
        yield start, min(step, e.numel - start)


def _write_safetensors(
    path: Path,
    metadata: dict[str, str],
    entries: tuple[TensorEntry, ...],
    produce: Callable[[TensorEntry], Iterable[bytes]],
) -> None:
    """Write `entries` (their dtype and shape, in this order) with the bytes `produce` yields
    for each, chunk by chunk, then fsync."""
    header, _ = encode_header(metadata, [(e.name, e.dtype, e.shape) for e in entries])
    with open(path, "wb") as f:
        f.write(header)
        for e in entries:
            written = 0
            for raw in produce(e):
                f.write(raw)
                written += len(raw)
            assert written == e.nbytes, e.name
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
    `scale` (λ) is positive and at most 1000 (ValueError otherwise). Tensors are streamed in
    bounded chunks, so memory does not grow with their size. The input is never modified; the
    output directory appears atomically. Returns its path.
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

    b_keys = {mod.b for mod in adapter_.modules.values()}
    replaced_keys = {key: name for name, key in adapter_.replaced.items()}
    for key, name in replaced_keys.items():
        _check_whole(adapter_.tensors[key], base_map[name])
    reader = _Reader()

    def produce(e: TensorEntry) -> Iterator[bytes]:
        theta = base_map.get(replaced_keys.get(e.name, ""))
        for start, count in _spans(e):
            raw = reader.read(e, start, count)
            with np.errstate(all="ignore"):  # overflow gives ±inf, as in the engine: no warning
                if e.name in b_keys:
                    raw = _from_float(_decode(raw, e.dtype) * -scale, e.dtype)
                elif theta is not None:
                    base_raw = reader.read(theta, start, count)
                    raw = _negated_whole(e, raw, base_raw, theta, scale)
            yield raw

    def write(tmp: Path) -> None:
        for f in sorted(adapter_.directory.iterdir()):
            if f.name != ADAPTER_WEIGHTS and path_kind(f) == "file":
                _copy_input(f, tmp / f.name)
        _write_safetensors(tmp / ADAPTER_WEIGHTS, weights.metadata, weights.tensors, produce)

    try:
        write_atomically(out, write)
    finally:
        reader.close()
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


def _negated_whole(
    e: TensorEntry, raw: bytes, base_raw: bytes, base: TensorEntry, scale: float
) -> bytes:
    """base − λ·(tuned − base) for a chunk of a tensor stored whole, rounded once to the
    adapter's dtype."""
    wide = np.float64 if "F64" in (e.dtype, base.dtype) else np.float32
    tuned = _decode(raw, e.dtype).astype(wide)
    theta = _decode(base_raw, base.dtype).astype(wide)
    return _from_float(theta - wide(scale) * (tuned - theta), e.dtype)
