"""safetensors checkpoint layouts: single files, single-file directories and sharded directories.

Headers are read and validated by the native core (`sku_fast._C.read_header`, the rules of the
safetensors reference implementation plus a refusal of duplicate keys); this module adds the
layout on top: which files make up a checkpoint, the shard index, the checks across inputs, and
the header bytes of a file to write. Tensor data is read here only whole and one tensor at a
time, for small tensors (`read_tensor_bytes`); nothing imports torch or numpy.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sku_fast import _C
from sku_fast.engine.strict_json import unique_keys
from sku_fast.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# From the native core's dtype table: the dtypes the engine does arithmetic on (every other
# dtype is copied from the base), and the bytes per element of every safetensors dtype.
FLOAT_DTYPES: tuple[str, ...] = _C.FLOAT_DTYPES
ITEMSIZE: dict[str, int] = _C.DTYPES


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; `offset` is the absolute byte offset in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    tensors: tuple[TensorEntry, ...]  # in data order


@dataclass(frozen=True)
class Checkpoint:
    """A model's weights. `kind` is "file", "directory" (one model.safetensors) or "sharded"."""

    path: Path
    kind: str
    files: tuple[SafetensorsFile, ...]
    index: dict | None  # the parsed model.safetensors.index.json of a sharded checkpoint

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "file" else self.path

    def entries(self) -> Iterator[TensorEntry]:
        for file in self.files:
            yield from file.tensors

    def tensor_map(self) -> dict[str, TensorEntry]:
        return {entry.name: entry for entry in self.entries()}


def path_kind(path: Path) -> str:
    """What is at `path`, symlinks followed: "file", "directory", "missing" or "other" (a
    FIFO, a device, a socket). A path that cannot be looked at (in a folder without permission,
    a symlink loop) is refused."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as error:
        raise CheckpointError(f"{path}: cannot access: {error.strerror or error}") from error
    if stat.S_ISREG(mode):
        return "file"
    return "directory" if stat.S_ISDIR(mode) else "other"


def require_file(path: Path, what: str = "file") -> None:
    """Refuse anything but a regular file, saying what is there instead."""
    kind = path_kind(path)
    if kind == "missing":
        raise CheckpointError(f"{path}: no such {what}")
    if kind == "directory":
        raise CheckpointError(f"{path}: is a directory, expected a {what}")
    if kind == "other":
        raise CheckpointError(
            f"{path}: not a regular file (a FIFO, device or socket), expected a {what}"
        )


def check_output_parent(out: Path) -> None:
    """The folders above an output are folders (or missing, to be made): a file there would
    only show up as an obscure "File exists" when the output is written."""
    for parent in Path(out).parents:
        kind = path_kind(parent)
        if kind == "directory":
            return
        if kind != "missing":
            raise CheckpointError(f"output {out}: {parent} is not a folder")


def read_file(path: str | os.PathLike) -> SafetensorsFile:
    """Read and validate one .safetensors header (raises CheckpointError)."""
    path = Path(path)
    require_file(path)
    header = _C.read_header(str(path))
    start = header["data_start"]
    tensors = tuple(
        TensorEntry(name, dtype, tuple(shape), path, start + begin, end - begin)
        for name, dtype, shape, begin, end in header["tensors"]
    )
    return SafetensorsFile(path, dict(header["metadata"]), tensors)


def read_tensor_bytes(entry: TensorEntry) -> bytes:
    """The stored bytes of one tensor, read whole (for small tensors, such as an adapter's)."""
    try:
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.nbytes)
    except OSError as error:
        raise CheckpointError(
            f"{entry.file}: tensor {entry.name!r}: cannot read: {error.strerror or error}"
        ) from error
    except MemoryError:
        raise CheckpointError(
            f"{entry.file}: tensor {entry.name!r}: {entry.nbytes} bytes do not fit in memory"
        ) from None
    if len(raw) != entry.nbytes:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r}: file shrank while reading")
    return raw


