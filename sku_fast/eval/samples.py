"""Before and after, side by side: greedy answers of the original and the unlearned model to a
few prompts, each harmful one with the judge's verdict. What `sku-fast unlearn` prints at the
end, so that a run shows its effect on prompts it was not trained on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sku_fast.eval.generation import GenerationConfig, generate
from sku_fast.eval.judges import load_judge
from sku_fast.eval.metrics import load_similarity
from sku_fast.unlearn.models import load_model, load_tokenizer


@dataclass(frozen=True)
class Sample:
    """One prompt answered by both models; verdicts are judge categories (harmful prompts
    only, else None)."""

    kind: str  # "harmful" or "normal"
    prompt: str
    before: str
    after: str
    before_verdict: str | None = None
    after_verdict: str | None = None


def before_after(
    original: str | Path,
    unlearned: str | Path,
    harmful: Sequence[str],
    normal: Sequence[str],
    *,
    max_new_tokens: int = 40,
    judge: str = "rules",
) -> list[Sample]:
    """Answer every prompt with both models (greedy) and judge the harmful ones."""
    prompts = [*harmful, *normal]
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=8)
    answers = {}
    for label, path in (("before", original), ("after", unlearned)):
        model, tokenizer = load_model(path), load_tokenizer(path)
        answers[label] = generate(model, tokenizer, prompts, config)
        del model
    similarity = load_similarity("auto")
    rules = load_judge(judge, similarity=similarity if similarity.embedder is not None else None)
    verdicts = {
        label: [v.category for v in rules.judge(harmful, answers[label][: len(harmful)])]
        for label in answers
    }
    samples = []
    for i, prompt in enumerate(prompts):
        is_harmful = i < len(harmful)
        samples.append(
            Sample(
                "harmful" if is_harmful else "normal",
                prompt,
                answers["before"][i],
                answers["after"][i],
                verdicts["before"][i] if is_harmful else None,
                verdicts["after"][i] if is_harmful else None,
            )
        )
    return samples
