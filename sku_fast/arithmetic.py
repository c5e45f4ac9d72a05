"""Task-vector arithmetic over safetensors checkpoints, streamed by the native engine.

    out = base + Σ wᵢ·(tunedᵢ − base)        negation: one tuned model with w = −λ

This module plans the work (which tensor of which file, with which terms, goes where in the
output) and hands each output file to `sku_fast._C.combine`, which reads and writes in bounded
chunks with a pool of threads: memory stays flat whatever the model size. A tuned input may be a
PEFT LoRA adapter directory; its deltas `scaling·B·A` are merged row block by row block without
ever forming a whole dense delta. No torch import on this path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sku_fast import _C
from sku_fast.checkpoint import (
    FLOAT_DTYPES,
    INDEX_NAME,
    ITEMSIZE,
    SINGLE_NAME,
    Checkpoint,
    SafetensorsFile,
    TensorEntry,
    check_compatible,
    check_tensor,
    open_checkpoint,
    read_file,
)
from sku_fast.errors import CheckpointError

PathLike = str | os.PathLike
Progress = Callable[[int, int], None]  # (output bytes written, total output bytes)

_DTYPE_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16",
    "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
    "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
    "f64": "F64", "fp64": "F64", "float64": "F64", "double": "F64",
}  # fmt: skip
# weight files of other formats are not copied beside the result: they would hold stale weights
_OTHER_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
)


def parse_dtype(dtype: str | None) -> str | None:
    """'bf16', 'bfloat16', 'BF16'... -> the safetensors name; None keeps each base tensor's."""
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"unknown output dtype {dtype!r}; use one of bf16, f16, f32, f64")
    return name


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Terms:
    """Per base tensor name, the engine terms contributed by the tuned inputs, in input order."""

    by_name: dict[str, list[tuple]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # every input file a term reads from

    def file_index(self, path: Path) -> int:
        if path not in self.files:
            self.files.append(path)
        return self.files.index(path)

    def add(self, name: str, term: tuple) -> None:
        self.by_name.setdefault(name, []).append(term)


def _is_adapter(path: Path) -> bool:
    """sku_fast.lora (and numpy) are imported only for inputs that look like adapters, so that a
    plain negation stays small and starts fast. PEFT saves an adapter not named "default" in a
    subfolder, hence the second pattern."""
    configs = ("adapter_config.json", "*/adapter_config.json")
    if not path.is_dir() or not any(next(path.glob(p), None) for p in configs):
        return False
    from sku_fast import lora

    return lora.is_adapter_dir(path)


def _check_weight(weight: float, where: PathLike) -> float:
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"weight of {where} must be finite, got {weight}")
    return weight


def _add_checkpoint_terms(
    terms: _Terms, base: Checkpoint, tuned: Checkpoint, weight: float
) -> None:
    check_compatible(base, tuned)
    for entry in tuned.entries():
        index = terms.file_index(entry.file)
        terms.add(entry.name, ("dense", weight, index, entry.offset, entry.dtype))


def _add_adapter_terms(terms: _Terms, base: Checkpoint, adapter: Path, weight: float) -> None:
    from sku_fast import lora  # numpy only; loaded only for adapters

    base_map = base.tensor_map()
    deltas = lora.adapter_deltas(adapter, {name: e.shape for name, e in base_map.items()})
    headers: dict[str, dict[str, TensorEntry]] = {}
    for name, delta in deltas.items():
        entry = base_map.get(name)
        if entry is None:
            raise CheckpointError(f"{adapter}: adapts tensor {name!r}, which the base lacks")
        if isinstance(delta, lora.ReplacedTensor):
            if delta.path not in headers:
                headers[delta.path] = {e.name: e for e in read_file(delta.path).tensors}
            source = headers[delta.path].get(delta.name)
            if source is None:
                raise CheckpointError(f"{delta.path}: has no tensor {delta.name!r}")
            check_tensor(entry, source.dtype, source.shape, source.file)
            index = terms.file_index(source.file)
            terms.add(name, ("dense", weight, index, source.offset, source.dtype))
        else:
            rows, rank = delta.left.shape
            if len(entry.shape) != 2 or (rows, delta.right.shape[1]) != entry.shape:
                raise CheckpointError(
                    f"{adapter}: delta of {name!r} is {rows}x{delta.right.shape[1]} but the base "
                    f"tensor has shape {list(entry.shape)}"
                )
            terms.add(name, ("low_rank", weight * delta.scaling, delta.left, delta.right))


