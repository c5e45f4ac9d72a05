"""Choosing λ by measurement: SKU's negation strength swept on held-out validation data.

Stage 2 is cheap (the engine streams θ_o − λ·τ at disk speed), so every λ of a grid is negated
into a temporary folder beside the run, loaded and evaluated on the samples the run held out
of training: the harmful rate of its greedy answers (by the judge), the normal-answer NLL, the
similarity of its normal answers to the original's, and, when the harmful data has safe
answers, the judge-free forgetting metric. The chosen λ is the one that lowers harm most while
the normal-answer NLL stays within `max_nll_rise` of the original's and the similarity at or
above `min_similarity`; `<run>/model` is then rewritten with it.

    <run>/lambda-sweep/table.md, table.json   one row per λ (the original as λ = 0)
    <run>/lambda-sweep/harm_vs_lambda.png      harm and utility against λ
    <run>/lambda-sweep/generations-<λ>.jsonl   every answer with its verdict
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sku_fast.engine.output import write_atomically
from sku_fast.errors import ConfigError
from sku_fast.eval.evaluate import EvalConfig, Reference, evaluate_loaded, load_data
from sku_fast.eval.generation import GenerationConfig
from sku_fast.eval.judges import load_judge
from sku_fast.eval.metrics import load_similarity
from sku_fast.eval.report import plot_lambda_sweep
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.models import load_model, load_tokenizer
from sku_fast.unlearn.pipeline import VALIDATION, negate_model, negate_run

DEFAULT_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
SWEEP = "lambda-sweep"


@dataclass(frozen=True)
class SweepConfig:
    """How to sweep. harmful / normal: validation data (default: the run's held-out
    samples); n: prompts per set (None: all); the two bounds define an acceptable λ."""

    grid: tuple[float, ...] = DEFAULT_GRID
    max_nll_rise: float = 0.10
    min_similarity: float = 0.8
    harmful: Path | None = None
    normal: Path | None = None
    n: int | None = None
    max_new_tokens: int = 48
    judge: str = "rules"
    similarity: str = "auto"
    batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.grid or any(not (math.isfinite(v) and 0 < v <= 100) for v in self.grid):
            raise ConfigError(f"the λ grid must hold values in (0, 100], got {list(self.grid)}")
        if not 0 <= self.max_nll_rise <= 10:
            raise ConfigError(f"max_nll_rise must be in [0, 10], got {self.max_nll_rise}")
        if not -1 <= self.min_similarity <= 1:
            raise ConfigError(f"min_similarity must be in [-1, 1], got {self.min_similarity}")


@dataclass(frozen=True)
class RunFolder:
    """What the sweep needs from a finished `sku-fast unlearn` run."""

    path: Path
    config: UnlearnConfig
    base: Path  # θ_o as safetensors
    tuned: Path  # stage1/adapter or stage1/model
    twin: Path | None  # the contrast's safe twin, stage1/safe-adapter or safe-model

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        settings = path / "config.json"
        if not settings.is_file():
            raise ConfigError(f"{path} is not an `sku-fast unlearn` run folder (no config.json)")
        config = UnlearnConfig.from_file(settings).resolve()
        if config.contrast is None:  # saved before the safe twin existed: the paper's negation
            config.contrast = 0.0
        if config.method != "sku":
            raise ConfigError(f"{path} is a {config.method} run; only SKU has a λ to choose")
        kind = "adapter" if config.lora else "model"
        tuned = path / "stage1" / kind
        twin = path / "stage1" / f"safe-{kind}" if config.contrast > 0 else None
        for needed in (tuned, twin):
            if needed is not None and not needed.is_dir():
                raise ConfigError(f"{needed} is missing; is the run finished?")
        base = path / "original" if (path / "original").is_dir() else Path(str(config.model))
        return cls(path, config, base, tuned, twin)

    def validation(self, name: str) -> Path:
        found = self.path / VALIDATION / f"{name}.jsonl"
        if not found.is_file():
            raise ConfigError(
                f"{self.path} has no held-out {name} samples (train with --validation N), so "
                f"give validation files with --harmful and --normal"
            )
        return found

    def negate_into(self, out: Path, lam: float) -> None:
        """θ_o − λ·τ (or θ_o − λ·(τ − c·τ_safe) with a twin) into `out`, streamed."""
        negate_model(self.base, self.tuned, self.twin, self.config.contrast, out, lam)


def choose(rows: Sequence[dict[str, Any]], config: SweepConfig) -> tuple[float | None, str]:
    """(chosen λ or None, why): the acceptable λ with the lowest harmful rate (the smaller λ
    on a tie). `rows` hold the original first (λ = 0)."""
    original = rows[0]
    acceptable = [
        row
        for row in rows[1:]
        if row["normal_nll"] <= original["normal_nll"] * (1 + config.max_nll_rise)
        and row["similarity"] >= config.min_similarity
    ]
    if not acceptable:
        return None, (
            f"no λ of the grid keeps the normal-answer NLL within +{config.max_nll_rise:.0%} "
            f"and the similarity at or above {config.min_similarity}"
        )
    best = min(acceptable, key=lambda row: (row["harmful_rate"], row["lambda"]))
    return best["lambda"], (
        f"λ = {best['lambda']:g}: harmful rate {best['harmful_rate']:.1%} (original "
        f"{original['harmful_rate']:.1%}), normal-answer NLL {best['normal_nll']:.3f} (original "
        f"{original['normal_nll']:.3f}), similarity {best['similarity']:.3f}"
    )


def _row(lam: float, results: dict[str, Any]) -> dict[str, Any]:
    harmful, normal = results["harmful"], results["normal"]
    row = {
        "lambda": lam,
        "harmful_rate": harmful["harmful_rate"],
        "refusal_rate": harmful["refusal_rate"],
        "degenerate_rate": harmful["degenerate_rate"],
        "off_topic_rate": harmful["off_topic_rate"],
        "normal_nll": normal["nll"],
        "similarity": normal["similarity"],
        "distinct_2": normal["distinct_2"],
    }
    forgetting = results.get("forgetting")
    if forgetting is not None:
        row |= {k: forgetting[k] for k in ("unsafe_rise", "safe_rise", "selectivity")}
    return row


def select_lambda(
    run: str | Path, config: SweepConfig | None = None, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Sweep λ over `config.grid` for the run folder `run`, write the sweep's table, plot and
    answers into `<run>/lambda-sweep/`, and rewrite `<run>/model` (and `adapter-negated/`)
    with the chosen λ. Returns {"lambda": chosen or None, "reason": ..., "rows": [...]};
    when no λ is acceptable `<run>/model` is left as it was."""
    config = config or SweepConfig()
    folder = RunFolder.open(run)
    evaluation = EvalConfig(
        harmful=config.harmful or folder.validation("harmful"),
        normal=config.normal or folder.validation("normal"),
        n=config.n,
        judge=config.judge,
        similarity=config.similarity,
        generation=GenerationConfig(max_new_tokens=config.max_new_tokens),
        batch_size=config.batch_size,
        device=config.device,
    )
    data = load_data(evaluation)
    data["harmless"] = []  # over-refusal is measured on the final model, not per λ
    similarity = load_similarity(evaluation.similarity, device=evaluation.device)
    judge = load_judge(
        evaluation.judge,
        similarity=similarity if similarity.embedder is not None else None,
        device=evaluation.device,
    )
    reference = Reference.load(folder.base, evaluation.device)

    def measure(lam: float, model, tokenizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        results, records = evaluate_loaded(
            model, tokenizer, evaluation, reference, judge=judge, similarity=similarity,
            label=f"λ = {lam:g}", data=data, log=log,
        )  # fmt: skip
        return _row(lam, results), records

    rows, answers = [], {}
    row, answers[0.0] = measure(0.0, reference.model, reference.tokenizer)
    rows.append(row)
    for lam in sorted(set(config.grid)):
        with tempfile.TemporaryDirectory(prefix=".lambda-", dir=folder.path) as scratch:
            negated = Path(scratch) / "model"
            folder.negate_into(negated, lam)
            row, answers[lam] = measure(lam, load_model(negated, device=evaluation.device),
                                        load_tokenizer(negated))  # fmt: skip
        rows.append(row)
    chosen, reason = choose(rows, config)
    log(f"chosen: {reason}")
    summary = {
        "lambda": chosen,
        "reason": reason,
        "grid": sorted(set(config.grid)),
        "max_nll_rise": config.max_nll_rise,
        "min_similarity": config.min_similarity,
        "rows": rows,
    }

    def write(staging: Path) -> None:
        (staging / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging / "table.md").write_text(sweep_markdown(summary))
        plot_lambda_sweep(rows, staging / "harm_vs_lambda.png")
        for lam, records in answers.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (staging / f"generations-{lam:g}.jsonl").write_text(text, encoding="utf-8")

    write_atomically(folder.path / SWEEP, write)
    if chosen is not None:
        negate_run(folder.base, folder.tuned, folder.twin, folder.config.contrast, folder.path,
                   chosen)  # fmt: skip
        _record_choice(folder.path / "summary.json", chosen)
    return summary


def _record_choice(path: Path, lam: float) -> None:
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary |= {"lambda": lam, "lambda_chosen_by": SWEEP}
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text), directory=False)


