"""Bad inputs: every case is one clear CheckpointError naming the file (and tensor), with no
output left behind and the inputs unchanged. Headers are written by hand, byte for byte."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sku_fast import _C
from sku_fast.engine.arithmetic import negate, task_arithmetic
from sku_fast.engine.checkpoint import INDEX_NAME, read_file
from sku_fast.errors import CheckpointError


def raw_file(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, JSON text or raw bytes) and its data section."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    size = len(header) if length is None else length
    return struct.pack("<Q", size) + header + data


def tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# a valid two-tensor F32 file: "a" [2, 3] then "b" [4]
GOOD_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": tensor("F32", [2, 3], 0, 24),
    "b": tensor("F32", [4], 24, 40),
}
GOOD_DATA = struct.pack("<10f", *range(10))
GOOD = raw_file(GOOD_HEADER, GOOD_DATA)


def with_tensors(**tensors) -> dict:
    return {"__metadata__": {"format": "pt"}, **tensors}


# id -> (file bytes, message pattern)
CORPUS = {
    "empty_file": (b"", r"file is 0 bytes, too short"),
    "truncated_header_length": (b"\x10\x00\x00", r"file is 3 bytes, too short"),
    "truncated_data": (GOOD[:-5], r"tensors end at data byte 40 but the data section has 35 bytes"),
    "header_past_end": (
        raw_file(GOOD_HEADER, GOOD_DATA, length=10_000),
        r"header length 10000 runs past the end",
    ),
    "header_over_100MB": (
        raw_file(b"{}", b"", length=100_000_001),
        r"header length 100000001 exceeds the 100 MB limit",
    ),
    "invalid_json": (raw_file('{"a": {"dtype": "F32", ', b""), r"invalid JSON header at byte \d+"),
    "not_utf8": (raw_file(b'{"\xff": 1}', b""), r"invalid UTF-8"),
    "not_an_object": (raw_file("[1, 2]", b""), r"header is not a JSON object"),
    "duplicate_keys": (
        raw_file(
            '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
        ),
        r'duplicate key "a"',
    ),
    "duplicate_inner_keys": (
        raw_file(
            '{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
        ),
        r'duplicate key "dtype"',
    ),
    "unknown_dtype": (
        raw_file(with_tensors(a=tensor("F12", [1], 0, 4)), b"\0" * 4),
        r'tensor "a": unknown dtype "F12"',
    ),
    "shape_bytes_mismatch": (
        raw_file(with_tensors(a=tensor("F32", [2, 3], 0, 20)), b"\0" * 20),
        r'tensor "a": shape x dtype size is 24 bytes but data_offsets span 20',
    ),
    "shape_overflow": (
        raw_file(with_tensors(a=tensor("F32", [2**62, 2**62], 0, 4)), b"\0" * 4),
        r'tensor "a": shape x dtype size overflows 64 bits',
    ),
    "negative_dim": (
        raw_file(with_tensors(a=tensor("F32", [-1], 0, 4)), b"\0" * 4),
        r"shape entry -1 is not a non-negative",
    ),
    "offsets_reversed": (
        raw_file(with_tensors(a=tensor("F32", [0], 8, 4)), b"\0" * 8),
        r"end before they begin",
    ),
    "overlapping_offsets": (
        raw_file(with_tensors(a=tensor("F32", [2], 0, 8), b=tensor("F32", [2], 4, 12)), b"\0" * 12),
        r'tensor "b": data_offsets begin at 4 but the previous tensor ends at 8 \(overlap\)',
    ),
    "gapped_offsets": (
        raw_file(
            with_tensors(a=tensor("F32", [2], 0, 8), b=tensor("F32", [2], 12, 20)), b"\0" * 20
        ),
        r'tensor "b": data_offsets begin at 12 but the previous tensor ends at 8 \(gap\)',
    ),
    "trailing_bytes": (
        GOOD + b"\0" * 3,
        r"tensors end at data byte 40 but the data section has 43 bytes \(trailing",
    ),
    "missing_field": (
        raw_file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        r'tensor "a": entry needs',
    ),
    "metadata_not_strings": (
        raw_file({"__metadata__": {"format": 1}}, b""),
        r"__metadata__ value of \"format\"",
    ),
    "no_tensors": (raw_file(b"{}", b""), r"holds no tensors; not a model checkpoint"),
    "metadata_only": (raw_file({"__metadata__": {"format": "pt"}}, b""), r"holds no tensors"),
    "git_lfs_pointer": (
        b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 538970112\n",
        r"is a Git LFS pointer file, not the weights",
    ),
}


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_refused(tmp_path: Path, call, pattern: str, inputs: list[Path]) -> None:
    before = digest(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=pattern):
        call()
    # nothing new next to the inputs (no output, no temporary), inputs byte for byte the same
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert digest(tmp_path) == before
    for path in inputs:
        assert path.exists()


@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
@pytest.mark.parametrize("role", ["base", "tuned"])
def test_corrupt_file_refused(tmp_path, case, role):
    content, pattern = CORPUS[case]
    bad = tmp_path / "bad.safetensors"
    good = tmp_path / "good.safetensors"
    bad.write_bytes(content)
    good.write_bytes(GOOD)
    base, tuned = (bad, good) if role == "base" else (good, bad)
    # the message starts with the broken file's path
    assert_refused(
        tmp_path,
        lambda: negate(base, tuned, tmp_path / "out"),
        "^" + str(bad).replace(".", r"\.") + ": .*" + pattern,
        [base, tuned],
    )


def write_good(path: Path, header: dict = GOOD_HEADER, data: bytes = GOOD_DATA) -> Path:
    path.write_bytes(raw_file(header, data))
    return path


MISMATCHES = {
    "missing_tensor": (
        with_tensors(a=tensor("F32", [2, 3], 0, 24)),
        b"\0" * 24,
        r"lacks tensor 'b'",
    ),
    "extra_tensor": (
        with_tensors(
            a=tensor("F32", [2, 3], 0, 24),
            b=tensor("F32", [4], 24, 40),
            c=tensor("F32", [1], 40, 44),
        ),
        b"\0" * 44,
        r"has tensor 'c' that the base .* lacks",
    ),
    "renamed_tensor": (
        with_tensors(a=tensor("F32", [2, 3], 0, 24), B=tensor("F32", [4], 24, 40)),
        b"\0" * 40,
        r"lacks tensor 'b'",
    ),
    "shape": (
        with_tensors(a=tensor("F32", [3, 2], 0, 24), b=tensor("F32", [4], 24, 40)),
        b"\0" * 40,
        r"tensor 'a' has shape \[3, 2\] but the base \(.*base\.safetensors\) has \[2, 3\]",
    ),
    "dtype": (
        with_tensors(a=tensor("F32", [2, 3], 0, 24), b=tensor("F16", [4], 24, 32)),
        b"\0" * 32,
        r"tensor 'b' has dtype F16 but the base \(.*base\.safetensors\) has F32",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES), ids=list(MISMATCHES))
def test_mismatched_inputs_refused(tmp_path, case):
    header, data, pattern = MISMATCHES[case]
    base = write_good(tmp_path / "base.safetensors")
    tuned = write_good(tmp_path / "tuned.safetensors", header, data)
    assert_refused(tmp_path, lambda: negate(base, tuned, tmp_path / "out"), pattern, [base, tuned])


def test_second_tuned_model_mismatch_refused(tmp_path):
    base = write_good(tmp_path / "base.safetensors")
    ok = write_good(tmp_path / "ok.safetensors")
    header, data, _ = MISMATCHES["shape"]
    bad = write_good(tmp_path / "bad.safetensors", header, data)
    assert_refused(
        tmp_path,
        lambda: task_arithmetic(base, [(ok, 0.5), (bad, 0.5)], tmp_path / "out"),
        r"bad\.safetensors: tensor 'a' has shape",
        [base, ok, bad],
    )


def make_dir_checkpoint(root: Path) -> Path:
    root.mkdir()
    write_good(root / "model.safetensors")
    (root / "config.json").write_text("{}")
    return root


@pytest.mark.parametrize(
    "target",
    ["base_dir", "base_file", "inside_base", "deep_inside_base", "tuned_dir", "contains_inputs"],
)
def test_output_equal_to_inside_or_around_an_input_refused(tmp_path, target):
    base = make_dir_checkpoint(tmp_path / "base")
    tuned = make_dir_checkpoint(tmp_path / "tuned")
    out = {
        "base_dir": base,
        "base_file": base / "model.safetensors",
        "inside_base": base / "negated",
        "deep_inside_base": base / "a" / "b",
        "tuned_dir": tuned,
        "contains_inputs": tmp_path,
    }[target]
    pattern = (
        r"contains the input" if target == "contains_inputs" else r"is the input .* or inside it"
    )
    assert_refused(
        tmp_path,
        lambda: negate(base, tuned, out, overwrite=True),
        pattern,
        [base, tuned],
    )


def test_output_through_a_symlink_to_an_input_refused(tmp_path):
    base = make_dir_checkpoint(tmp_path / "base")
    link = tmp_path / "link"
    link.symlink_to(base)
    assert_refused(
        tmp_path, lambda: negate(base, base, link, overwrite=True), r"is the input", [base]
    )


def existing_output(tmp_path: Path) -> Path:
    """An earlier output, which a refused or failed run must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


