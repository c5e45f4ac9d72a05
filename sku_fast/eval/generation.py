"""Batched generation for evaluation: greedy by default, seeded sampling on request.

Prompts are formatted like the training data (the model's chat template, else the plain
`### Question:` format; see sku_fast.unlearn.data.format_pair) and left-padded, so every row's next
token sits at the last position. Prompts are batched in order of length to waste little
padding; results come back in the input order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sku_fast.errors import ConfigError
from sku_fast.unlearn.tokens import format_pair

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. `seed` only matters when `sample` is set; with it, the same prompts
    in the same batches give the same text."""

    max_new_tokens: int = 64
    batch_size: int = 8
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    max_prompt_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sample and not (math.isfinite(self.temperature) and 0 < self.temperature <= 100):
            raise ConfigError(
                f"sampling needs a temperature in (0, 100], got {self.temperature} "
                "(for greedy decoding leave out --sample)"
            )
        if self.sample and not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling needs top_p in (0, 1], got {self.top_p}")


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model continues: what training puts before the answer."""

    return format_pair(tokenizer, prompt, "")[0]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
) -> list[str]:
    """One response per prompt (raw prompts: they are formatted here), special tokens and
    surrounding whitespace removed."""

    config = config or GenerationConfig()
    if not prompts:
        return []
    device = next(model.parameters()).device
    texts = [format_prompt(tokenizer, p) for p in prompts]
    templated = bool(getattr(tokenizer, "chat_template", None))
    encoded = [
        tokenizer(t, add_special_tokens=not templated)["input_ids"][-config.max_prompt_tokens :]
        for t in texts
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(encoded)
    for batch_number, first in enumerate(range(0, len(order), config.batch_size)):
        rows = order[first : first + config.batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T] left-padded
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for k, i in enumerate(rows):
            ids = encoded[i]
            input_ids[k, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[k, width - len(ids) :] = 1
        kwargs = {"do_sample": config.sample}
        if config.sample:
            # one seed per batch: a batch's text does not depend on the batches before it
            torch.manual_seed(config.seed + batch_number)
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=config.max_new_tokens,
                pad_token_id=pad,
                **kwargs,
            )  # [B, T + new]
        for k, i in enumerate(rows):
            new = output[k, width:]
            responses[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return responses
