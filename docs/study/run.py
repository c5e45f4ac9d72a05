"""The efficacy study of docs/study.md, end to end through the package's own API.

Every arm is an `sku-fast unlearn` run on the training split; SKU's λ is chosen on the
validation split by the λ sweep (`select_lambda`); the final numbers come from `sku-fast eval`
on the test split, which nothing was chosen on. Runs are reused when their folder is complete,
so the study can be stopped and continued.

    python docs/study/make_split.py runs/study/data
    python docs/study/run.py runs/study [ARM ...]        # default: every arm, in order
    python docs/study/report.py runs/study docs/study    # tables and plots

The intermediate points of a run (100 and 300 steps of a 1000-step run) are its checkpoints,
turned into run folders of their own: the same run seen earlier, not separate shorter runs
(whose learning rate would have decayed sooner).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from sku_fast.engine.output import write_atomically
from sku_fast.eval.evaluate import EvalConfig, Reference, evaluate_model
from sku_fast.eval.generation import GenerationConfig
from sku_fast.eval.select_lambda import (
    RunFolder,
    SweepConfig,
    choose,
    record_choice,
    select_lambda,
)
from sku_fast.unlearn.config import UnlearnConfig
from sku_fast.unlearn.pipeline import TWIN, negate_run, run_unlearn

HERE = Path(__file__).parent
# λ and the safe twin's weight c, chosen together on the validation split; over-refusal there
# is measured on harmless prompts of the study's own (the packaged ones are the test's)
GRID = (1.0, 2.0, 3.0)
CONTRASTS = (0.5, 0.75, 1.0)
VALIDATION = {"n": 60, "max_new_tokens": 48, "harmless": HERE / "harmless_validation.jsonl"}
# when no point meets every bound of the sweep's rule, the study takes the least harmful point
# within the NLL and over-refusal bounds whatever its similarity, and says so
FALLBACK = {"min_similarity": -1.0}
TEST = {"n": 150, "max_new_tokens": 48}  # the first 150 harmful and 120 normal test prompts

# The defaults this study chose (200 steps: keep, ε = (1, 1, 3), the safe twin), with λ chosen
# on the validation split; the paper's SKU as a user would start it (ε = (2.5, 2.5, 1), the
# diverging KL, no twin, λ = 1) at 300 steps, into its runaway, and with the guard at 300 and
# at the paper's 1000; and the gradient-ascent baseline with LoRA (lr 2e-4) and as published
# (full fine-tuning, lr 2e-6). All on the embedded SmolLM2, LoRA r=32 on q/v, batch 2, on a
# 2-core CPU.
ARMS: dict[str, dict] = {
    "sku": {},
    # SKU trains two runs of 200 steps (θ_bad and its safe twin) and a GA step costs about what
    # an SKU step does (three sets forward and backward, one reference forward), so 400 GA
    # steps take about SKU's time; the measured times are in the results
    "ga-lora-same-time": {"method": "ga", "lora": True, "steps": 400},
    # the defaults with anchors: harmless prompts that sound harmful, refused by θ_bad and
    # answered by the twin, so that the negation answers them (written for the study)
    "sku-anchors": {"anchors": str(HERE / "anchors_train.jsonl")},
    "sku-paper": {
        "steps": 300,
        "preservation": "diverge",
        "contrast": 0.0,
        "lam": 1.0,
        "checkpoint_every": 100,
    },
    # the same with the guard: no gradient beyond κ = 0.3 nats per token of KL
    "sku-paper-guard": {
        "steps": 300,
        "preservation": "diverge",
        "contrast": 0.0,
        "lam": 1.0,
        "kl_cap": 0.3,
    },
    # the guard over the paper's full 1000 steps: does the cap hold the KL that long?
    "sku-paper-guard-1000": {
        "steps": 1000,
        "preservation": "diverge",
        "contrast": 0.0,
        "lam": 1.0,
        "kl_cap": 0.3,
        "checkpoint_every": 100,
    },
    # the paper's objective unguarded over its full 1000 steps: the runaway, run to the end
    "sku-paper-1000": {
        "steps": 1000,
        "preservation": "diverge",
        "contrast": 0.0,
        "lam": 1.0,
        "checkpoint_every": 100,
    },
    # the defaults again at another seed (data order, LoRA initialisation): how much of their
    # result is one draw
    "sku-seed-1": {"seed": 1},
    # the baseline as published: full fine-tuning, lr 2e-6, 1000 steps (the package's defaults
    # for --method ga); its checkpoint at 300 steps is about SKU's training time
    "ga": {"method": "ga", "checkpoint_every": 300},
}
# arms whose λ (over GRID) and twin weight c (over these) are chosen on the validation split
SWEEP: dict[str, tuple[float, ...]] = {"sku": CONTRASTS, "sku-anchors": (1.0,)}
# earlier points of a run (the baseline at 300 steps: about SKU's training time; the guard at
# 100 steps, beside the unguarded objective's)
CHECKPOINTS: dict[str, tuple[int, ...]] = {
    "sku-paper": (100,),
    "sku-paper-guard-1000": (100,),
    "ga": (300,),
}


def _data(root: Path, split: str) -> dict[str, Path]:
    return {"harmful": root / "data" / f"harmful_{split}.jsonl",
            "normal": root / "data" / f"normal_{split}.csv"}  # fmt: skip


def _train(root: Path, name: str) -> Path:
    out = root / name
    if (out / "summary.json").is_file():
        return out
    data = {key: str(path) for key, path in _data(root, "train").items()}
    config = UnlearnConfig(**data, out=str(out), overwrite=True, max_length=192, **ARMS[name])
    print(f"[{name}] training", flush=True)
    return run_unlearn(config)


def _adapter_from_checkpoint(checkpoint: Path, like: Path, out: Path) -> None:
    """A PEFT adapter folder from a checkpoint's trainable weights (PEFT drops ".default")."""
    out.mkdir(parents=True)
    shutil.copy(like / "adapter_config.json", out / "adapter_config.json")
    weights = load_file(checkpoint / "trainable.safetensors")
    save_file({k.replace(".default", ""): v for k, v in weights.items()},
              out / "adapter_model.safetensors")  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fresh_sibling(run: Path, out: Path, shared: tuple[str, ...]) -> None:
    """An empty run folder `out` beside `run` that links to `run`'s `shared` entries (a
    half-made one from an interrupted study is replaced)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for name in shared:
        (out / name).symlink_to((run / name).resolve())


def _model_from_checkpoint(checkpoint: Path, like: Path, out: Path) -> None:
    """A model folder like `like` (config, tokenizer, the same tensor names and dtypes) with
    a full fine-tuning checkpoint's weights; written beside `out`, then renamed into place."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(like, staging, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(checkpoint / "trainable.safetensors")
    names = load_file(like / "model.safetensors")
    tensors = {name: weights[name].to(kept.dtype) for name, kept in names.items()}
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
    staging.rename(out)


