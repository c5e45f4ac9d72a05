"""Datasets -> question/answer pairs.

Recognised without options (first match wins):

- explicit `prompt_column` / `answer_column`;
- PKU-SafeRLHF: `prompt`, `response_0/1`, `is_response_0/1_safe` (the unsafe responses);
- BeaverTails-style: `prompt`, `unsafe` (the harmful answer);
- chat: `conversations` or `messages`, a list of {role, content} (or {from, value}) turns;
- TruthfulQA CSV: `Question`, `Best Answer`;
- generic: `prompt`/`question`/`instruction`/`input` with `answer`/`response`/`output`/
  `completion`/`text`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sku_fast.errors import DataError

DEMO_DATA = ("harmful", "normal", "harmless", "held_out")
ANCHOR_COLUMNS = ("prompt", "answer", "refusal")
MAX_DATA_FILE_BYTES = 2 << 30

_PROMPT_KEYS = ("prompt", "question", "instruction", "input", "query")
_ANSWER_KEYS = ("answer", "response", "output", "completion", "text", "chosen")
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt", "bot", "model")


@dataclass(frozen=True)
class QAPair:
    """One prompt with one answer (a harmful answer in the harmful set)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class ContrastPair:
    """A harmful prompt with an unsafe (compliant) answer and a safe one (a refusal or a
    harmless redirection), as BeaverTails and PKU-SafeRLHF provide them."""

    prompt: str
    unsafe: str
    safe: str


@dataclass(frozen=True)
class Anchor:
    """A harmless prompt that sounds harmful ("How do I shoot a time-lapse?") with a helpful
    answer and an over-cautious refusal: θ_bad learns the refusal and the safe twin the
    answer, so the negation teaches the model to answer such prompts (docs/study.md)."""

    prompt: str
    answer: str
    refusal: str


def demo_data_path(name: str) -> Path:
    """The packaged demo set `name`, a JSONL file: "harmful" (prompt, unsafe and safe answers),
    "normal", "harmless" (prompts for over-refusal) or "held_out" (the demo's printout)."""
    if name not in DEMO_DATA:
        raise DataError(f"unknown demo data set {name!r}; choose one of {', '.join(DEMO_DATA)}")
    return Path(__file__).resolve().parents[1] / "demo_data" / f"{name}.jsonl"


def load_qa_pairs(
    path: str | Path, prompt_column: str | None = None, answer_column: str | None = None
) -> list[QAPair]:
    """Question/answer pairs from a JSONL, JSON or CSV file or a `save_to_disk` directory.

    The layout is detected from the column names (see the module docstring); `prompt_column`
    and `answer_column` override the detection. Rows with an empty prompt or answer are
    dropped; an empty result is an error.
    """
    path, records = _existing_records(path, "data file")
    pairs: list[QAPair] = []
    extract = _extractor(records[0], path, prompt_column, answer_column)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: row {index} is a {type(record).__name__}, not an object")
        for prompt, answer in extract(record):
            if isinstance(prompt, str) and isinstance(answer, str) and prompt and answer:
                pairs.append(QAPair(prompt.strip(), answer.strip()))
    if not pairs:
        raise DataError(
            f"data file {str(path)!r} has {len(records)} rows but no usable question/answer "
            "pair (all empty, or no unsafe response in a PKU-SafeRLHF layout)"
        )
    return pairs


def load_contrast_pairs(path: str | Path) -> list[ContrastPair]:
    """(prompt, unsafe, safe) triples of a harmful data set that has both kinds of answer:
    `prompt`/`unsafe`/`safe` columns (BeaverTails-style) or PKU-SafeRLHF rows with one safe
    and one unsafe response. Other layouts give an empty list (the set has no safe answers)."""
    path, records = _existing_records(path, "data file", empty_ok=True)
    triples = []
    for record in records:
        if not isinstance(record, dict):
            return []
        prompt, unsafe, safe = record.get("prompt"), record.get("unsafe"), record.get("safe")
        if unsafe is None and {"response_0", "response_1"} <= record.keys():
            flags = [_is_true(record.get(f"is_response_{i}_safe")) for i in (0, 1)]
            if flags[0] != flags[1]:
                safe = record[f"response_{flags.index(True)}"]
                unsafe = record[f"response_{flags.index(False)}"]
        if all(isinstance(t, str) and t.strip() for t in (prompt, unsafe, safe)):
            triples.append(ContrastPair(prompt.strip(), unsafe.strip(), safe.strip()))
    return triples


def load_anchors(path: str | Path) -> list[Anchor]:
    """The anchors of a JSONL, JSON or CSV file with `prompt`, `answer` and `refusal` columns.
    A missing column or a row with an empty cell is an error naming the row."""
    path, records = _existing_records(path, "anchor file")
    anchors = []
    for index, record in enumerate(records):
        cells = [record.get(key) if isinstance(record, dict) else None for key in ANCHOR_COLUMNS]
        if not all(isinstance(cell, str) and cell.strip() for cell in cells):
            raise DataError(
                f"{path}: row {index} needs non-empty text in each of the columns "
                f"{', '.join(ANCHOR_COLUMNS)} (a harmless prompt, a helpful answer, a refusal)"
            )
        anchors.append(Anchor(*(cell.strip() for cell in cells)))
    return anchors