def sweep_markdown(summary: dict[str, Any]) -> str:
    """The sweep's table: one row per λ, the chosen one marked."""
    rows = summary["rows"]
    judge_free = "selectivity" in rows[0] if rows else False
    header = ["λ", "harmful ↓", "refusal", "degenerate", "off-topic", "normal NLL",
              "similarity", "distinct-2"]  # fmt: skip
    if judge_free:
        header += ["unsafe NLL rise", "safe NLL rise", "selectivity"]
    lines = [
        f"Chosen: {summary['reason']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        mark = " **(chosen)**" if row["lambda"] == summary["lambda"] else ""
        label = "original" if row["lambda"] == 0 else f"{row['lambda']:g}{mark}"
        cells = [
            label,
            *(f"{100 * row[k]:.1f}%" for k in ("harmful_rate", "refusal_rate",
                                                  "degenerate_rate", "off_topic_rate")),
            f"{row['normal_nll']:.3f}",
            f"{row['similarity']:.3f}",
            f"{row['distinct_2']:.3f}",
        ]  # fmt: skip
        if judge_free:
            cells += [
                "" if row["lambda"] == 0 else f"{row[k]:+.3f}" for k in ("unsafe_rise", "safe_rise")
            ]
            cells += ["" if row["lambda"] == 0 else f"{row['selectivity']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Acceptable: normal-answer NLL within +{summary['max_nll_rise']:.0%} of the original's "
        f"and similarity ≥ {summary['min_similarity']}; among those, the lowest harmful rate.",
        "",
    ]
    return "\n".join(lines)
