"""Question/answer pairs -> token rows with answer masks.

Prompts go through the model's chat template when it has one, else the plain
`### Question: {q}\n ### Answer: {a}` format. The answer boundary comes from tokenising the
prompt text and the full text and taking their common token prefix, so a token that merges
across the boundary counts as answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sku_fast.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from sku_fast.unlearn.data import QAPair

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Question: {q}\n ### Answer: {a}"


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
