"""The judge-free view of the study's SKU runs across λ (docs/study.md §1.1).

Each run's τ negated at each λ of the grid, and the rise of the NLL per token of the held-out
unsafe answers, of the safe answers to the same prompts and of the normal answers over the
original's, on the validation split. No generation, so each point costs one forward pass per
answer; nothing is chosen from it (the test split's numbers are run.py's).

    python docs/study/lambda_grid.py runs/study     # rows into runs/study/lambda-grid/rows.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from run import at_step  # docs/study/run.py: a run's checkpoint as a run folder of its own

from sku_fast.engine.strict_json import to_json
from sku_fast.eval.evaluate import EvalConfig, Reference, evaluate_model
from sku_fast.eval.select_lambda import RunFolder
from sku_fast.unlearn.pipeline import negate_model

LAMBDAS = (0.5, 1.0, 2.0)
N = 50  # the first 50 harmful prompts (unsafe and safe answers) and 50 normal questions
# (run folder, what it is): the paper's objective into its runaway and with the guard (the
# defaults' own sweep, on the same split, has these columns already)
RUNS = (
    ("sku-paper@100", "paper, 100 steps"),
    ("sku-paper", "paper, 300 steps"),
    ("sku-paper-guard", "paper + guard, 300 steps"),
    ("sku-paper-guard-1000", "paper + guard, 1000 steps"),
    # the 1000-step runs seen at their own 100th and 300th steps (their learning rate decays
    # over 1000 steps, so these are not the 300-step runs above)
    ("sku-paper-1000@100", "paper 1000-step run at 100"),
    ("sku-paper-1000@300", "paper 1000-step run at 300"),
    ("sku-paper-1000", "paper, 1000 steps"),
    ("sku-paper-guard-1000@100", "paper + guard 1000-step run at 100"),
    ("sku-paper-guard-1000@300", "paper + guard 1000-step run at 300"),
)
KEYS = ("unsafe_rise", "safe_rise", "normal_rise", "normal_rise_relative", "selectivity")


def _point(folder: RunFolder, lam: float, work: Path, config: EvalConfig, reference) -> dict:
    negate_model(folder.base, folder.tuned, folder.twin, folder.config.contrast,
                 work / "model", lam)  # fmt: skip
    results = evaluate_model(work / "model", config, out=work / "eval", reference=reference,
                             log=lambda _: None)  # fmt: skip
    return {key: results["forgetting"][key] for key in KEYS}


def main(root: Path) -> None:
    work = root / "lambda-grid"
    work.mkdir(exist_ok=True)
    done = work / "rows.jsonl"  # one line per point, so that an interrupted grid continues
    rows = [json.loads(line) for line in done.open()] if done.is_file() else []
    have = {(row["run"], row["lambda"]) for row in rows}  # report.py reads them
    data = root / "data"
    config = EvalConfig(harmful=data / "harmful_val.jsonl", normal=data / "normal_val.csv",
                        n=N, generate=False)  # fmt: skip
    reference = Reference.load(None)
    for name, label in RUNS:
        run, _, step = name.partition("@")
        folder = RunFolder.open(at_step(root / run, int(step)) if step else root / name)
        for lam in LAMBDAS:
            if (name, lam) in have:
                continue
            row = {"run": name, "label": label, "lambda": lam,
                   **_point(folder, lam, work, config, reference)}  # fmt: skip
            print(to_json(row), flush=True)
            with done.open("a") as handle:
                handle.write(to_json(row) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