def _header_bytes(metadata: dict[str, str], tensors: dict[str, dict]) -> bytes:
    """The 8-byte little-endian length and the JSON header, padded with spaces to 8 bytes as
    the safetensors writer does."""
    content = {"__metadata__": metadata, **tensors} if metadata else tensors
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _plan_file(
    source: SafetensorsFile, terms: _Terms, dtype: str | None, inputs: list[Path]
) -> tuple[bytes, list[tuple], int]:
    """Header bytes, engine jobs and data bytes of the output file that mirrors `source`."""
    header: dict[str, dict] = {}
    layout = []
    offset = 0
    for entry in source.tensors:
        out_dtype = dtype if dtype is not None and entry.dtype in FLOAT_DTYPES else entry.dtype
        nbytes = entry.numel * ITEMSIZE[out_dtype]
        header[entry.name] = {
            "dtype": out_dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        layout.append((entry, out_dtype, offset))
        offset += nbytes
    header_bytes = _header_bytes(source.metadata, header)
    base_index = inputs.index(source.path)
    jobs = []
    for entry, out_dtype, data_offset in layout:
        job_terms = terms.by_name.get(entry.name, [])
        if entry.dtype not in FLOAT_DTYPES:
            if entry.dtype.startswith("F8") and job_terms:
                raise CheckpointError(
                    f"{entry.file}: tensor {entry.name!r}: arithmetic on {entry.dtype} is not "
                    "supported"
                )
            job_terms = []  # integers and bools are copied from the base
        cols = entry.shape[-1] if entry.shape else 1
        jobs.append(
            (
                entry.name, entry.numel, cols, base_index, entry.offset, entry.dtype,
                out_dtype, len(header_bytes) + data_offset, job_terms,
            )
        )  # fmt: skip
    return header_bytes, jobs, offset


def _check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Never write into, over or around an input."""
    target = out.resolve()
    for path in inputs:
        resolved = {path.resolve(), path.absolute()}
        for inp in resolved:
            if target == inp or inp in target.parents:
                raise CheckpointError(f"output {out} is the input {path} or inside it")
            if target in inp.parents:
                raise CheckpointError(f"output {out} contains the input {path}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"output {out} already exists (use --overwrite to replace it)")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_side_files(base: Checkpoint, staging: Path) -> None:
    """config.json, tokenizer files and the like, so the result loads with from_pretrained.
    A base given as a file has side files only if it is a model directory's model.safetensors
    (any other file's neighbours are unrelated)."""
    if base.kind == "file" and base.path.name != SINGLE_NAME:
        return
    for path in sorted(base.directory.iterdir()):
        if not path.is_file() or path.name == INDEX_NAME:
            continue
        if path.name.startswith(".") or path.suffix in _OTHER_WEIGHT_SUFFIXES:
            continue
        shutil.copyfile(path, staging / path.name)
        _fsync_path(staging / path.name)


def _replace(staging: Path, out: Path) -> None:
    """Move the finished output into place; an existing output is moved aside first and removed
    only after the new one is in place."""
    aside = None
    if out.exists() or out.is_symlink():
        aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, aside)
    os.rename(staging, out)
    _fsync_path(out.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()


def task_arithmetic(
    base: PathLike,
    tuned: Sequence[tuple[PathLike, float]],
    out: PathLike,
    *,
    dtype: str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write `out = base + Σ wᵢ·(tunedᵢ − base)` without loading any model into memory.

    base: a .safetensors file, a directory with model.safetensors, or a sharded directory.
    tuned: (path, weight) pairs; a path is a checkpoint like the base (same tensor names, shapes
        and dtypes) or a PEFT LoRA adapter directory, whose delta is `scaling·B·A`.
    out: a directory laid out like the base (same shard files and index, the base's config and
        tokenizer files copied), or a single file when the base is a file and `out` ends in
        .safetensors.
    dtype: output dtype of the floating tensors (bf16, f16, f32, f64); default: each base
        tensor's. Arithmetic is fp32 (fp64 for F64), rounded once; integer and bool tensors are
        copied from the base.
    threads: worker threads (default: all available cores).
    progress: called with (bytes written, total bytes) about every 100 ms.

    The output appears atomically; inputs are never modified. Raises CheckpointError naming the
    file, the tensor and the problem; on error no output is left behind.
    """
    out = Path(out)
    dtype = parse_dtype(dtype)
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if not tuned:
        raise ValueError("task_arithmetic needs at least one (tuned, weight) pair")
    tuned = [(Path(path), _check_weight(weight, path)) for path, weight in tuned]

    base_path = Path(base)
    if _is_adapter(base_path):
        raise CheckpointError(f"{base_path}: the base must be a full checkpoint, not an adapter")
    base_ckpt = open_checkpoint(base_path)
    sources: list[tuple[Path, Checkpoint | None, float]] = []  # None: a LoRA adapter
    input_paths = [base_path, *(file.path for file in base_ckpt.files)]
    for path, weight in tuned:
        checkpoint = None if _is_adapter(path) else open_checkpoint(path)
        sources.append((path, checkpoint, weight))
        input_paths.append(path)
        if checkpoint is not None:
            input_paths += [file.path for file in checkpoint.files]
    _check_output(out, input_paths, overwrite)

    terms = _Terms(files=[file.path for file in base_ckpt.files])
    for path, checkpoint, weight in sources:
        if checkpoint is None:
            _add_adapter_terms(terms, base_ckpt, path, weight)
        else:
            _add_checkpoint_terms(terms, base_ckpt, checkpoint, weight)

    single_file = base_ckpt.kind == "file" and out.suffix == ".safetensors"
    plans = []
    for source in base_ckpt.files:
        name = source.path.name if base_ckpt.kind != "file" else SINGLE_NAME
        plans.append((name, *_plan_file(source, terms, dtype, terms.files)))
    total = sum(len(header) + size for _, header, _, size in plans)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if not single_file:
            staging.mkdir()
        written = 0
        for name, header, jobs, size in plans:
            target = staging if single_file else staging / name
            offset = written
            report = (lambda done, o=offset: progress(o + done, total)) if progress else None
            try:
                _C.combine(
                    str(target), header, [str(p) for p in terms.files], jobs, threads, report
                )
            except CheckpointError as error:  # name the output the user asked for
                raise CheckpointError(str(error).replace(str(staging), str(out))) from None
            written += len(header) + size
        if not single_file:
            _write_index(base_ckpt, staging, sum(size for *_, size in plans))
            _copy_side_files(base_ckpt, staging)
            _fsync_path(staging)
        _replace(staging, out)
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()
        raise
    if progress is not None:
        progress(total, total)
    return out


def _write_index(base: Checkpoint, staging: Path, data_bytes: int) -> None:
    if base.index is None:
        return
    index = dict(base.index)
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": data_bytes}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    _fsync_path(staging / INDEX_NAME)


def negate(
    base: PathLike,
    tuned: PathLike,
    out: PathLike,
    scale: float = 1.0,
    *,
    dtype: str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write `out = base − scale·(tuned − base)` (SKU's knowledge negation, λ = scale).

    `tuned` is a checkpoint like the base or a PEFT LoRA adapter directory. Same options and
    guarantees as `task_arithmetic`.
    """
    scale = _check_weight(scale, "scale")
    return task_arithmetic(
        base,
        [(tuned, -scale)],
        out,
        dtype=dtype,
        threads=threads,
        overwrite=overwrite,
        progress=progress,
    )
