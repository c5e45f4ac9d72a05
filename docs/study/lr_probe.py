"""Which LoRA learning rate makes the gradient-ascent baseline move as the published one does?

The published baseline (Yao et al.) fine-tunes every weight at lr 2e-6; with a LoRA adapter
that rate barely moves the model. This probe trains GA for the same few steps on the study's
training split, fully at 2e-6 and with LoRA at several rates, and measures how far each moved
by the judge-free metric on the validation split: the rise of the NLL per token of held-out
unsafe answers (what GA ascends) and of safe and normal answers. The LoRA rate whose rise is
closest to full fine-tuning's is the comparable one.

    python docs/study/lr_probe.py runs/study      # after make_split.py; writes runs/study/lr-probe/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sku_fast.eval.evaluate import EvalConfig, Reference, evaluate_model
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.pipeline import run_unlearn

STEPS = 40
PROBES: dict[str, dict] = {
    "full-2e-6": {"lora": False, "lr": 2e-6},  # as published
    "lora-2e-5": {"lora": True, "lr": 2e-5},
    "lora-2e-4": {"lora": True, "lr": 2e-4},  # SKU's rate, the study's GA-LoRA arm
    "lora-1e-3": {"lora": True, "lr": 1e-3},
}


def main(root: Path) -> None:
    data = root / "data"
    probes = root / "lr-probe"
    reference = Reference.load(None)
    rows = []
    for name, settings in PROBES.items():
        run = probes / name
        if not (run / "summary.json").is_file():
            print(f"[{name}] training {STEPS} steps", flush=True)
            config = UnlearnConfig(harmful=str(data / "harmful_train.jsonl"),
                                   normal=str(data / "normal_train.csv"), out=str(run),
                                   method="ga", steps=STEPS, max_length=192, overwrite=True,
                                   **settings)  # fmt: skip
            run_unlearn(config)
        measured = probes / f"{name}-nll"
        if not (measured / "results.json").is_file():
            config = EvalConfig(harmful=data / "harmful_val.jsonl", normal=data / "normal_val.csv",
                                n=60, generate=False)  # fmt: skip
            evaluate_model(run, config, out=measured, reference=reference)
        results = json.loads((measured / "results.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        moved = {k: results["forgetting"][k] for k in ("unsafe_rise", "safe_rise", "normal_rise")}
        rows.append({"probe": name, **settings, "steps": STEPS,
                     "train_seconds": summary.get("train_seconds"), **moved})  # fmt: skip
    (probes / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(row, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
