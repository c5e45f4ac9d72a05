"""Bad input to `sku-fast unlearn` is one line naming the file, field or option, exits 1 and
leaves nothing behind; the data loader and the settings loader are fuzzed with hypothesis."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model_dir

from sku_fast.cli import main
from sku_fast.errors import ConfigError, DataError
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.data import load_qa_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _unlearn(tmp_path: Path, *args) -> str:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["unlearn", "--out", str(out), *map(str, args), "-q", "--no-samples"]
    )
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert not out.exists()
    return result.output


def _file(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_DATA = {
    "not-utf8": ("h.jsonl", b'{"prompt": "caf\xe9", "answer": "x"}\n', "is not UTF-8 text"),
    "not-utf8-csv": ("h.csv", b"prompt,answer\ncaf\xe9,x\n", "is not UTF-8 text"),
    "broken-json-line": ("h.jsonl", '{"prompt": "p", "answer": "a"}\n{x\n', ":2: not valid JSON"),
    "scalar-json": ("h.json", "42", "JSON must be a list of rows, not int"),
    "rows-not-objects": ("h.jsonl", "[1, 2]\n", "rows must be objects, got list"),
    "unknown-extension": ("h.txt", "hello", "unknown extension '.txt'"),
    "no-usable-pair": ("h.jsonl", '{"prompt": "", "answer": ""}\n', "no usable question/answer"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file(tiny, tmp_path, case):
    name, content, message = BAD_DATA[case]
    data = _file(tmp_path, name, content)
    assert message in _unlearn(tmp_path, "--model", tiny, "--harmful", data)


@pytest.mark.parametrize("special", ["dev-zero", "fifo", "empty-folder"])
def test_special_files_are_refused_before_reading(tiny, tmp_path, special):
    if special == "dev-zero":
        path = Path("/dev/zero")
        message = "is not a regular file"
    elif special == "fifo":
        path = tmp_path / "pipe.jsonl"
        os.mkfifo(path)  # reading it would block forever
        message = "is not a regular file"
    else:
        path = tmp_path / "folder"
        path.mkdir()
        message = "cannot load a dataset from directory"
    assert message in _unlearn(tmp_path, "--model", tiny, "--harmful", path)


BAD_SETTINGS = {
    "lora-no": ("s.json", '{"lora": "no"}', "lora must be true or false, got 'no'"),
    "steps-text": ("s.json", '{"steps": "ten"}', "steps must be a whole number, got 'ten'"),
    "epsilon-scalar": ("s.json", '{"epsilon": 1}', "epsilon must be a list, got 1"),
    "nan": ("s.json", '{"lr": NaN}', "NaN is not a valid number in a settings file"),
    "unknown-key": ("s.json", '{"stepz": 3}', "unknown config keys stepz"),
    "broken-yaml": ("s.yaml", "steps: [1, 2\nlr: 3", "invalid YAML at line"),
    "yaml-list": ("s.yml", "- 1\n- 2\n", "must hold a mapping, not list"),
    "not-utf8": ("s.json", b'{"model": "\xff"}', "is not UTF-8 text"),
    "broken-json": ("s.json", "{", "invalid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_file(tmp_path, case):
    name, content, message = BAD_SETTINGS[case]
    settings_file = _file(tmp_path, name, content)
    assert message in _unlearn(tmp_path, "--config", settings_file)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--epsilon", "nan", "1", "1"], "epsilon must be finite, got nan"),
        (["--lambda", "-1"], "lam must be in (0, 100]"),
        (["--lambda", "inf"], "lam must be finite, got inf"),
        (["--lr", "1e30"], "lr must be in (0, 1]"),
        (["--max-length", "10000000"], "max_length must be between 8 and 1,000,000 tokens"),
    ],
    ids=["epsilon-nan", "lambda-negative", "lambda-inf", "lr-huge", "max-length-huge"],
)
def test_bad_numbers_on_the_command_line(tiny, tmp_path, options, message):
    assert message in _unlearn(tmp_path, "--model", tiny, *options)


def test_a_model_folder_without_a_tokenizer(tiny, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    for path in model.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            path.unlink()
    output = _unlearn(tmp_path, "--model", model)
    assert "cannot load a tokenizer from" in output and "needs its tokenizer files" in output


# --- fuzzing ---------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
FIELDS = [f for f in UnlearnConfig.__dataclass_fields__]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4))
def test_any_settings_mapping_resolves_or_is_a_config_error(values):
    try:
        resolved = UnlearnConfig.from_dict(values).resolve()
    except ConfigError:
        return
    assert resolved.resolve() == resolved  # resolving is idempotent on what it accepts


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
    content=st.binary(max_size=200)
    | st.lists(st.dictionaries(st.sampled_from(["prompt", "answer", "question", "unsafe", "x"]),
                               JSON_VALUES, max_size=3), max_size=4).map(
        lambda rows: "\n".join(json.dumps(r) for r in rows).encode()
    ),
)  # fmt: skip
def test_any_data_file_loads_or_is_a_data_error(tmp_path, suffix, content):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    try:
        pairs = load_qa_pairs(path)
    except DataError as error:
        assert str(path) in str(error) or path.name in str(error)
        return
    assert pairs and all(p.prompt and p.answer for p in pairs)
