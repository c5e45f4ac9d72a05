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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sku_fast import _C
from sku_fast.engine.checkpoint import (
    FLOAT_DTYPES,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    SafetensorsFile,
    TensorEntry,
    check_compatible,
    check_tensor,
    encode_header,
    open_checkpoint,
    read_file,
)
from sku_fast.engine.limits import check_weight
from sku_fast.engine.output import check_output, copy_file, fsync_path, write_atomically
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

    by_name: dict[str, list[_C.DenseTerm | _C.LowRankTerm]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # every input file a term reads from

    def file_index(self, path: Path) -> int:
        if path not in self.files:
            self.files.append(path)
        return self.files.index(path)

    def add(self, name: str, term: _C.DenseTerm | _C.LowRankTerm) -> None:
        self.by_name.setdefault(name, []).append(term)


def _is_adapter(path: Path) -> bool:
    """The adapter reader (and numpy) is imported only for inputs that look like adapters, so
    that a plain negation stays small and starts fast. PEFT saves an adapter not named
    "default" in a subfolder, hence the second pattern."""
    configs = ("adapter_config.json", "*/adapter_config.json")
    if not path.is_dir() or not any(next(path.glob(p), None) for p in configs):
        return False
    from sku_fast.engine import adapter as lora

    return lora.is_adapter_dir(path)


def _add_checkpoint_terms(
    terms: _Terms, base: Checkpoint, tuned: Checkpoint, weight: float
) -> None:
    check_compatible(base, tuned)
    for entry in tuned.entries():
        index = terms.file_index(entry.file)
        terms.add(
            entry.name,
            _C.DenseTerm(weight=weight, input=index, offset=entry.offset, dtype=entry.dtype),
        )


def _add_adapter_terms(terms: _Terms, base: Checkpoint, adapter: Path, weight: float) -> None:
    from sku_fast.engine import adapter as lora  # numpy only; loaded only for adapters

    base_map = base.tensor_map()
    deltas = lora.adapter_deltas(adapter, base)  # the checkpoint: dtypes and config.json too
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
            # stored whole (modules_to_save): any float dtype will do, the engine converts it
            check_tensor(entry, source.dtype, source.shape, source.file, convert_floats=True)
            index = terms.file_index(source.file)
            terms.add(
                name,
                _C.DenseTerm(weight=weight, input=index, offset=source.offset, dtype=source.dtype),
            )
        else:
            rows, rank = delta.left.shape
            if len(entry.shape) != 2 or (rows, delta.right.shape[1]) != entry.shape:
                raise CheckpointError(
                    f"{adapter}: delta of {name!r} is {rows}x{delta.right.shape[1]} but the base "
                    f"tensor has shape {list(entry.shape)}"
                )
            terms.add(
                name,
                _C.LowRankTerm(weight=weight * delta.scaling, left=delta.left, right=delta.right),
            )


def _plan_file(
    source: SafetensorsFile, terms: _Terms, dtype: str | None, inputs: list[Path]
) -> tuple[bytes, list[_C.Job], int]:
    """Header bytes, engine jobs and data bytes of the output file that mirrors `source`."""
    out_dtypes = [
        dtype if dtype is not None and entry.dtype in FLOAT_DTYPES else entry.dtype
        for entry in source.tensors
    ]
    header_bytes, spans = encode_header(
        source.metadata,
        [(e.name, d, e.shape) for e, d in zip(source.tensors, out_dtypes, strict=True)],
    )
    base_index = inputs.index(source.path)
    jobs = []
    for entry, out_dtype, (data_offset, _) in zip(source.tensors, out_dtypes, spans, strict=True):
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
            _C.Job(
                name=entry.name,
                numel=entry.numel,
                cols=cols,
                base_input=base_index,
                base_offset=entry.offset,
                base_dtype=entry.dtype,
                out_dtype=out_dtype,
                out_offset=len(header_bytes) + data_offset,
                terms=job_terms,
            )
        )
    return header_bytes, jobs, spans[-1][1] if spans else 0


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
        copy_file(path, staging / path.name)


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
    tuned = [(Path(path), check_weight(weight, path)) for path, weight in tuned]

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
    check_output(out, input_paths, overwrite)

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

    def write(staging: Path) -> None:
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
                error.args = (str(error).replace(str(staging), str(out)),)
                raise  # the same exception: its kind (format, io, memory) crosses unchanged
            written += len(header) + size
        if not single_file:
            _write_index(base_ckpt, staging, sum(size for *_, size in plans))
            _copy_side_files(base_ckpt, staging)

    write_atomically(out, write, directory=not single_file)
    if progress is not None:
        progress(total, total)
    return out


def _write_index(base: Checkpoint, staging: Path, data_bytes: int) -> None:
    if base.index is None:
        return
    index = dict(base.index)
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": data_bytes}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    fsync_path(staging / INDEX_NAME)


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
    scale = check_weight(scale, "scale", negation=True)
    return task_arithmetic(
        base,
        [(tuned, -scale)],
        out,
        dtype=dtype,
        threads=threads,
        overwrite=overwrite,
        progress=progress,
    )
