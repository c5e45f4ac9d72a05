"""Evaluate one model: what unlearning bought (harm) and what it cost (utility).

- harmful prompts: harmful rate by a judge, with the refusal, degenerate and off-topic rates
  beside it (the four categories of sku_fast.eval.judges add up to 1 for the rule judge);
- normal prompts: mean NLL of the reference answers under the model; similarity of the
  model's generations to the original model's; diversity (distinct-1/2); fluency (perplexity
  of the generations under the original model, so a model cannot grade itself);
- harmless prompts: over-refusal rate (refusals of benign, sometimes edgy-sounding requests).

Writes `results.json`, `generations.jsonl` and `summary.md` into the output directory.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sku_fast.engine.strict_json import to_json
from sku_fast.errors import ConfigError, DataError
from sku_fast.eval.forgetting import AnswerNLL, answer_nlls, forgetting, selectivity_text
from sku_fast.eval.generation import GenerationConfig, generate
from sku_fast.eval.judges import check_judge_spec, load_judge, rates
from sku_fast.eval.metrics import answer_nll, distinct_n, load_similarity
from sku_fast.eval.text import is_refusal
from sku_fast.unlearn.data import QAPair, demo_data_path, load_contrast_pairs, load_qa_pairs
from sku_fast.unlearn.models import (
    DEFAULT_MODEL_NAME,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sku_fast.eval.judges import Judge
    from sku_fast.eval.metrics import Similarity

SETS = ("harmful", "normal", "harmless")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate on and how. A data path of None means the packaged demo set; `n` is
    the number of prompts taken from the start of each set (None: all). `generate` off
    measures only the answer likelihoods (fast, no judge)."""

    harmful: Path | None = None
    normal: Path | None = None
    harmless: Path | None = None
    n: int | None = 40
    judge: str = "rules"
    similarity: str = "auto"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 8
    device: str = "cpu"
    generate: bool = True

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ConfigError(f"n must be >= 1 (or None for all), got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_device(self.device)
        check_judge_spec(self.judge)


def check_device(device: str) -> None:
    """A device this torch build can use, or ConfigError saying why not."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            f"--device {device!r} is not a device (e.g. cpu, cuda, cuda:1)"
        ) from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build but sees no GPU"
        raise ConfigError(f"--device {device}: this torch is {build}; use --device cpu")


def resolve_model(model: str | Path | None) -> str | Path | None:
    """A run directory written by `sku-fast unlearn` holds the model in `model/`."""
    if model is not None and (Path(model) / "model" / "config.json").is_file():
        return Path(model) / "model"
    return model


def model_label(model: str | Path | None) -> str:

    return DEFAULT_MODEL_NAME if model is None else str(model)


def load_set(name: str, path: Path | None, n: int | None) -> list[QAPair]:
    """The first `n` pairs of a set; a prompt-only file is accepted for the harmless set."""

    source = Path(path) if path is not None else demo_data_path(name)
    try:
        pairs = load_qa_pairs(source)
    except DataError:
        if name != "harmless" or not source.is_file():
            raise
        column = _prompt_column(source)
        if column is None:
            raise
        pairs = [QAPair(p.prompt, "") for p in load_qa_pairs(source, column, column)]
    return pairs[:n] if n is not None else pairs


def _prompt_column(path: Path) -> str | None:
    """The prompt column of a prompt-only JSONL/JSON/CSV file (over-refusal lists often have
    no answers), or None."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".csv":
            first = next(csv.DictReader(text.splitlines()), {})
        elif path.suffix.lower() == ".jsonl":
            first = json.loads(next(line for line in text.splitlines() if line.strip()))
        else:
            data = json.loads(text)
            first = data[0] if isinstance(data, list) and data else {}
    except (OSError, ValueError, StopIteration):
        return None
    if not isinstance(first, dict):
        return None
    keys = {k.lower(): k for k in first}
    return next((keys[k] for k in ("prompt", "instruction", "question", "goal") if k in keys), None)


@dataclass
class Reference:
    """The original model: it scores fluency, and its normal-set generations are what
    similarity compares against (computed once, reused for every evaluated model)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    label: str
    normal_generations: list[str] | None = None
    answer_nll: AnswerNLL | None = None

    @classmethod
    def load(cls, model: str | Path | None, device: str = "cpu") -> Reference:

        resolved = resolve_model(model)
        return cls(
            load_model(resolved, device=device), load_tokenizer(resolved), model_label(model)
        )


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def load_data(config: EvalConfig) -> dict[str, list]:
    """The prompt sets of `config` (first n of each), and the harmful set's (prompt, unsafe,
    safe) triples when it has safe answers too ("contrast", else empty)."""
    data: dict[str, list] = {name: load_set(name, getattr(config, name), config.n) for name in SETS}
    contrast = load_contrast_pairs(config.harmful) if config.harmful is not None else []
    data["contrast"] = contrast[: config.n] if config.n is not None else contrast
    return data


def evaluate_loaded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: EvalConfig,
    reference: Reference,
    *,
    judge: Judge | None,
    similarity: Similarity | None,
    label: str,
    data: dict[str, list] | None = None,
    log=print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results, generation records) for a loaded model; see `evaluate_model`. With
    `config.generate` off only the answer NLLs are measured (no judge, no similarity)."""
    started = time.perf_counter()
    data = data or load_data(config)
    records: list[dict[str, Any]] = []
    results: dict[str, Any] = {"model": label, "reference": reference.label}
    normal_prompts = [p.prompt for p in data["normal"]]
    log(f"[{label}] scoring answer likelihoods")
    nll = answer_nll(
        model, tokenizer, normal_prompts, [p.answer for p in data["normal"]],
        batch_size=config.batch_size,
    )  # fmt: skip
    if data.get("contrast"):
        if reference.answer_nll is None:
            reference.answer_nll = answer_nlls(
                reference.model, reference.tokenizer, data["contrast"], data["normal"],
                batch_size=config.batch_size,
            )  # fmt: skip
        own = (
            reference.answer_nll  # the original itself: scored once
            if model is reference.model
            else answer_nlls(model, tokenizer, data["contrast"], data["normal"],
                             batch_size=config.batch_size)
        )  # fmt: skip
        results["forgetting"] = forgetting(own, reference.answer_nll)
    if not config.generate:
        results["normal"] = {
            "n": len(normal_prompts),
            "nll": nll.mean_nll,
            "nll_tokens": nll.tokens,
        }
        results["seconds"] = round(time.perf_counter() - started, 1)
        return results, records
    assert judge is not None and similarity is not None, "generation needs a judge and similarity"

    outputs: dict[str, list[str]] = {}
    for name in SETS:
        prompts = [p.prompt for p in data[name]]
        log(f"[{label}] generating {len(prompts)} {name} responses")
        outputs[name] = generate(model, tokenizer, prompts, config.generation)

    harmful_prompts = [p.prompt for p in data["harmful"]]
    verdicts = judge.judge(harmful_prompts, outputs["harmful"])
    harmful = {"n": len(verdicts), **rates(verdicts)}
    for i, (prompt, response, verdict) in enumerate(
        zip(harmful_prompts, outputs["harmful"], verdicts, strict=True)
    ):
        records.append(
            {"set": "harmful", "index": i, "prompt": prompt, "response": response}
            | {"category": verdict.category, "harmful": verdict.harmful, "reason": verdict.reason}
        )

    normal_outputs = outputs["normal"]
    log(f"[{label}] scoring fluency and similarity")
    fluency = answer_nll(
        reference.model, reference.tokenizer, normal_prompts, normal_outputs,
        batch_size=config.batch_size,
    )  # fmt: skip
    if reference.normal_generations is None and model is reference.model:
        reference.normal_generations = list(normal_outputs)
    elif reference.normal_generations is None:
        log(f"[{label}] generating the reference model's normal responses")
        reference.normal_generations = generate(
            reference.model, reference.tokenizer, normal_prompts, config.generation
        )
    if len(reference.normal_generations) != len(normal_prompts):
        raise ValueError(
            f"the reference has {len(reference.normal_generations)} normal generations for "
            f"{len(normal_prompts)} prompts; evaluate every model on the same normal set"
        )
    similarities = similarity(normal_outputs, reference.normal_generations)
    normal = {
        "n": len(normal_prompts),
        "nll": nll.mean_nll,
        "nll_tokens": nll.tokens,
        "similarity": _mean(similarities),
        "similarity_method": similarity.label,
        "distinct_1": distinct_n(normal_outputs, 1),
        "distinct_2": distinct_n(normal_outputs, 2),
        "fluency_ppl": fluency.perplexity,
        "fluency_tokens": fluency.tokens,
        "mean_words": _mean([float(len(o.split())) for o in normal_outputs]),
    }
    for i, prompt in enumerate(normal_prompts):
        records.append(
            {"set": "normal", "index": i, "prompt": prompt, "response": normal_outputs[i]}
            | {
                "reference_response": reference.normal_generations[i],
                "similarity": similarities[i],
                "fluency_nll": fluency.per_text[i],
                "answer_nll": nll.per_text[i],
            }
        )

    harmless_prompts = [p.prompt for p in data["harmless"]]
    refused = [is_refusal(o) for o in outputs["harmless"]]
    harmless = {"n": len(refused), "over_refusal_rate": _mean([float(r) for r in refused])}
    for i, (prompt, response) in enumerate(zip(harmless_prompts, outputs["harmless"], strict=True)):
        records.append(
            {"set": "harmless", "index": i, "prompt": prompt, "response": response}
            | {"refusal": refused[i]}
        )

    results |= {
        "judge": judge.name,
        "generation": asdict(config.generation),
        "harmful": harmful,
        "normal": normal,
        "harmless": harmless,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return results, records


def write_outputs(out: Path, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """results.json, generations.jsonl and summary.md in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(to_json(results, indent=2) + "\n")
    with (out / "generations.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def summary_markdown(results: dict[str, Any]) -> str:
    """A short human summary of one evaluation."""
    lines = [f"# Evaluation of {results['model']}", ""]
    if "judge" in results:
        h, n, s = results["harmful"], results["normal"], results["harmless"]
        lines += [
            f"Judge: `{results['judge']}`; reference (original) model: {results['reference']}; "
            f"generation: {'sampling' if results['generation']['sample'] else 'greedy'}, "
            f"{results['generation']['max_new_tokens']} new tokens.",
            "",
            f"## Harmful prompts (n = {h['n']})",
            "",
            "| harmful | refusal | degenerate | off-topic |",
            "|---|---|---|---|",
            f"| {_pct(h['harmful_rate'])} | {_pct(h['refusal_rate'])} | "
            f"{_pct(h['degenerate_rate'])} | {_pct(h['off_topic_rate'])} |",
            "",
            f"## Normal prompts (n = {n['n']})",
            "",
            "| answer NLL | similarity to original | distinct-1 | distinct-2 | fluency (ppl) |",
            "|---|---|---|---|---|",
            f"| {_num(n['nll'])} | {_num(n['similarity'])} | {_num(n['distinct_1'])} | "
            f"{_num(n['distinct_2'])} | {_num(n['fluency_ppl'], 2)} |",
            "",
            f"Similarity method: {n['similarity_method']}. Fluency is the perplexity of the "
            "generations under the original model (lower is more fluent; repetition loops also "
            "score low, so read it beside distinct-n).",
            "",
            f"## Harmless prompts (n = {s['n']})",
            "",
            f"Over-refusal rate: {_pct(s['over_refusal_rate'])}",
            "",
        ]
    else:
        lines += [f"Normal-answer NLL: {_num(results['normal']['nll'])} (no generation).", ""]
    f = results.get("forgetting")
    if f is not None:
        lines += [
            f"## Forgetting, without a judge ({f['pairs']} held-out harmful prompts)",
            "",
            "NLL per token of held-out answers; the rise is over the original model. Selective "
            "unlearning raises the unsafe answers' NLL far more than the safe answers' and the "
            "normal answers'.",
            "",
            "| answers | NLL | rise |",
            "|---|---|---|",
            f"| unsafe | {_num(f['unsafe'])} | {f['unsafe_rise']:+.3f} |",
            f"| safe | {_num(f['safe'])} | {f['safe_rise']:+.3f} |",
            f"| normal | {_num(f['normal'])} | {f['normal_rise']:+.3f} |",
            "",
            f"Selectivity (unsafe rise / safe rise): {selectivity_text(f)}",
            "",
        ]
    return "\n".join(lines)


def evaluate_model(
    model: str | Path | None,
    config: EvalConfig | None = None,
    *,
    out: str | Path,
    reference: str | Path | None | Reference = None,
    log=print,
) -> dict[str, Any]:
    """Evaluate `model` (a directory, .gguf, a `sku-fast unlearn` run directory, or None for
    the embedded default) against `reference`, the original model (default: the embedded
    default), write the three outputs into `out` and return the results."""

    config = config or EvalConfig()
    resolved = resolve_model(model)
    resolve_model_path(resolved)  # a bad path fails now, not after loading the reference
    if not isinstance(reference, Reference):
        reference = Reference.load(reference, config.device)
    similarity = judge = None
    if config.generate:
        similarity = load_similarity(config.similarity, device=config.device)
        judge = load_judge(
            config.judge,
            similarity=similarity if similarity.embedder is not None else None,
            device=config.device,
        )
    if model_label(model) == reference.label:
        loaded, tokenizer = reference.model, reference.tokenizer
    else:
        loaded = load_model(resolved, device=config.device)
        tokenizer = load_tokenizer(resolved)
    results, records = evaluate_loaded(
        loaded,
        tokenizer,
        config,
        reference,
        judge=judge,
        similarity=similarity,
        label=model_label(model),
        log=log,
    )
    write_outputs(Path(out), results, records)
    return results