def test_existing_output_needs_overwrite(tmp_path):
    base = write_good(tmp_path / "base.safetensors")
    out = existing_output(tmp_path)
    assert_refused(
        tmp_path,
        lambda: negate(base, base, out),
        r"output .*out already exists \(use --overwrite",
        [base],
    )
    assert (out / "keep.txt").read_text() == "mine"
    negate(base, base, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "out"]


def test_failed_write_keeps_the_previous_output(tmp_path, monkeypatch):
    import sku_fast.engine.arithmetic as arithmetic

    def disk_full(base, staging):
        (staging / "config.json").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arithmetic, "_copy_side_files", disk_full)
    base = make_dir_checkpoint(tmp_path / "base")
    out = existing_output(tmp_path)
    assert_refused(
        tmp_path,
        lambda: negate(base, base, out, overwrite=True),
        r"out: cannot write the output: No space left on device",
        [base],
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("failure", ["writer_interrupted", "rename_into_place", "fsync_parent"])
def test_atomic_write_failures_put_the_old_output_back(tmp_path, monkeypatch, failure):
    """Whatever fails, and whenever, the previous output is back as it was and no temporary
    is left beside it."""
    from sku_fast.engine import output

    out = existing_output(tmp_path)
    real_rename, real_fsync = os.rename, output.fsync_path

    def rename(src, dst):
        if failure == "rename_into_place" and Path(src).name.startswith(".out.sku-fast-tmp-"):
            raise OSError(18, "Invalid cross-device link")
        real_rename(src, dst)

    def fsync_path(path):
        if failure == "fsync_parent" and path == tmp_path:
            raise OSError(5, "Input/output error")
        real_fsync(path)

    def write(tmp: Path) -> None:
        (tmp / "new.txt").write_text("new")
        if failure == "writer_interrupted":
            raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "rename", rename)
    monkeypatch.setattr(output, "fsync_path", fsync_path)
    expected = {
        "writer_interrupted": (KeyboardInterrupt, None),
        "rename_into_place": (CheckpointError, r"out: cannot write the output: Invalid cross"),
        "fsync_parent": (CheckpointError, r"out: cannot write the output: Input/output error"),
    }[failure]
    with pytest.raises(expected[0], match=expected[1]):
        output.write_atomically(out, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_arguments_are_value_errors(tmp_path):
    base = write_good(tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match=r"unknown output dtype 'int8'"):
        negate(base, base, tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match=r"threads must be at least 1, got 0"):
        negate(base, base, tmp_path / "out", threads=0)
    with pytest.raises(ValueError, match=r"needs at least one"):
        task_arithmetic(base, [], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


@pytest.mark.parametrize(
    "scale, message",
    [
        (float("inf"), r"scale must be finite, got inf"),
        (float("nan"), r"scale must be finite, got nan"),
        (1e39, r"scale must be at most 1000, got 1e\+39: larger weights are not meaningful"),
        (-0.5, r"scale must be positive, got -0\.5: .*a negative λ would add it.*`sku-fast arith"),
        (0, r"scale must be positive, got 0"),
    ],
)
def test_negation_scale_is_finite_positive_and_bounded(tmp_path, scale, message):
    """λ = 1e39 used to write inf everywhere; a negative λ silently added the task vector."""
    base = write_good(tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match=message):
        negate(base, base, tmp_path / "out", scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


@pytest.mark.parametrize("weight", [1e39, -1001.0, float("-inf"), float("nan")])
def test_arithmetic_weights_are_finite_and_bounded(tmp_path, weight):
    base = write_good(tmp_path / "base.safetensors")
    tuned = write_good(tmp_path / "tuned.safetensors")
    pattern = rf"weight of {tuned} must be (finite|in \[-1000, 1000\]), got "
    with pytest.raises(ValueError, match=pattern):
        task_arithmetic(base, [(tuned, 0.5), (tuned, weight)], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tuned.safetensors"]
    task_arithmetic(base, [(tuned, -1000.0), (tuned, 1000)], tmp_path / "out")  # the bounds


def test_missing_inputs_refused(tmp_path):
    base = write_good(tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match=r"nope: no such file or directory"):
        negate(base, tmp_path / "nope", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: found 0 \.safetensors files and no"):
        negate(empty, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# A process whose files may not grow past LIMIT bytes: writes fail with EFBIG like a full disk.
FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from sku_fast.engine.arithmetic import negate
    from sku_fast.errors import CheckpointError
    limit = int(sys.argv[4])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        negate(sys.argv[1], sys.argv[2], sys.argv[3], threads=2)
    except CheckpointError as error:
        print("CheckpointError:", error)
        sys.exit(3)
    """
)


def test_full_disk_leaves_nothing_behind(tmp_path):
    # two shards: the first (small) is written completely, the second hits the size limit
    root = tmp_path / "base"
    root.mkdir()
    small = with_tensors(a=tensor("F32", [256], 0, 1024))
    big = with_tensors(b=tensor("F32", [256, 1024], 0, 1 << 20))
    (root / "model-1.safetensors").write_bytes(raw_file(small, os.urandom(1024)))
    (root / "model-2.safetensors").write_bytes(raw_file(big, os.urandom(1 << 20)))
    index = {"metadata": {}, "weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (root / INDEX_NAME).write_text(json.dumps(index))
    before = digest(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(root), str(root), str(tmp_path / "out"),
         str(600_000)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    out = tmp_path / "out" / "model-2.safetensors"
    assert f'CheckpointError: {out}: writing tensor "b": File too large' in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert digest(tmp_path) == before


def test_no_space_left_on_a_small_tmpfs(tmp_path):
    """A real ENOSPC: needs permission to mount a tmpfs (root here and on CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT test covers failing writes")
    try:
        base = tmp_path / "base.safetensors"
        header = with_tensors(w=tensor("F32", [512, 1024], 0, 2 << 20))
        base.write_bytes(raw_file(header, b"\0" * (2 << 20)))
        pattern = r'small/out/model\.safetensors: writing tensor "w": No space left'
        with pytest.raises(CheckpointError, match=pattern):
            negate(base, base, mount / "out")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- property-based: mutated headers only ever give CheckpointError --------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def mutated_files(draw) -> bytes:
    kind = draw(st.sampled_from(["byte", "truncate", "insert", "length", "field", "entry"]))
    header = json.dumps(GOOD_HEADER).encode()
    if kind == "byte":
        blob = bytearray(GOOD)
        position = draw(st.integers(0, 8 + len(header) - 1))
        blob[position] = draw(st.integers(0, 255))
        return bytes(blob)
    if kind == "truncate":
        return GOOD[: draw(st.integers(0, len(GOOD) - 1))]
    if kind == "insert":
        position = draw(st.integers(0, len(GOOD)))
        return GOOD[:position] + draw(st.binary(min_size=1, max_size=16)) + GOOD[position:]
    if kind == "length":
        return raw_file(header, GOOD_DATA, length=draw(st.integers(0, 2**64 - 1)))
    mutated = json.loads(header)
    name = draw(st.sampled_from(["a", "b", "__metadata__"]))
    if kind == "field" and name != "__metadata__":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        mutated[name][field] = draw(JSON_VALUES)
    else:
        mutated[name] = draw(JSON_VALUES)
    return raw_file(json.dumps(mutated), GOOD_DATA)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=mutated_files())
def test_mutated_headers_only_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(content)
    try:
        parsed = read_file(path)
    except CheckpointError as error:
        assert str(error).startswith(str(path)), str(error)
        return
    # accepted: then it must really tile the file, and the engine must cope with it
    end = len(content)
    spans = sorted((t.offset, t.offset + t.nbytes) for t in parsed.tensors)
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        assert stop == start
    if spans:
        assert spans[-1][1] == end
    out = tmp_path / "out"
    with contextlib.suppress(CheckpointError):
        negate(path, path, out, overwrite=True)


# --- the engine commands on hostile inputs: one line `Error: ...`, exit 1, nothing left behind ---

LORA_A, LORA_B = "base_model.model.a.lora_A.weight", "base_model.model.a.lora_B.weight"
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["a"]}


def engine_inputs(root: Path) -> None:
    """base/ (config.json + model.safetensors), tuned.safetensors and adapter/ (a rank-1 LoRA
    adapter on the base's "a" [2, 3]), all written by hand."""
    base = root / "base"
    base.mkdir()
    header = with_tensors(
        **{"a.weight": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [4], 24, 40)}
    )
    write_good(base / "model.safetensors", header)
    (base / "config.json").write_text('{"model_type": "llama"}')
    write_good(root / "tuned.safetensors", header, GOOD_DATA[::-1])
    adapter = root / "adapter"
    adapter.mkdir()
    header = {LORA_A: tensor("F32", [1, 3], 0, 12), LORA_B: tensor("F32", [2, 1], 12, 20)}
    data = struct.pack("<5f", 0.5, -1, 2, 0.25, 3)
    (adapter / "adapter_model.safetensors").write_bytes(raw_file(header, data))
    (adapter / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))


def _chmod(path: str, mode: int):
    return lambda root: (root / path).chmod(mode)


def _fifo(path: str):
    return lambda root: os.mkfifo(root / path)


def _replace_with(path: str, make):
    def setup(root: Path) -> None:
        target = root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        make(target)

    return setup


def _config(**changes):
    return lambda root: (root / "adapter/adapter_config.json").write_text(
        json.dumps(ADAPTER_CONFIG | changes)
    )


def _config_bytes(content: bytes):
    return lambda root: (root / "adapter/adapter_config.json").write_bytes(content)


def _file(path: str, content: bytes = b"x"):
    return lambda root: (root / path).write_bytes(content)


def _dir(path: str):
    return lambda root: (root / path).mkdir(parents=True)


def _link(path: str, target: str):
    return lambda root: (root / path).symlink_to(target)


NEGATE = ["negate", "{base}", "{tuned}", "{out}"]
NEGATE_ADAPTER = ["negate", "{base}", "{adapter}", "{out}"]
NEGATE_LORA = ["negate-lora", "{adapter}", "{out}"]
ARITHMETIC = ["arithmetic", "{base}", "{out}", "--add", "{tuned}:0.5"]
# id -> (setup, command, message pattern after "Error: ", needs file permissions to bite)
HOSTILE = {
    "base_unreadable_file": (
        _chmod("base/model.safetensors", 0),
        NEGATE,
        r"\S*base/model\.safetensors: cannot open: Permission denied",
        True,
    ),
    "base_unreadable_folder": (
        _chmod("base", 0),
        NEGATE,
        r"\S*base/model\.safetensors\.index\.json: cannot access: Permission denied",
        True,
    ),
    "base_side_file_unreadable": (
        _chmod("base/config.json", 0),
        NEGATE,
        r"\S*base/config\.json: cannot read: Permission denied",
        True,
    ),
    "base_side_file_unreadable_arithmetic": (
        _chmod("base/config.json", 0),
        ARITHMETIC,
        r"\S*base/config\.json: cannot read: Permission denied",
        True,
    ),
    "tuned_unreadable_file": (
        _chmod("tuned.safetensors", 0),
        NEGATE,
        r"\S*tuned\.safetensors: cannot open: Permission denied",
        True,
    ),
    "tuned_in_a_locked_folder": (
        lambda root: (
            _dir("locked")(root),
            _file("locked/t.safetensors", GOOD)(root),
            _chmod("locked", 0)(root),
        ),
        ["negate", "{base}", "{root}/locked/t.safetensors", "{out}"],
        r"\S*locked/t\.safetensors: (cannot access: )?Permission denied",
        True,
    ),  # fmt: skip
    "adapter_config_unreadable": (
        _chmod("adapter/adapter_config.json", 0),
        NEGATE_LORA,
        r"\S*adapter/adapter_config\.json: cannot read: Permission denied",
        True,
    ),
    "adapter_config_unreadable_negate": (
        _chmod("adapter/adapter_config.json", 0),
        NEGATE_ADAPTER,
        r"\S*adapter/adapter_config\.json: cannot read: Permission denied",
        True,
    ),
    "adapter_weights_unreadable": (
        _chmod("adapter/adapter_model.safetensors", 0),
        NEGATE_LORA,
        r"\S*adapter/adapter_model\.safetensors: cannot open: Permission denied",
        True,
    ),
    "adapter_weights_unreadable_negate": (
        _chmod("adapter/adapter_model.safetensors", 0),
        NEGATE_ADAPTER,
        r"\S*adapter/adapter_model\.safetensors: cannot open: Permission denied",
        True,
    ),
    "adapter_folder_unreadable": (
        _chmod("adapter", 0),
        NEGATE_LORA,
        r"\S*adapter/adapter_config\.json: cannot access: Permission denied",
        True,
    ),
    "adapter_folder_unreadable_negate": (
        _chmod("adapter", 0),
        NEGATE_ADAPTER,
        r"\S*adapter/model\.safetensors\.index\.json: cannot access: Permission denied",
        True,
    ),
    "out_on_a_read_only_folder": (
        lambda root: (_dir("ro")(root), _chmod("ro", 0o555)(root)),
        ["negate", "{base}", "{tuned}", "{root}/ro/out"],
        r"\S*ro/out: cannot write the output: Permission denied",
        True,
    ),
    "out_on_a_read_only_folder_negate_lora": (
        lambda root: (_dir("ro")(root), _chmod("ro", 0o555)(root)),
        ["negate-lora", "{adapter}", "{root}/ro/out"],
        r"\S*ro/out: cannot write the output: Permission denied",
        True,
    ),
    "out_on_a_read_only_folder_arithmetic": (
        lambda root: (_dir("ro")(root), _chmod("ro", 0o555)(root)),
        ["arithmetic", "{base}", "{root}/ro/deep/out", "--add", "{tuned}:0.5"],
        r"\S*ro/deep/out: cannot write the output: Permission denied",
        True,
    ),
    # a directory where a file is expected
    "base_weights_are_a_directory": (
        _replace_with("base/model.safetensors", Path.mkdir),
        NEGATE,
        r"\S*base/model\.safetensors: is a directory, expected a file",
        False,
    ),
    "base_index_is_a_directory": (
        _dir("base/model.safetensors.index.json"),
        NEGATE,
        r"\S*base/model\.safetensors\.index\.json: is a directory, expected a file",
        False,
    ),
    "shard_is_a_directory": (
        lambda root: (
            _file(
                "base/model.safetensors.index.json",
                b'{"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}',
            )(root),
            _dir("base/s.safetensors")(root),
        ),
        NEGATE,
        r"\S*base/s\.safetensors: is a directory, expected a file",
        False,
    ),  # fmt: skip
    "adapter_config_is_a_directory": (
        _replace_with("adapter/adapter_config.json", Path.mkdir),
        NEGATE_LORA,
        r"\S*adapter/adapter_config\.json: is a directory, expected a file \(the adapter config\)",
        False,
    ),
    "adapter_weights_are_a_directory": (
        _replace_with("adapter/adapter_model.safetensors", Path.mkdir),
        NEGATE_ADAPTER,
        r"\S*adapter/adapter_model\.safetensors: is a directory, expected a file",
        False,
    ),
    "tuned_below_a_file": (
        None,
        ["negate", "{base}", "{tuned}/x", "{out}"],
        r"\S*tuned\.safetensors/x: no such file or directory",
        False,
    ),
    # FIFOs and devices: refused without opening them (opening a FIFO would block)
    "base_is_a_fifo": (
        _fifo("pipe"),
        ["negate", "{root}/pipe", "{tuned}", "{out}"],
        r"\S*pipe: not a regular file or directory \(a FIFO, device or socket\)",
        False,
    ),
    "tuned_is_a_fifo": (
        _fifo("pipe"),
        ["arithmetic", "{base}", "{out}", "--add", "{root}/pipe:1"],
        r"\S*pipe: not a regular file or directory \(a FIFO, device or socket\)",
        False,
    ),
    "base_is_dev_zero": (
        None,
        ["negate", "/dev/zero", "{tuned}", "{out}"],
        r"/dev/zero: not a regular file or directory \(a FIFO, device or socket\)",
        False,
    ),
    "tuned_links_to_dev_zero": (
        _link("zero.safetensors", "/dev/zero"),
        ["negate", "{base}", "{root}/zero.safetensors", "{out}"],
        r"\S*zero\.safetensors: not a regular file or directory",
        False,
    ),
    "base_weights_are_dev_zero": (
        _replace_with("base/model.safetensors", lambda p: p.symlink_to("/dev/zero")),
        NEGATE,
        r"\S*base/model\.safetensors: not a regular file \(a FIFO, device or socket\)",
        False,
    ),
    "adapter_is_a_fifo": (
        _fifo("pipe"),
        ["negate-lora", "{root}/pipe", "{out}"],
        r"\S*pipe: not a directory; a PEFT adapter is a directory",
        False,
    ),
    "adapter_is_dev_zero": (
        None,
        ["negate-lora", "/dev/zero", "{out}"],
        r"/dev/zero: not a directory; a PEFT adapter is a directory",
        False,
    ),
    "adapter_config_is_a_fifo": (
        _replace_with("adapter/adapter_config.json", os.mkfifo),
        NEGATE_ADAPTER,
        r"\S*adapter_config\.json: not a regular file \(a FIFO, device or socket\)",
        False,
    ),
    "adapter_weights_are_a_fifo": (
        _replace_with("adapter/adapter_model.safetensors", os.mkfifo),
        NEGATE_LORA,
        r"\S*adapter_model\.safetensors: not a regular file \(a FIFO, device or socket\)",
        False,
    ),
    "adapter_weights_are_dev_zero": (
        _replace_with("adapter/adapter_model.safetensors", lambda p: p.symlink_to("/dev/zero")),
        NEGATE_ADAPTER,
        r"\S*adapter_model\.safetensors: not a regular file \(a FIFO, device or socket\)",
        False,
    ),
    "lora_base_is_a_fifo": (
        _fifo("pipe"),
        ["negate-lora", "{adapter}", "{out}", "--base", "{root}/pipe"],
        r"\S*pipe: not a regular file or directory \(a FIFO, device or socket\)",
        False,
    ),
    "lora_base_is_dev_zero": (
        None,
        ["negate-lora", "{adapter}", "{out}", "--base", "/dev/zero"],
        r"/dev/zero: not a regular file or directory",
        False,
    ),
    # adapter_config.json that is not UTF-8 / not an object / not JSON
    "adapter_config_not_utf8": (
        _config_bytes(b'{"peft_type": "\xc3\x28"}'),
        NEGATE_LORA,
        r"\S*adapter_config\.json: not UTF-8 text \(invalid continuation byte at byte 15\)",
        False,
    ),
    "adapter_config_not_an_object": (
        _config_bytes(b'"LORA"'),
        NEGATE_ADAPTER,
        r"\S*adapter_config\.json: adapter config is not a JSON object \(got str\)",
        False,
    ),
    "adapter_config_empty": (
        _config_bytes(b""),
        NEGATE_LORA,
        r"\S*adapter_config\.json: invalid JSON: Expecting value at line 1 column 1",
        False,
    ),
    "adapter_config_nan_literal": (
        _config_bytes(b'{"peft_type": "LORA", "r": 1, "lora_alpha": NaN}'),
        NEGATE_ADAPTER,
        r"\S*adapter_config\.json: lora_alpha is NaN: not a finite number",
        False,
    ),
    # OUT
    "out_below_a_file": (
        _file("afile"),
        ["negate", "{base}", "{tuned}", "{root}/afile/out"],
        r"output \S*afile/out: \S*afile is not a folder",
        False,
    ),
    "out_below_a_file_negate_lora": (
        _file("afile"),
        ["negate-lora", "{adapter}", "{root}/afile/deep/out"],
        r"output \S*afile/deep/out: \S*afile is not a folder",
        False,
    ),
    "out_below_a_file_arithmetic": (
        _file("afile"),
        ["arithmetic", "{base}", "{root}/afile/out", "--add", "{tuned}:0.5"],
        r"output \S*afile/out: \S*afile is not a folder",
        False,
    ),
    "out_name_too_long": (
        None,
        ["negate", "{base}", "{tuned}", "{root}/" + "o" * 300],
        r"output name o{40}\.\.\. is 300 bytes; file systems allow 255: choose a shorter name",
        False,
    ),
    "out_name_too_long_negate_lora": (
        None,
        ["negate-lora", "{adapter}", "{root}/" + "é" * 128],
        r"output name é{40}\.\.\. is 256 bytes; file systems allow 255",
        False,
    ),
    # numbers: finite, |w| ≤ 1000, λ > 0
    "scale_1e39": (
        None,
        [*NEGATE, "--scale", "1e39"],
        r"scale must be at most 1000, got 1e\+39: larger weights are not meaningful task-vector "
        r"weights \(λ is usually 0\.1–10\) and overflow half-precision outputs",
        False,
    ),
    "scale_nan": (None, [*NEGATE, "--scale", "nan"], r"scale must be finite, got nan", False),
    "scale_negative": (
        None,
        [*NEGATE_ADAPTER, "--scale", "-0.5"],
        r"scale must be positive, got -0\.5: .* use `sku-fast arithmetic BASE OUT --add "
        r"TUNED:WEIGHT` \(task_arithmetic\)",
        False,
    ),
    "scale_zero": (None, [*NEGATE, "--scale", "0"], r"scale must be positive, got 0", False),
    "lora_scale_1e39": (
        None,
        [*NEGATE_LORA, "--scale", "1e39"],
        r"scale must be at most 1000, got 1e\+39",
        False,
    ),
    "lora_scale_negative": (
        None,
        [*NEGATE_LORA, "--scale", "-1"],
        r"scale must be positive, got -1",
        False,
    ),
    "lora_scale_infinite": (
        None,
        [*NEGATE_LORA, "--scale", "inf"],
        r"scale must be finite, got inf",
        False,
    ),
    "add_weight_1e39": (
        None,
        ["arithmetic", "{base}", "{out}", "--add", "{tuned}:1e39"],
        r"weight of \S*tuned\.safetensors must be in \[-1000, 1000\], got 1e\+39: larger weights",
        False,
    ),
    "add_weight_minus_infinity": (
        None,
        ["arithmetic", "{base}", "{out}", "--add", "{tuned}:-inf"],
        r"weight of \S*tuned\.safetensors must be finite, got -inf",
        False,
    ),
    "add_adapter_weight_nan": (
        None,
        ["arithmetic", "{base}", "{out}", "--add", "{adapter}:nan"],
        r"weight of \S*adapter must be finite, got nan",
        False,
    ),
}
# adapter_config.json with a wrong type in each field the engine reads, through both commands
WRONG_TYPES = {
    "peft_type": (5, r"peft_type is 5; only LoRA adapters are supported"),
    "r": ("1", r"r must be a positive integer, got '1'"),
    "lora_alpha": ([2], r"lora_alpha must be a number, got \[2\]"),
    "use_rslora": ("yes", r"use_rslora must be true or false, got 'yes'"),
    "fan_in_fan_out": (0, r"fan_in_fan_out must be true or false, got 0"),
    "use_dora": ("false", r"use_dora must be true or false, got 'false'"),
    "use_qalora": (1, r"use_qalora must be true or false, got 1"),
    "lora_bias": ("no", r"lora_bias must be true or false, got 'no'"),
    "rank_pattern": ("a", r"rank_pattern must map module patterns to values, got 'a'"),
    "alpha_pattern": ([1], r"alpha_pattern must map module patterns to values, got \[1\]"),
    "init_lora_weights": (1.5, r"init_lora_weights must be true, false or the name of an init"),
}
for field, (value, message) in WRONG_TYPES.items():
    for command, name in ((NEGATE_LORA, "negate_lora"), (NEGATE_ADAPTER, "negate")):
        HOSTILE[f"config_{field}_{name}"] = (
            _config(**{field: value}),
            command,
            r"\S*adapter/adapter_config\.json: " + message,
            False,
        )


def _drop_file_permission_override() -> None:
    """In the child before exec: root's powers over file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) leave the bounding set, so the command meets permissions as any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: its kind, mode and size, and its bytes' digest when readable."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            entry = (st.st_mode, st.st_size)
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            out[str(path.relative_to(root))] = entry
    return out


def run_engine_command(args: list[str], unprivileged: bool) -> tuple[int, str]:
    """(exit status, everything printed) of `sku-fast ARGS`: in-process, or in a subprocess
    that cannot override file permissions even as root."""
    if not unprivileged:
        from click.testing import CliRunner

        from sku_fast.cli import main

        result = CliRunner().invoke(main, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a traceback: fails the test with it
        return result.exit_code, result.output
    import sku_fast

    env = dict(os.environ, PYTHONPATH=str(Path(sku_fast.__file__).parents[1]))
    try:
        result = subprocess.run(
            [sys.executable, "-c", "from sku_fast.cli import main; main()", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None,
        )
    except subprocess.SubprocessError as error:
        pytest.skip(f"cannot drop root's permission override here: {error}")
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_engine_commands_refuse_hostile_inputs_in_one_line(tmp_path, case):
    setup, command, pattern, unprivileged = HOSTILE[case]
    root = tmp_path / "inputs"
    root.mkdir()
    engine_inputs(root)
    if setup is not None:
        setup(root)
    paths = {
        "root": root,
        "base": root / "base",
        "tuned": root / "tuned.safetensors",
        "adapter": root / "adapter",
        "out": root / "out",
    }
    args = [arg.format(**paths) for arg in command] + ["--quiet"]  # no progress bar
    before = snapshot(root)
    try:
        status, printed = run_engine_command(args, unprivileged)
    finally:
        for folder, dirs, files in os.walk(root):  # give pytest its files back
            for name in dirs + files:
                path = Path(folder) / name
                if not path.is_symlink():
                    path.chmod(0o755 if path.is_dir() else 0o644)
    lines = printed.strip().splitlines()
    assert status == 1 and len(lines) == 1, printed
    assert re.match(r"Error: " + pattern, lines[0]), lines[0]
    assert "Traceback" not in printed
    after = snapshot(root)
    for path in set(before) | set(after):  # nothing added, nothing changed but the modes reset
        assert path in before and path in after, path
        assert before[path][1:] == after[path][1:] or len(before[path]) == 2, path


def test_a_250_character_output_name_works(tmp_path):
    """Long, but within NAME_MAX: written (temporaries fit too), nothing else left."""
    engine_inputs(tmp_path)
    out = tmp_path / ("o" * 250)
    for args in (
        ["negate", tmp_path / "base", tmp_path / "adapter", out, "-q"],
        ["negate-lora", tmp_path / "adapter", out, "-q", "--overwrite"],
    ):
        status, printed = run_engine_command([str(a) for a in args], unprivileged=False)
        assert status == 0 and printed == "", printed
        assert out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapter", "base", "tuned.safetensors", out.name]
    )


def test_absurd_thread_counts_are_usage_errors(tmp_path):
    engine_inputs(tmp_path)
    args = ["negate", tmp_path / "base", tmp_path / "tuned.safetensors", tmp_path / "out"]
    status, printed = run_engine_command([*map(str, args), "--threads", "10**11"], False)
    assert status == 2 and "Traceback" not in printed
    status, printed = run_engine_command([*map(str, args), "--threads", str(10**11)], False)
    assert status == 2 and "is not in the range 1<=x<=4096" in printed, printed
    assert not (tmp_path / "out").exists()


def test_engine_errors_carry_their_kind(tmp_path):
    """_C.EngineError (a CheckpointError, message as before) says what sort of problem it met:
    "format" for a broken file, "io" for one the operating system refuses."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(CORPUS["invalid_json"][0])
    with pytest.raises(_C.EngineError, match=r"bad\.safetensors: invalid JSON header") as error:
        _C.read_header(str(bad))
    assert error.value.kind == "format"
    assert isinstance(error.value, CheckpointError)

    with pytest.raises(_C.EngineError, match=r"missing\.safetensors: cannot open") as error:
        _C.read_header(str(tmp_path / "missing.safetensors"))
    assert error.value.kind == "io"


def _copy_jobs(path: Path) -> tuple[bytes, list]:
    """The header bytes and the _C.Job list that copy the file at `path` as it is."""
    header = _C.read_header(str(path))
    data_start = header["data_start"]
    jobs = [
        _C.Job(
            name=name,
            numel=math.prod(shape),
            base_input=0,
            base_offset=data_start + begin,
            base_dtype=dtype,
            out_dtype=dtype,
            out_offset=data_start + begin,
        )
        for name, dtype, shape, begin, _ in header["tensors"]
    ]
    return path.read_bytes()[:data_start], jobs


def test_combine_errors_carry_their_kind_and_name_file_and_tensor(tmp_path):
    good = write_good(tmp_path / "good.safetensors")
    header, jobs = _copy_jobs(good)
    _C.combine(str(tmp_path / "copy.safetensors"), header, [str(good)], jobs, 2, None)
    assert (tmp_path / "copy.safetensors").read_bytes() == good.read_bytes()

    # the file was cut short after it was planned: a format error naming the file and tensor
    good.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(_C.EngineError) as error:
        _C.combine(str(tmp_path / "short.safetensors"), header, [str(good)], jobs, 1, None)
    assert error.value.kind == "format"
    assert str(error.value).startswith(f'{good}: reading tensor "b": unexpected end of file')

    # an input that is gone, an output directory that is gone: the OS refuses, "io"
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(_C.EngineError, match=f"^{missing}: cannot open: ") as error:
        _C.combine(str(tmp_path / "o.safetensors"), header, [str(missing)], jobs, 1, None)
    assert error.value.kind == "io"
    out = tmp_path / "gone" / "out.safetensors"
    with pytest.raises(_C.EngineError, match=f"^{out}: cannot open: ") as error:
        _C.combine(str(out), header, [str(good)], jobs, 1, None)
    assert error.value.kind == "io"


MEMORY_SCRIPT = """
import json, re, resource, struct, sys
from pathlib import Path
from sku_fast import _C
path, threads, headroom = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = struct.pack("<262144f", *range(262144))  # 1 MiB: one work item
header = json.dumps({"w": {"dtype": "F32", "shape": [262144], "data_offsets": [0, 1 << 20]}})
path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data)
start = _C.read_header(str(path))["data_start"]
job = _C.Job(name="w", numel=262144, base_input=0, base_offset=start, base_dtype="F32",
             out_dtype="F32", out_offset=start,
             terms=[_C.DenseTerm(weight=-1.0, input=0, offset=start, dtype="F32")])
size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + headroom, resource.RLIM_INFINITY))
try:
    _C.combine(str(path) + ".out", path.read_bytes()[:start], [str(path)], [job], threads, None)
except _C.EngineError as error:
    print(error.kind + "|" + str(error))
"""


@pytest.mark.parametrize("threads", [1, 4])
def test_out_of_memory_is_a_memory_error_that_says_what_to_do(tmp_path, threads):
    """Under an address-space limit: with 4 threads the workers cannot start; with one, the
    worker starts (its stack fits) and the chunk's buffers do not."""
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    if stack == resource.RLIM_INFINITY:
        pytest.skip("unlimited stack size: thread stacks have no predictable size")
    headroom = 1 << 20 if threads > 1 else stack + (600 << 10)
    path = tmp_path / "m.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), str(threads), str(headroom)],
        capture_output=True,
        text=True,
        check=True,
    )
    kind, message = done.stdout.strip().split("|", 1)
    assert kind == "memory"
    if threads > 1:
        assert message.startswith(f"{path}.out: cannot start 4 threads (")
        assert message.endswith("); run with fewer threads")
    else:
        assert message.startswith(f'{path}.out: out of memory while computing tensor "w" (')
        assert message.endswith("free some memory")


def test_the_kind_survives_the_python_layer(tmp_path, monkeypatch):
    """negate() re-raises the engine's own error (its kind intact), naming the output the user
    asked for, not the temporary one."""
    from sku_fast.engine import arithmetic

    base = write_good(tmp_path / "base.safetensors")
    real_combine = arithmetic._C.combine

    def cut_then_combine(*args):
        base.write_bytes(base.read_bytes()[:-8])  # cut short after planning
        return real_combine(*args)

    monkeypatch.setattr(arithmetic._C, "combine", cut_then_combine)
    with pytest.raises(_C.EngineError) as error:
        negate(base, base, tmp_path / "out.safetensors")
    assert error.value.kind == "format"
    assert "sku-fast-tmp" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]
