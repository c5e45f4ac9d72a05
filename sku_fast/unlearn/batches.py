"""The training stream: which samples and random answers make up micro-batch g.

Micro-batch g (counted over steps, accumulation and processes) always holds the same samples and
random answers, chosen from (seed, g) alone, so a resumed run sees exactly what an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sku_fast.errors import DataError
from sku_fast.unlearn.objective import TERM_IDS, Objective
from sku_fast.unlearn.tokens import TokenRow, collate, tokenize_pair

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from sku_fast.unlearn.data import QAPair


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

        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._order[offset])


def answer_groups(answers: Sequence[str]) -> np.ndarray:
    """One integer per sample, equal for samples with the same answer text [n]."""

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

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    draws = []
    for i in indices:
        others = np.flatnonzero(groups != groups[i])
        draws.append(rng.choice(others, size=k, replace=len(others) < k).tolist())
    return draws


def anchor_rows(batch_size: int) -> int:
    """Anchor samples per micro-batch: a third of the "gd" rows at batch 2 and above."""
    return max(1, batch_size // 2)


class BatchStream:
    """Micro-batch g as token rows: B harmful samples (a "gd" row each, K "rd" rows with
    random answers and, where the sample has a safe answer, an "sp" row with it), B normal
    samples ("pd" rows) and, with anchors, anchor_rows(B) anchor pairs as "gd" rows too, all
    chosen from (seed, g) alone. `safe[i]` is the safe answer of harmful sample i, or None;
    `anchors` are (harmless prompt, the answer this run learns) pairs, never random answers.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        harmful: Sequence[QAPair],
        normal: Sequence[QAPair],
        objective: Objective,
        *,
        batch_size: int,
        max_length: int,
        seed: int,
        safe: Sequence[str | None] | None = None,
        anchors: Sequence[QAPair] = (),
    ) -> None:
        if objective.active("sp") and (safe is None or len(safe) != len(harmful)):
            raise ValueError("the safe-answer term needs one safe answer (or None) per sample")
        self.safe = safe
        self.tokenizer, self.harmful, self.normal = tokenizer, harmful, normal
        self.objective, self.batch_size, self.max_length = objective, batch_size, max_length
        self.seed = seed
        self.harmful_order = Sampler(len(harmful), seed)
        self.normal_order = Sampler(len(normal), seed + 1)
        self.anchors = anchors
        self.anchor_order = Sampler(len(anchors), seed + 3) if anchors else None
        self.groups = (
            answer_groups([pair.answer for pair in harmful])
            if objective.active("rd") and objective.random_source == "harmful"
            else None
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache: dict[tuple[str, int, int], TokenRow] = {}

    def _row(self, source: str, prompt: int, answer: int) -> TokenRow:
        key = (source, prompt, answer)
        if key not in self._cache:
            prompts = {"normal": self.normal, "anchor": self.anchors}.get(source, self.harmful)
            if source == "safe":
                text = self.safe[answer]
            else:
                answers = self.normal if source in ("normal", "harmful-normal") else prompts
                text = answers[answer].answer
            self._cache[key] = tokenize_pair(
                self.tokenizer, prompts[prompt].prompt, text, self.max_length
            )
        return self._cache[key]

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:

        b, rows, terms = self.batch_size, [], []
        harmful = self.harmful_order.take(index * b, b)
        if self.objective.active("gd"):
            rows += [self._row("harmful", i, i) for i in harmful]
            terms += [TERM_IDS["gd"]] * b
            if self.anchor_order is not None:
                count = anchor_rows(b)
                anchors = self.anchor_order.take(index * count, count)
                rows += [self._row("anchor", i, i) for i in anchors]
                terms += [TERM_IDS["gd"]] * count
        if self.objective.active("rd"):
            rng = np.random.default_rng([self.seed, 2, index])
            k = self.objective.k
            if self.groups is not None:
                draws = random_answers(self.groups, harmful, k, rng)
                source = "harmful"
            else:  # the baseline's random normal answers
                draws = rng.integers(0, len(self.normal), size=(b, k)).tolist()
                source = "harmful-normal"
            for i, answers in zip(harmful, draws, strict=True):
                rows += [self._row(source, i, j) for j in answers]
            terms += [TERM_IDS["rd"]] * (b * k)
        if self.objective.active("pd"):
            rows += [self._row("normal", i, i) for i in self.normal_order.take(index * b, b)]
            terms += [TERM_IDS["pd"]] * b
        if self.objective.active("sp"):
            with_safe = [i for i in harmful if self.safe[i] is not None]
            rows += [self._row("safe", i, i) for i in with_safe]
            terms += [TERM_IDS["sp"]] * len(with_safe)
        batch = collate(rows, self.pad_id)
        batch["term"] = torch.tensor(terms, dtype=torch.long)
        return batch