def at_step(run: Path, step: int) -> Path:
    """The run as it was at `step`, as a run folder of its own (LoRA runs, or the baseline
    with full fine-tuning, whose model is the trained model itself)."""
    out = run.parent / f"{run.name}@{step}"
    if (out / "model").is_dir():
        return out
    _fresh_sibling(run, out, ("config.json", "original"))
    summary = json.loads((run / "summary.json").read_text())
    # the run's time pro rata: the steps of one run cost about the same
    seconds = summary["train_seconds"] * step / summary["steps"]
    _write_json(out / "summary.json", summary | {"steps": step, "train_seconds": round(seconds, 1)})
    checkpoint = run / "checkpoints" / f"step-{step:07d}"
    if not (run / "stage1/adapter").is_dir():
        _model_from_checkpoint(checkpoint, run / "model", out / "model")
        return out
    _adapter_from_checkpoint(checkpoint, run / "stage1/adapter", out / "stage1/adapter")
    if (run / "stage1/safe-adapter").is_dir():
        twin = run / TWIN / "checkpoints" / f"step-{step:07d}"
        _adapter_from_checkpoint(twin, run / "stage1/safe-adapter", out / "stage1/safe-adapter")
    folder = RunFolder.open(out)  # stage 2 at the run's own λ (a swept arm rewrites it)
    negate_run(folder.base, folder.tuned, folder.twin, folder.config.contrast, out,
               folder.config.lam)  # fmt: skip
    return out


