"""Datasets -> question/answer pairs -> token rows with answer masks.

Recognised without options (first match wins):

- explicit `prompt_column` / `answer_column`;
- PKU-SafeRLHF: `prompt`, `response_0/1`, `is_response_0/1_safe` (the unsafe responses);
- BeaverTails-style: `prompt`, `unsafe` (the harmful answer);
- chat: `conversations` or `messages`, a list of {role, content} (or {from, value}) turns;
- TruthfulQA CSV: `Question`, `Best Answer`;
- generic: `prompt`/`question`/`instruction`/`input` with `answer`/`response`/`output`/
  `completion`/`text`.

The answer boundary comes from tokenising the prompt text and the full text and taking their
common token prefix, so a token that merges across the boundary counts as answer.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sku_fast.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Question: {q}\n ### Answer: {a}"
DEMO_DATA = ("harmful", "normal", "harmless")

_PROMPT_KEYS = ("prompt", "question", "instruction", "input", "query")
_ANSWER_KEYS = ("answer", "response", "output", "completion", "text", "chosen")
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt", "bot", "model")


@dataclass(frozen=True)
class QAPair:
    """One prompt with one answer (a harmful answer in the harmful set)."""

    prompt: str
    answer: str


def demo_data_path(name: str) -> Path:
    """The packaged demo set `name` ("harmful", "normal" or "harmless"), a JSONL file."""
    if name not in DEMO_DATA:
        raise DataError(f"unknown demo data set {name!r}; choose one of {', '.join(DEMO_DATA)}")
    return Path(__file__).parent / "demo_data" / f"{name}.jsonl"


def load_qa_pairs(
    path: str | Path, prompt_column: str | None = None, answer_column: str | None = None
) -> list[QAPair]:
    """Question/answer pairs from a JSONL, JSON or CSV file or a `save_to_disk` directory.

    The layout is detected from the column names (see the module docstring); `prompt_column`
    and `answer_column` override the detection. Rows with an empty prompt or answer are
    dropped; an empty result is an error.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    records = _read_records(path)
    if not records:
        raise DataError(f"data file {str(path)!r} has no rows")
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


def _read_records(path: Path) -> list[Any]:
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        return _json_lines(text, path)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _json_lines(text, path)  # many ".json" datasets are JSON lines
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
    raise DataError(
        f"data file {str(path)!r} has an unknown extension {suffix!r}; "
        "use .jsonl, .json, .csv or a datasets save_to_disk directory"
    )


def _json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
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
    keys = set(first)

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


# --- tokenisation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRow:
    """One tokenised example: ids of prompt + answer and the number of prompt tokens."""

    input_ids: tuple[int, ...]
    answer_start: int


def format_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[str, str]:
    """(prompt text, full text): the chat template when the tokenizer has one, otherwise
    `### Question: {q}\\n ### Answer: {a}`."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        )
        full_text = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": answer}], tokenize=False
        )
        return prompt_text, full_text
    full_text = PLAIN_TEMPLATE.format(q=prompt, a=answer)
    return full_text[: len(full_text) - len(answer)], full_text


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: int
) -> TokenRow:
    """Token ids of the formatted pair, cut to `max_length`, and where the answer starts.

    Chat-template text carries its own special tokens; the plain format gets the tokenizer's
    usual ones plus EOS, so the model learns where the answer ends.
    """
    prompt_text, full_text = format_pair(tokenizer, prompt, answer)
    templated = bool(getattr(tokenizer, "chat_template", None))
    encode = lambda text: tokenizer(text, add_special_tokens=not templated)["input_ids"]
    prompt_ids, full_ids = encode(prompt_text), list(encode(full_text))
    if not templated and tokenizer.eos_token_id is not None:
        full_ids.append(tokenizer.eos_token_id)
    start = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        start += 1
    if start >= len(full_ids):
        raise DataError(f"the answer {answer[:40]!r} tokenises to nothing after its prompt")
    if len(full_ids) > max_length:
        # keep the answer: cut the prompt from the left first, then the answer's tail
        drop = min(len(full_ids) - max_length, max(start - 1, 0))
        full_ids, start = full_ids[drop:], start - drop
        full_ids = full_ids[:max_length]
    return TokenRow(tuple(full_ids), start)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[QAPair], max_length: int
) -> list[TokenRow]:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    return [tokenize_pair(tokenizer, p.prompt, p.answer, max_length) for p in pairs]


def collate(rows: Sequence[TokenRow], pad_id: int) -> dict[str, Any]:
    """Right-padded `input_ids`, `attention_mask` and `labels` [B, T]; labels are the input
    ids on answer tokens and IGNORE_INDEX on prompt and padding (not yet shifted)."""
    import torch

    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row.input_ids, dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        labels[i, row.answer_start : len(ids)] = ids[row.answer_start :]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --- sampling -------------------------------------------------------------------------------


class Sampler:
    """A seeded stream of sample indices: epoch e is permutation(seed, e) of range(n), so the
    indices for any position are known without replaying earlier ones (exact resume)."""

    def __init__(self, size: int, seed: int) -> None:
        if size <= 0:
            raise DataError("cannot sample from an empty data set")
        self.size, self.seed = size, seed
        self._epoch, self._order = -1, None

    def take(self, position: int, count: int) -> list[int]:
        """The `count` indices at stream positions position .. position + count - 1."""
        return [self._at(p) for p in range(position, position + count)]

    def _at(self, position: int) -> int:
        import numpy as np

        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._order[offset])


def answer_groups(answers: Sequence[str]) -> np.ndarray:
    """One integer per sample, equal for samples with the same answer text [n]."""
    import numpy as np

    groups = np.unique(np.asarray(list(answers), dtype=str), return_inverse=True)[1]
    if groups.max(initial=0) == 0:
        raise DataError(
            "random disassociation needs at least 2 different answers; "
            f"the {len(answers)} samples share one"
        )
    return groups


def random_answers(
    groups: np.ndarray, indices: Sequence[int], k: int, rng: np.random.Generator
) -> list[list[int]]:
    """For each sample index i, k indices of other samples whose answer differs from i's
    (random disassociation never pairs a prompt with its own answer), drawn with `rng`."""
    import numpy as np

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    draws = []
    for i in indices:
        others = np.flatnonzero(groups != groups[i])
        draws.append(rng.choice(others, size=k, replace=len(others) < k).tolist())
    return draws
