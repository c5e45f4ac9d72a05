"""`run_compare`: the papers' table in one command.

Trains, with the same data, steps and seed, the gradient-ascent baseline, SKU, and SKU with
each of its three modules switched off, and the baseline again for as many steps as fit in
SKU's training time ("ga-same-time": the two at equal wall-clock cost); evaluates them and the
original model on the same prompts with the same judge; writes the table (markdown + JSON) and
the plots.

    <out>/<variant>/          the `sku-fast unlearn` run folder of each trained variant
    <out>/<variant>/eval/     results.json, generations.jsonl, summary.md
    <out>/original/eval/      the same for the original model
    <out>/table.md, table.json, harm_vs_utility.png, ablation.png
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sku_fast.errors import SkuFastError
from sku_fast.eval.evaluate import EvalConfig, Reference, evaluate_loaded, load_set, write_outputs
from sku_fast.eval.judges import load_judge
from sku_fast.eval.metrics import load_similarity
from sku_fast.eval.report import write_report
from sku_fast.unlearn.config import DEFAULT_STEPS, UnlearnConfig
from sku_fast.unlearn.models import load_model, load_tokenizer
from sku_fast.unlearn.pipeline import run_unlearn

# variant name -> UnlearnConfig changes (None: the original model, not trained)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "original": None,
    "sku": {"method": "sku"},
    "ga": {"method": "ga"},
    "ga-same-time": {"method": "ga"},  # steps: SKU's training seconds at GA's speed
    "sku-no-gd": {"method": "sku", "guided_distortion": False},
    "sku-no-rd": {"method": "sku", "random_disassociation": False},
    "sku-no-pd": {"method": "sku", "preservation_divergence": False},
}
DESCRIPTIONS = {
    "original": "original model",
    "ga": "gradient ascent (Yao et al.), SKU's steps",
    "ga-same-time": "gradient ascent, SKU's training time",
    "sku": "SKU (all modules)",
    "sku-no-gd": "SKU without guided distortion",
    "sku-no-rd": "SKU without random disassociation",
    "sku-no-pd": "SKU without preservation divergence",
}


@dataclass
class CompareConfig:
    """`train`: the shared unlearning settings (model, data, steps, seed, LoRA...); its
    `method`, ablation switches and `out` are set per variant. `evaluation`: the shared
    evaluation; its harmful/normal sets default to the training sets. `reuse`: keep a
    variant's finished run when its saved settings equal this one's (resume a comparison)."""

    train: UnlearnConfig = field(default_factory=UnlearnConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    out: Path = Path("sku-fast-runs/compare")
    variants: Sequence[str] = tuple(VARIANTS)
    reuse: bool = True

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise SkuFastError(
                f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
            )
        if not self.variants:
            raise SkuFastError("compare needs at least one variant")


def variant_config(config: CompareConfig, name: str) -> UnlearnConfig:
    """The unlearning settings of variant `name`, writing into <out>/<name>."""
    changes = VARIANTS[name]
    if changes is None:
        raise ValueError(f"variant {name!r} is not trained")
    switches = {
        "guided_distortion": True,
        "random_disassociation": True,
        "preservation_divergence": True,
    }
    # the safe twin and the anchors shape SKU's task vector; the baseline has neither
    sku_only = {"contrast": None, "anchors": None} if changes["method"] == "ga" else {}
    return dataclasses.replace(
        config.train,
        **(switches | sku_only | changes),
        epsilon=None if config.train.epsilon is None else list(config.train.epsilon),
        lr=config.train.lr,
        steps=config.train.steps or DEFAULT_STEPS["sku"],  # the same steps for every variant
        out=str(Path(config.out) / name),
        overwrite=True,
        resume=False,
    )


def _finished(run: UnlearnConfig) -> bool:
    """Whether <run.out> holds a finished run with the same settings (except bookkeeping)."""
    out = Path(run.out)
    saved_file = out / "config.json"
    if not ((out / "model" / "config.json").is_file() and saved_file.is_file()):
        return False
    ignore = ("overwrite", "resume")
    saved = {k: v for k, v in json.loads(saved_file.read_text()).items() if k not in ignore}
    # run_unlearn saves the paths resolved
    wanted = run.resolve().with_absolute_paths().to_dict()
    wanted = {k: v for k, v in wanted.items() if k not in ignore}
    if wanted["contrast"] is None:  # left to the data: whatever the run decided
        wanted["contrast"] = saved.get("contrast")
    return saved == wanted


def run_compare(
    config: CompareConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train, evaluate and report every variant; return the table rows (also written)."""

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = dataclasses.replace(
        config.evaluation,
        harmful=config.evaluation.harmful or config.train.harmful,
        normal=config.evaluation.normal or config.train.normal,
    )
    # load every set before training: a bad file fails in seconds, not after an hour
    data = {name: load_set(name, getattr(evaluation, name), evaluation.n) for name in
            ("harmful", "normal", "harmless")}  # fmt: skip

    # the judge and the embedding model too: a bad --judge must not wait for the training
    similarity = load_similarity(evaluation.similarity, device=evaluation.device)
    judge = load_judge(
        evaluation.judge,
        similarity=similarity if similarity.embedder is not None else None,
        device=evaluation.device,
    )

    train_seconds: dict[str, float] = {}
    for name in _training_order(config.variants):
        run = variant_config(config, name)
        if name == "ga-same-time":
            run = dataclasses.replace(run, steps=same_time_steps(train_seconds, run.steps))
        if config.reuse and _finished(run):
            log(f"[{name}] reusing the finished run in {run.out}")
        else:
            log(f"[{name}] training: {DESCRIPTIONS[name]}, {run.steps} steps")
            run_unlearn(run, progress=progress)
        train_seconds[name] = json.loads((Path(run.out) / "summary.json").read_text())[
            "train_seconds"
        ]

    reference = Reference.load(config.train.model, evaluation.device)
    rows = []
    # the original first: its normal generations are the reference for similarity
    for name in sorted(config.variants, key=lambda v: VARIANTS[v] is not None):
        if VARIANTS[name] is None:
            model, tokenizer, label = reference.model, reference.tokenizer, reference.label
        else:
            folder = Path(config.out) / name / "model"
            model = load_model(folder, device=evaluation.device)
            tokenizer, label = load_tokenizer(folder), str(folder)
        results, records = evaluate_loaded(
            model,
            tokenizer,
            evaluation,
            reference,
            judge=judge,
            similarity=similarity,
            label=label,
            data=data,
            log=log,
        )
        results["variant"] = name
        write_outputs(out / name / "eval", results, records)
        row = table_row(name, results, train_seconds.get(name))
        if VARIANTS[name] is not None:
            row["steps"] = json.loads((out / name / "summary.json").read_text())["steps"]
        rows.append(row)
        del model
    meta = {
        "model": reference.label,
        "steps": config.train.steps,
        "seed": config.train.seed,
        "lora": config.train.lora,
        "judge": judge.name,
        "similarity_method": similarity.label,
        "n": {name: len(pairs) for name, pairs in data.items()},
        "max_new_tokens": evaluation.generation.max_new_tokens,
        "decoding": "sampling" if evaluation.generation.sample else "greedy",
    }
    write_report(out, rows, meta)
    return rows


