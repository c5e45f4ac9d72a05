"""Checkpoint layouts and the native header reader against the safetensors library itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sku_fast import _C
from sku_fast.engine.checkpoint import (
    INDEX_NAME,
    ITEMSIZE,
    check_compatible,
    check_tensor,
    encode_header,
    open_checkpoint,
    read_file,
    read_tensor_bytes,
)
from sku_fast.errors import CheckpointError

TENSORS = {
    "embed": np.arange(12, dtype=np.float32).reshape(3, 4),
    "scalar": np.array(2.5, dtype=np.float64),
    "empty": np.zeros((0, 3), dtype=np.float16),
    "ids": np.arange(5, dtype=np.int64),
    "mask": np.array([True, False, True]),
    "small": np.arange(7, dtype=np.int8),
}


def test_header_offsets_point_at_the_tensor_bytes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt", "note": "é ✓"})
    parsed = read_file(path)
    assert parsed.metadata == {"format": "pt", "note": "é ✓"}
    blob = path.read_bytes()
    assert {t.name for t in parsed.tensors} == set(TENSORS)
    offsets = [t.offset for t in parsed.tensors]
    assert offsets == sorted(offsets)  # data order
    for entry in parsed.tensors:
        array = TENSORS[entry.name]
        assert entry.shape == array.shape
        assert entry.nbytes == array.nbytes == entry.numel * ITEMSIZE[entry.dtype]
        assert blob[entry.offset : entry.offset + entry.nbytes] == array.tobytes()
    header = _C.read_header(str(path))
    assert header["file_size"] == len(blob)
    assert header["data_start"] == 8 + int.from_bytes(blob[:8], "little")


SAFETENSORS_DTYPE = {
    "float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "bool": "BOOL",
    "int8": "I8",
}  # fmt: skip


def test_encoded_header_and_tensor_bytes_round_trip(tmp_path):
    """A file written from encode_header reads back with the safetensors library and with
    read_file/read_tensor_bytes; without metadata the header has no __metadata__ key."""
    for metadata in ({"format": "pt", "note": "é"}, {}):
        order = ["small", "embed", "empty", "mask", "scalar", "ids", "modèle"]
        arrays = {**TENSORS, "modèle": np.ones(3, np.float16)}
        tensors = [(n, SAFETENSORS_DTYPE[arrays[n].dtype.name], arrays[n].shape) for n in order]
        header, spans = encode_header(metadata, tensors)
        assert len(header) % 8 == 0 and int.from_bytes(header[:8], "little") == len(header) - 8
        assert (b"__metadata__" in header) == bool(metadata)
        assert spans[0][0] == 0 and [b for b, _ in spans[1:]] == [e for _, e in spans[:-1]]
        path = tmp_path / "written.safetensors"
        path.write_bytes(header + b"".join(arrays[n].tobytes() for n in order))
        loaded = load_file(path)
        for name in order:
            assert loaded[name].dtype == arrays[name].dtype
            assert np.array_equal(loaded[name], arrays[name]), name
        parsed = read_file(path)
        assert parsed.metadata == metadata
        assert [t.name for t in parsed.tensors] == order
        for entry, (begin, end) in zip(parsed.tensors, spans, strict=True):
            assert entry.nbytes == end - begin
            assert read_tensor_bytes(entry) == arrays[entry.name].tobytes()
    path.write_bytes(path.read_bytes()[:-2])  # shrunk after its header was read
    with pytest.raises(CheckpointError, match=r"tensor 'modèle': file shrank while reading"):
        read_tensor_bytes(parsed.tensors[-1])


def test_check_tensor_converts_floats_only_when_asked(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, path)
    entries = {t.name: t for t in read_file(path).tensors}
    embed, ids = entries["embed"], entries["ids"]
    check_tensor(embed, "BF16", (3, 4), path, convert_floats=True)
    with pytest.raises(CheckpointError, match=r"'embed' has dtype BF16 but the base .* has F32"):
        check_tensor(embed, "BF16", (3, 4), path)
    for dtype, shape, pattern in [
        ("F16", (4, 3), r"'embed' has shape \[4, 3\] but the base .* has \[3, 4\]"),
        ("I32", (3, 4), r"'embed' has dtype I32 but the base .* has F32"),
        ("F8_E4M3", (3, 4), r"'embed' has dtype F8_E4M3 but the base .* has F32"),
    ]:
        with pytest.raises(CheckpointError, match=pattern):
            check_tensor(embed, dtype, shape, path, convert_floats=True)
    with pytest.raises(CheckpointError, match=r"'ids' has dtype F32 but the base .* has I64"):
        check_tensor(ids, "F32", (5,), path, convert_floats=True)


def test_unicode_names_and_escapes(tmp_path):
    names = {"modèle.権重": np.ones(2, np.float32), 'quote"back\\slash': np.zeros(1, np.float32)}
    path = tmp_path / "m.safetensors"
    save_file(names, path)
    assert {t.name for t in read_file(path).tensors} == set(names)
    # \u escapes (with a surrogate pair) decode to the same names
    header = json.dumps({"😀x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})
    assert "\\ud83d\\ude00" in header
    raw = tmp_path / "escaped.safetensors"
    raw.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\x07")
    assert [t.name for t in read_file(raw).tensors] == ["😀x"]


def write_sharded(root: Path, shards: dict[str, dict[str, np.ndarray]], index=None) -> Path:
    root.mkdir()
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, root / file)
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map} if index is None else index
    (root / INDEX_NAME).write_text(json.dumps(index) if isinstance(index, dict) else index)
    return root


SHARDS = {
    "model-00001-of-00002.safetensors": {"a": np.ones((2, 2), np.float32)},
    "model-00002-of-00002.safetensors": {"b": np.ones(3, np.float32), "c": np.ones(1, np.int32)},
}


def test_layouts(tmp_path):
    file = tmp_path / "single.safetensors"
    save_file(TENSORS, file)
    assert open_checkpoint(file).kind == "file"
    assert open_checkpoint(file).directory == tmp_path

    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(TENSORS, plain / "model.safetensors")
    assert open_checkpoint(plain).kind == "directory"

    # a directory with one differently named file is a single-file checkpoint too
    other = tmp_path / "other"
    other.mkdir()
    save_file(TENSORS, other / "weights.safetensors")
    assert open_checkpoint(other).files[0].path == other / "weights.safetensors"

    sharded = open_checkpoint(write_sharded(tmp_path / "sharded", SHARDS))
    assert sharded.kind == "sharded"
    assert [f.path.name for f in sharded.files] == list(SHARDS)
    assert sorted(sharded.tensor_map()) == ["a", "b", "c"]


def index_with(**changes) -> dict:
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    weight_map["c"] = "model-00002-of-00002.safetensors"
    return {"weight_map": {**weight_map, **changes}}


BAD_INDEXES = {
    "missing_shard": (
        index_with(a="model-00009.safetensors"),
        r"shard model-00009\.safetensors does not exist",
    ),
    "tensor_not_in_its_shard": (
        index_with(b="model-00001-of-00002.safetensors"),
        r"00002\.safetensors: tensor 'b' is not listed for this shard in .* \(listed: model-00001",
    ),
    "listed_tensor_missing": (
        index_with(zzz="model-00001-of-00002.safetensors"),
        r"tensor 'zzz' listed in the index is missing",
    ),
    "shard_path_escapes": (
        index_with(a="../model.safetensors"),
        r"shard name '\.\./model\.safetensors' is not a plain file name",
    ),
    "no_weight_map": ({"metadata": {}}, r'needs a "weight_map"'),
    "duplicate_key": ('{"weight_map": {}, "weight_map": {}}', r"duplicate key 'weight_map'"),
    "invalid_json": ("{not json", r"invalid JSON"),
    "empty_weight_map": (
        {"metadata": {}, "weight_map": {}},
        r"index\.json: the weight_map is empty",
    ),
    "nested_too_deep": ('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}", r"invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES), ids=list(BAD_INDEXES))
def test_bad_index_refused(tmp_path, case):
    index, pattern = BAD_INDEXES[case]
    root = write_sharded(tmp_path / "m", SHARDS, index=index)
    with pytest.raises(CheckpointError, match=pattern):
        open_checkpoint(root)


@pytest.mark.parametrize("layout", ["file", "directory", "other_name"])
@pytest.mark.parametrize("header", [b"{}", b'{"__metadata__": {"format": "pt"}}'])
def test_checkpoint_without_tensors_refused(tmp_path, layout, header):
    """A header with no tensors is valid safetensors, but not a model: negating or merging it
    would write an empty model without a word."""
    name = "weights.safetensors" if layout == "other_name" else "model.safetensors"
    path = tmp_path / name
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(
        CheckpointError, match=rf"^{path}: holds no tensors; not a model checkpoint"
    ):
        open_checkpoint(path if layout == "file" else tmp_path)


def test_unreadable_index_is_one_error(tmp_path, monkeypatch):
    root = write_sharded(tmp_path / "m", SHARDS)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CheckpointError, match=r"index\.json: cannot read: Permission denied"):
        open_checkpoint(root)


def test_several_files_without_index_refused(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    save_file(TENSORS, root / "a.safetensors")
    save_file(TENSORS, root / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"found 2 \.safetensors files and no"):
        open_checkpoint(root)


def test_compatibility_ignores_shard_layout(tmp_path):
    sharded = open_checkpoint(write_sharded(tmp_path / "sharded", SHARDS))
    merged = tmp_path / "merged.safetensors"
    save_file(
        {
            **SHARDS["model-00001-of-00002.safetensors"],
            **SHARDS["model-00002-of-00002.safetensors"],
        },
        merged,
    )
    check_compatible(sharded, open_checkpoint(merged))
    save_file(
        {"a": np.ones((2, 2), np.float32), "b": np.ones(3, np.float32), "c": np.ones(2, np.int32)},
        merged,
    )
    with pytest.raises(
        CheckpointError, match=r"tensor 'c' has shape \[2\] but the base .* has \[1\]"
    ):
        check_compatible(sharded, open_checkpoint(merged))


def test_one_dtype_table_from_the_native_core():
    """_C.DTYPES and _C.FLOAT_DTYPES come from the C++ table the header reader uses; their
    sizes agree with the dtypes the safetensors library maps each name to."""
    import safetensors.torch

    from sku_fast.engine import checkpoint

    assert checkpoint.ITEMSIZE is _C.DTYPES and checkpoint.FLOAT_DTYPES is _C.FLOAT_DTYPES
    assert _C.FLOAT_DTYPES == ("F16", "BF16", "F32", "F64")
    for name, size in _C.DTYPES.items():
        assert safetensors.torch._TYPES[name].itemsize == size, name