def _choose_lambda(root: Path, run: Path, contrasts: tuple[float, ...]) -> None:
    if (run / "lambda-sweep" / "table.json").is_file():
        return
    print(f"[{run.name}] choosing λ and c on the validation split", flush=True)
    val = _data(root, "val")
    sweep = SweepConfig(grid=GRID, contrasts=contrasts, harmful=val["harmful"],
                        normal=val["normal"], **VALIDATION)  # fmt: skip
    summary = select_lambda(run, sweep)
    if summary["lambda"] is not None:
        return
    chosen, reason = choose(summary["rows"], dataclasses.replace(sweep, **FALLBACK))
    if chosen is None:
        return
    print(f"[{run.name}] the rule accepted no point; the study's fallback: {reason}", flush=True)
    folder = RunFolder.open(run)
    negate_run(folder.base, folder.tuned, folder.twin, chosen["contrast"], run, chosen["lambda"])
    table = json.dumps(summary | {"fallback": reason}, indent=2) + "\n"
    write_atomically(run / "lambda-sweep" / "table.json", lambda tmp: tmp.write_text(table),
                     directory=False)  # fmt: skip
    record_choice(run / "summary.json", chosen["lambda"], chosen["contrast"],
                  chosen_by="the study's fallback")  # fmt: skip


_original: list[Reference] = []  # loaded once: its answer likelihoods and answers are reused


def _evaluate(root: Path, name: str, model: Path | None) -> None:
    out = root / "eval" / name
    if (out / "results.json").is_file():
        return
    print(f"[{name}] evaluating on the test split", flush=True)
    test = _data(root, "test")
    generation = GenerationConfig(max_new_tokens=TEST["max_new_tokens"])
    config = EvalConfig(harmful=test["harmful"], normal=test["normal"], n=TEST["n"],
                        generation=generation)  # fmt: skip
    if not _original:
        _original.append(Reference.load(None))
    results = evaluate_model(model, config, out=out, reference=_original[0])
    summary = model / "summary.json" if model is not None else None
    if summary is not None and summary.is_file():
        results["run"] = json.loads(summary.read_text())
        _write_json(out / "results.json", results)


def _at_defaults(run: Path) -> Path:
    """The swept run negated at the package's defaults (λ = 2, c = 1), beside it."""
    out = run.parent / f"{run.name}-defaults"
    if (out / "model").is_dir():
        return out
    _fresh_sibling(run, out, ("config.json", "original", "stage1"))
    config = UnlearnConfig()
    folder = RunFolder.open(out)
    negate_run(folder.base, folder.tuned, folder.twin, 1.0, out, config.lam)
    summary = json.loads((run / "summary.json").read_text())
    defaults = {"lambda": config.lam, "contrast": 1.0, "lambda_chosen_by": "the defaults"}
    _write_json(out / "summary.json", summary | defaults)
    return out


def main(root: Path, arms: list[str]) -> None:
    _evaluate(root, "original", None)
    for name in arms:
        run = _train(root, name)
        folders = [run, *(at_step(run, step) for step in CHECKPOINTS.get(name, ()))]
        for folder in folders:
            if name in SWEEP:  # the defaults first: they need no sweep
                defaults = _at_defaults(folder)
                _evaluate(root, defaults.name, defaults)
                _choose_lambda(root, folder, SWEEP[name])
                _evaluate(root, f"{folder.name}-swept", folder)
            else:
                _evaluate(root, folder.name, folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(ARMS))