def _training_order(variants: Sequence[str]) -> list[str]:
    """The trained variants; ga-same-time after the two runs whose times it needs."""
    order = [v for v in variants if VARIANTS[v] is not None and v != "ga-same-time"]
    if "ga-same-time" in variants:
        order += [v for v in ("sku", "ga") if v not in order] + ["ga-same-time"]
    return order


def same_time_steps(train_seconds: dict[str, float], steps: int) -> int:
    """Baseline steps that take as long as SKU's training: steps · t_sku / t_ga."""
    sku, ga = train_seconds["sku"], train_seconds["ga"]
    return max(1, round(steps * sku / ga)) if ga > 0 else steps


def table_row(name: str, results: dict[str, Any], train_seconds: float | None) -> dict[str, Any]:
    """One row of the comparison table from one evaluation's results."""
    harmful, normal, harmless = results["harmful"], results["normal"], results["harmless"]
    return {
        "variant": name,
        "description": DESCRIPTIONS[name],
        "harmful_rate": harmful["harmful_rate"],
        "refusal_rate": harmful["refusal_rate"],
        "degenerate_rate": harmful["degenerate_rate"],
        "off_topic_rate": harmful["off_topic_rate"],
        "over_refusal_rate": harmless["over_refusal_rate"],
        "distinct_1": normal["distinct_1"],
        "distinct_2": normal["distinct_2"],
        "fluency_ppl": normal["fluency_ppl"],
        "normal_nll": normal["nll"],
        "similarity": normal["similarity"],
        "train_seconds": train_seconds,
        "eval_seconds": results["seconds"],
        **{f"{k}": results.get("forgetting", {}).get(k) for k in ("unsafe_rise", "safe_rise")},
    }
