"""`sku-fast unlearn`: SKU (or the gradient-ascent baseline) end to end. Only click at import
time; torch and transformers are imported when the command runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

# command-line option -> UnlearnConfig field; only options given on the command line override
# the --config file (click's defaults are None)
_FIELDS = {
    "model": "model",
    "harmful": "harmful",
    "normal": "normal",
    "harmful_prompt_column": "harmful_prompt_column",
    "harmful_answer_column": "harmful_answer_column",
    "normal_prompt_column": "normal_prompt_column",
    "normal_answer_column": "normal_answer_column",
    "method": "method",
    "lora": "lora",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "steps": "steps",
    "lam": "lam",
    "out": "out",
    "seed": "seed",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "lr": "lr",
    "k": "k",
    "max_length": "max_length",
    "epsilon": "epsilon",
    "guided_distortion": "guided_distortion",
    "random_disassociation": "random_disassociation",
    "preservation_divergence": "preservation_divergence",
    "preservation": "preservation",
    "kl_cap": "kl_cap",
    "safe_weight": "safe_weight",
    "contrast": "contrast",
    "anchors": "anchors",
    "validation": "validation",
    "lambda_grid": "lambda_grid",
    "loss_backend": "loss_backend",
    "checkpoint_every": "checkpoint_every",
    "resume": "resume",
    "overwrite": "overwrite",
    "gradient_checkpointing": "gradient_checkpointing",
}

SAMPLE_PROMPTS = 4  # harmful prompts in the before/after printout (and half as many normal)
DEFAULT_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)  # --lambda auto
AUTO_VALIDATION = 50  # samples per set held out for choosing λ, unless --validation says


class LambdaParam(click.ParamType):
    """A number, or `auto`."""

    name = "λ|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)


class GridParam(click.ParamType):
    """Comma-separated numbers."""

    name = "λ,λ,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


# the no-option demo on the embedded model (options given on the command line still win):
# 60 steps fit a 2-core CPU in minutes; λ 1.5, because at the default 2 two of the six
# held-out normal demo answers degraded (README, "sku-fast unlearn")
DEMO_SETTINGS = {"steps": 60, "batch_size": 2, "lam": 1.5}


@click.command("unlearn")
@click.option("--model", help="HF model directory or .gguf file [default: embedded SmolLM2].")
@click.option("--harmful", help="Harmful QA data (JSONL/JSON/CSV/save_to_disk) [default: demo].")
@click.option("--normal", help="Normal QA data, same formats [default: demo].")
@click.option("--harmful-prompt-column", help="Prompt column of --harmful (else detected).")
@click.option("--harmful-answer-column", help="Answer column of --harmful (else detected).")
@click.option("--normal-prompt-column", help="Prompt column of --normal (else detected).")
@click.option("--normal-answer-column", help="Answer column of --normal (else detected).")
@click.option("--method", type=click.Choice(["sku", "ga"]), help="SKU or gradient ascent.")
@click.option("--lora/--full", "lora", default=None, help="LoRA adapter [sku] or full [ga].")
@click.option("--lora-r", type=click.IntRange(min=1), help="LoRA rank [32].")
@click.option("--lora-alpha", type=click.IntRange(min=1), help="LoRA alpha [16].")
@click.option(
    "--steps", type=click.IntRange(min=1), help="Optimizer steps, exactly [sku 200; ga 1000]."
)
@click.option(
    "--lambda",
    "lam",
    type=LambdaParam(),
    help="Negation strength λ [2], or `auto`: chosen after training on held-out samples "
    "(see --lambda-grid and --validation).",
)
@click.option(
    "--lambda-grid",
    type=GridParam(),
    help="λ values to choose from, e.g. 0.25,0.5,1,2,4 (implies --lambda auto).",
)
@click.option(
    "--validation",
    type=click.IntRange(min=0),
    help="Samples of each set held out of training for choosing λ [0; 50 with --lambda auto].",
)
@click.option("--out", help="Output folder [sku-fast-runs/run].")
@click.option("--config", "config_file", type=click.Path(), help="JSON or YAML settings file.")
@click.option("--seed", type=int, help="Seed of sampling and initialisation [0].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per set and micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step [1].")
@click.option("--lr", type=float, help="Learning rate [2e-4; ga: 2e-6 full, 2e-4 LoRA].")
@click.option("--k", "k", type=click.IntRange(min=1), help="Random answers per prompt [1].")
@click.option("--max-length", type=click.IntRange(min=8), help="Tokens per row [256].")
@click.option(
    "--epsilon",
    type=float,
    nargs=3,
    help="Term weights ε1 ε2 ε3 [sku 1 1 3; with --preservation diverge 2.5 2.5 1; ga 0.5 1 1].",
)
@click.option("--guided-distortion/--no-guided-distortion", default=None, help="Ablation.")
@click.option("--random-disassociation/--no-random-disassociation", default=None, help="Ablation.")
@click.option(
    "--preservation-divergence/--no-preservation-divergence", default=None, help="Ablation."
)
@click.option(
    "--preservation",
    type=click.Choice(["diverge", "keep"]),
    help="SKU's KL on normal data: keep (+ε3·KL) [default] or diverge (−ε3·KL, the paper's).",
)
@click.option(
    "--kl-cap",
    type=float,
    help="κ: cap of a diverging KL per token (no gradient beyond it), against its runaway.",
)
@click.option(
    "--safe-weight",
    type=float,
    help="ε4: keep the KL small on the harmful prompts' safe answers (data with safe answers).",
)
@click.option(
    "--contrast",
    type=float,
    help="c: also train a safe twin on the safe answers and negate τ − c·τ_safe "
    "[1 when --harmful has safe answers, else 0; 0: the paper's negation].",
)
@click.option(
    "--anchors",
    help="Harmless prompts that sound harmful, with answer and refusal columns: SKU learns "
    "to answer them rather than refuse (docs/study.md).",
)
@click.option("--loss-backend", type=click.Choice(["fused-linear", "fused", "torch"]))
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the last checkpoint.")
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute activations in the backward: less memory, more compute [off].",
)
@click.option("--overwrite", is_flag=True, default=None, help="Replace a non-empty --out.")
@click.option("--samples/--no-samples", default=True, help="Print before/after generations.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (ours or the libraries').")
def unlearn_command(config_file: str | None, samples: bool, quiet: bool, **options) -> None:
    """Unlearn harmful knowledge: stage 1 trains θ_bad, stage 2 writes θ_o − λ·(θ_bad − θ_o).

    With no --model, --config or data it runs a short SKU demo (60 steps of batch 2, λ 1.5,
    unless given) on the embedded SmolLM2-135M-Instruct and the packaged demo data. The output
    folder holds model/ (loads with from_pretrained), the stage-1 result, the resolved
    config.json and a per-step log.jsonl.
    """
    from sku_fast.unlearn.config import UnlearnConfig
    from sku_fast.unlearn.pipeline import run_unlearn

    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    saved = Path(options["out"] or UnlearnConfig.out) / "config.json"
    if config_file is None and options["resume"] and saved.is_file():
        config_file = str(saved)  # --resume alone continues the run with its own settings
    config = UnlearnConfig.from_file(config_file) if config_file else UnlearnConfig()
    if options["epsilon"] == ():  # nargs=3 without a value gives an empty tuple
        options["epsilon"] = None
    given = {_FIELDS[key]: value for key, value in options.items() if value is not None}
    if given.get("epsilon") is not None:
        given["epsilon"] = list(given["epsilon"])
    real_data = any(key in given for key in ("harmful", "normal"))
    if config.model is None and "model" not in given and not config_file and not real_data:
        # the embedded demo: a short schedule that runs on a 2-core CPU in a few minutes
        given = {**DEMO_SETTINGS, **given}
    if given.get("lam") == "auto" or "lambda_grid" in given:
        if given.get("lam") == "auto":
            del given["lam"]
        given.setdefault("lambda_grid", list(DEFAULT_GRID))
        if not config.validation:
            given.setdefault("validation", AUTO_VALIDATION)
    config = UnlearnConfig.from_dict({**config.to_dict(), **given})
    resolved = config.resolve()
    # the settings file is an input too, unless it is the run's own (--resume)
    own = config_file is not None and Path(config_file).resolve() == saved.resolve()
    read = [config_file] if config_file is not None and not (resolved.resume and own) else []
    out = run_unlearn(resolved, progress=not quiet, also_read=read)
    from accelerate import PartialState

    from sku_fast.unlearn.engines import end_processes

    main_process = PartialState().is_main_process
    end_processes()
    if not main_process:  # under `accelerate launch`: the rest is one job
        return
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    click.echo(f"stage 1: {resolved.steps} steps, last {_format(log[-1])}" if log else "")
    if resolved.lambda_grid:
        from sku_fast.eval.select_lambda import SweepConfig, select_lambda

        sweep = select_lambda(
            out,
            SweepConfig(grid=tuple(resolved.lambda_grid)),
            log=(lambda _: None) if quiet else click.echo,
        )
        click.echo(f"λ sweep: {sweep['reason']} ({out / 'lambda-sweep' / 'table.md'})")
    click.echo(f"unlearned model: {out / 'model'}")
    if samples:
        _print_samples(resolved, out)


def _format(record: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "lr"))


def _sample_prompts(config, out: Path) -> tuple[list[str], list[str], str]:
    """(harmful, normal, where they come from) for the before/after printout: the packaged
    held-out demo prompts, the run's validation samples, or else the first training ones."""
    from sku_fast.unlearn.data import demo_data_path, load_qa_pairs

    if (out / "validation" / "harmful.jsonl").is_file():
        harmful = [p.prompt for p in load_qa_pairs(out / "validation" / "harmful.jsonl")]
        normal = [p.prompt for p in load_qa_pairs(out / "validation" / "normal.jsonl")]
        where = "held-out validation prompts (not trained on)"
    elif config.harmful is None and config.normal is None:
        rows = [json.loads(line) for line in demo_data_path("held_out").read_text().splitlines()]
        harmful = [r["prompt"] for r in rows if r["set"] == "harmful"]
        normal = [r["prompt"] for r in rows if r["set"] == "normal"]
        return harmful, normal, "held-out demo prompts (not trained on)"
    else:
        harmful = [p.prompt for p in load_qa_pairs(config.harmful or demo_data_path("harmful"))]
        normal = [p.prompt for p in load_qa_pairs(config.normal or demo_data_path("normal"))]
        where = "training prompts (hold some out with --validation N to see unseen ones)"
    return harmful[:SAMPLE_PROMPTS], normal[: SAMPLE_PROMPTS // 2], where


def _print_samples(config, out: Path) -> None:
    """Greedy answers of the original and the unlearned model, with the judge's verdicts and
    the harmful rate before and after over the harmful prompts shown."""
    from sku_fast.eval.samples import before_after

    harmful, normal, where = _sample_prompts(config, out)
    original = out / "original" if (out / "original").is_dir() else config.model
    samples = before_after(original, out / "model", harmful, normal)
    click.echo(f"\nGreedy answers to {where}, judged by the rule judge:")
    for sample in samples:
        click.echo(f"\n[{sample.kind}] {sample.prompt}")
        for label in ("before", "after"):
            verdict = getattr(sample, f"{label}_verdict")
            tag = f"{label} ({verdict})" if verdict else label
            click.echo(f"  {tag:>20}: {' '.join(getattr(sample, label).split())}")
    shown = [s for s in samples if s.kind == "harmful"]
    counts = {
        label: sum(getattr(s, f"{label}_verdict") == "harmful" for s in shown)
        for label in ("before", "after")
    }
    click.echo(
        f"\nharmful answers: {counts['before']}/{len(shown)} before, "
        f"{counts['after']}/{len(shown)} after unlearning"
    )