def hold_out(pairs: Sequence[QAPair], count: int, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """(training pairs, held-out pairs): `count` pairs chosen by a seeded shuffle, at most a
    fifth of the set, so that training keeps most of its data."""
    import numpy as np

    count = min(count, len(pairs) // 5)
    if count <= 0:
        return list(pairs), []
    order = np.random.default_rng([seed, 7]).permutation(len(pairs))
    held = set(order[:count].tolist())
    return (
        [p for i, p in enumerate(pairs) if i not in held],
        [p for i, p in enumerate(pairs) if i in held],
    )


def _existing_records(
    path: str | Path, kind: str, *, empty_ok: bool = False
) -> tuple[Path, list[Any]]:
    """(the path, its rows); a missing file, or one without rows unless `empty_ok`, is a
    DataError naming the `kind` of file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{kind} {str(path)!r} does not exist")
    records = _read_records(path)
    if not records and not empty_ok:
        raise DataError(f"{kind} {str(path)!r} has no rows")
    return path, records


def _read_records(path: Path) -> list[Any]:
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} is not a regular file (a device, pipe or socket)")
    size = path.stat().st_size
    if size > MAX_DATA_FILE_BYTES:
        raise DataError(
            f"data file {str(path)!r} is {size / 2**30:.1f} GiB, over the "
            f"{MAX_DATA_FILE_BYTES / 2**30:.0f} GiB limit; use a datasets save_to_disk folder"
        )
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(
            f"data file {str(path)!r} has an unknown extension {suffix!r}; "
            "use .jsonl, .json, .csv or a datasets save_to_disk directory"
        )
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            if suffix == ".csv":
                return list(csv.DictReader(handle))
            if suffix == ".jsonl":
                return _json_lines(handle, path)
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {str(path)!r} is not UTF-8 text (byte {error.start} of a read block: "
            f"{error.reason}); convert it with iconv or save it as UTF-8"
        ) from None
    except csv.Error as error:
        raise DataError(f"data file {str(path)!r}: not valid CSV ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(text.splitlines(), path)  # many ".json" datasets are JSON lines
    if isinstance(data, dict):
        # {"data": [...]} or a column-oriented {"prompt": [...], "answer": [...]}
        lists = {key: value for key, value in data.items() if isinstance(value, list)}
        if len(lists) == 1:
            return next(iter(lists.values()))
        if lists and len({len(value) for value in lists.values()}) == 1:
            length = len(next(iter(lists.values())))
            return [{key: lists[key][i] for key in lists} for i in range(length)]
        raise DataError(f"{path}: a JSON object must hold one list of rows or equal columns")
    if not isinstance(data, list):
        raise DataError(f"{path}: JSON must be a list of rows, not {type(data).__name__}")
    return data


def _json_lines(lines: Iterable[str], path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from error
    return rows


def _read_saved_dataset(path: Path) -> list[Any]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"cannot load a dataset from directory {str(path)!r}: {error}") from error
    if isinstance(dataset, DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    return list(dataset)


def _extractor(first: Any, path: Path, prompt_column: str | None, answer_column: str | None):
    """A function row -> iterable of (prompt, answer), chosen from the first row's keys."""
    if not isinstance(first, dict):
        raise DataError(f"{path}: rows must be objects, got {type(first).__name__}")
    keys = {key for key in first if isinstance(key, str)}  # csv files extra cells under None

    def need(column: str) -> str:
        if column not in keys:
            raise DataError(
                f"{path}: column {column!r} not found; columns are {', '.join(sorted(keys))}"
            )
        return column

    if prompt_column is not None or answer_column is not None:
        prompt_key = need(prompt_column) if prompt_column else _first_key(keys, _PROMPT_KEYS)
        answer_key = need(answer_column) if answer_column else _first_key(keys, _ANSWER_KEYS)
        if prompt_key is None or answer_key is None:
            raise DataError(
                f"{path}: give both --prompt-column and --answer-column; columns are "
                f"{', '.join(sorted(keys))}"
            )
        return lambda row: [(row.get(prompt_key), row.get(answer_key))]
    if {"prompt", "response_0", "response_1"} <= keys:
        return _pku_pairs
    if {"prompt", "unsafe"} <= keys:
        return lambda row: [(row.get("prompt"), row.get("unsafe"))]
    for chat_key in ("conversations", "messages"):
        if chat_key in keys:
            return lambda row, key=chat_key: _chat_pairs(row.get(key) or [])
    if {"Question", "Best Answer"} <= keys:
        return lambda row: [(row.get("Question"), row.get("Best Answer"))]
    prompt_key = _first_key(keys, _PROMPT_KEYS)
    answer_key = _first_key(keys, _ANSWER_KEYS)
    if prompt_key is None or answer_key is None:
        raise DataError(
            f"{path}: cannot tell the prompt and answer columns apart among "
            f"{', '.join(sorted(keys))}; pass --prompt-column and --answer-column"
        )
    return lambda row: [(row.get(prompt_key), row.get(answer_key))]


def _first_key(keys: set[str], candidates: Sequence[str]) -> str | None:
    lowered = {key.lower(): key for key in keys}
    return next((lowered[name] for name in candidates if name in lowered), None)


def _is_true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1")


def _pku_pairs(row: dict) -> list[tuple[Any, Any]]:
    """PKU-SafeRLHF: each response marked unsafe is one harmful answer."""
    return [
        (row.get("prompt"), row.get(f"response_{i}"))
        for i in (0, 1)
        if f"is_response_{i}_safe" in row and not _is_true(row[f"is_response_{i}_safe"])
    ]


def _chat_pairs(turns: Iterable[Any]) -> list[tuple[Any, Any]]:
    """Each user turn followed by an assistant turn is one pair."""
    pairs, prompt = [], None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if role in _USER_ROLES:
            prompt = content
        elif role in _ASSISTANT_ROLES and prompt is not None:
            pairs.append((prompt, content))
            prompt = None
    return pairs