def encode_header(
    metadata: dict[str, str], tensors: Iterable[tuple[str, str, Sequence[int]]]
) -> tuple[bytes, list[tuple[int, int]]]:
    """The start of a safetensors file holding `tensors` (name, dtype, shape) back to back in
    this order: the 8-byte little-endian length and the JSON header, padded with spaces to 8
    bytes as the safetensors writer does; and each tensor's data offsets [begin, end)."""
    header: dict[str, dict] = {}
    spans = []
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = ITEMSIZE[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        spans.append((offset, offset + nbytes))
        offset += nbytes
    content = {"__metadata__": metadata, **header} if metadata else header
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, spans


def _load_index(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        index = json.loads(raw, object_pairs_hook=unique_keys(path))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: invalid JSON: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f'{path}: needs a "weight_map" of tensor name -> shard file name')
    if not weight_map:
        raise CheckpointError(f"{path}: the weight_map is empty; a checkpoint without tensors")
    for shard in set(weight_map.values()):
        # shards live beside the index; a path in the name could point anywhere
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{path}: shard name {shard!r} is not a plain file name")
    return index


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .safetensors file, a directory holding model.safetensors (or one .safetensors
    file), or a sharded directory with model.safetensors.index.json; validate every header and
    the index (every listed tensor in its shard, every shard tensor listed)."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "file":
        return _non_empty(Checkpoint(path, "file", (read_file(path),), None))
    if kind == "missing":
        raise CheckpointError(f"{path}: no such file or directory")
    if kind == "other":
        raise CheckpointError(
            f"{path}: not a regular file or directory (a FIFO, device or socket); expected a "
            ".safetensors file or a model directory"
        )
    index_path = path / INDEX_NAME
    if path_kind(index_path) != "missing":
        require_file(index_path)
        index = _load_index(index_path)
        weight_map: dict[str, str] = index["weight_map"]
        shard_names = list(dict.fromkeys(weight_map.values()))
        files = []
        for name in shard_names:
            if path_kind(path / name) == "missing":
                raise CheckpointError(f"{index_path}: shard {name} does not exist")
            files.append(read_file(path / name))
        for file in files:
            for entry in file.tensors:
                listed = weight_map.get(entry.name)
                if listed != file.path.name:
                    raise CheckpointError(
                        f"{file.path}: tensor {entry.name!r} is not listed for this shard in "
                        f"{INDEX_NAME} (listed: {listed})"
                    )
        present = {entry.name for file in files for entry in file.tensors}
        for name, shard in weight_map.items():
            if name not in present:
                raise CheckpointError(
                    f"{path / shard}: tensor {name!r} listed in the index is missing"
                )
        return _non_empty(Checkpoint(path, "sharded", tuple(files), index))
    if path_kind(path / SINGLE_NAME) != "missing":
        return _non_empty(Checkpoint(path, "directory", (read_file(path / SINGLE_NAME),), None))
    try:
        candidates = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    except OSError as error:
        raise CheckpointError(f"{path}: cannot list: {error.strerror or error}") from error
    candidates = [p for p in candidates if path_kind(p) == "file"]
    if len(candidates) == 1:
        return _non_empty(Checkpoint(path, "directory", (read_file(candidates[0]),), None))
    raise CheckpointError(
        f"{path}: found {len(candidates)} .safetensors files and no {INDEX_NAME}; expected "
        f"{SINGLE_NAME}, a single .safetensors file or a sharded checkpoint"
    )


def _non_empty(checkpoint: Checkpoint) -> Checkpoint:
    """A checkpoint holds tensors: a header of `{}` is a valid safetensors file, but negating
    or merging it would write an empty model without a word."""
    for file in checkpoint.files:
        if not file.tensors:
            raise CheckpointError(f"{file.path}: holds no tensors; not a model checkpoint")
    return checkpoint


def check_tensor(
    base: TensorEntry,
    dtype: str,
    shape: tuple[int, ...],
    where: Path,
    *,
    convert_floats: bool = False,
) -> None:
    """A tuned tensor must match its base tensor in dtype and shape; with `convert_floats`, a
    float tensor on a float base may have another float dtype (the engine converts it)."""
    if tuple(shape) != base.shape:
        raise CheckpointError(
            f"{where}: tensor {base.name!r} has shape {list(shape)} but the base "
            f"({base.file}) has {list(base.shape)}"
        )
    floats = dtype in FLOAT_DTYPES and base.dtype in FLOAT_DTYPES
    if dtype != base.dtype and not (convert_floats and floats):
        raise CheckpointError(
            f"{where}: tensor {base.name!r} has dtype {dtype} but the base ({base.file}) has "
            f"{base.dtype}"
        )


def check_compatible(base: Checkpoint, tuned: Checkpoint) -> None:
    """Same tensor names, shapes and dtypes (shard layouts may differ)."""
    base_map = base.tensor_map()
    tuned_map = tuned.tensor_map()
    missing = sorted(set(base_map) - set(tuned_map))
    extra = sorted(set(tuned_map) - set(base_map))
    if missing:
        raise CheckpointError(
            f"{tuned.path}: lacks tensor {missing[0]!r} of the base {base.path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        raise CheckpointError(
            f"{tuned.path}: has tensor {extra[0]!r} that the base {base.path} lacks"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name, entry in tuned_map.items():
        check_tensor(base_map[name], entry.dtype, entry.shape, entry.file)
