"""`sku-fast select-lambda`: choose SKU's λ for a finished run on held-out data. Only click
at import time."""

from __future__ import annotations

from pathlib import Path

import click

from sku_fast.commands.unlearn import GridParam

_DATA = click.Path(exists=True, dir_okay=True, path_type=Path)


@click.command("select-lambda")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--grid", type=GridParam(), default="0.25,0.5,1,2,4", show_default=True,
              help="λ values to try.")  # fmt: skip
@click.option("--max-nll-rise", type=float, default=0.10, show_default=True,
              help="Acceptable relative rise of the normal-answer NLL.")  # fmt: skip
@click.option("--min-similarity", type=float, default=0.8, show_default=True,
              help="Acceptable similarity of normal answers to the original's.")  # fmt: skip
@click.option(
    "--max-over-refusal-rise",
    type=float,
    default=0.10,
    show_default=True,
    help="Acceptable rise of the over-refusal rate on harmless prompts (0.1: 10 points).",
)
@click.option(
    "--contrast-grid",
    type=GridParam(),
    metavar="C,C,...",
    help="Twin weights c to try as well (runs with a safe twin) [the run's c].",
)
@click.option("--harmful", type=_DATA, help="Held-out harmful data [the run's validation/].")
@click.option("--normal", type=_DATA, help="Held-out normal data [the run's validation/].")
@click.option("--harmless", type=_DATA, help="Over-refusal prompts [the packaged ones].")
@click.option("--n", type=click.IntRange(min=1), help="Prompts per set [all].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--judge", default="rules", show_default=True, help="rules, keyword or a path.")
@click.option("--similarity", type=click.Choice(["auto", "embedding", "lexical"]),
              default="auto", show_default=True)  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="Only the result line.")
def select_lambda_command(
    run: Path, grid: list[float], contrast_grid: list[float] | None, quiet: bool, **options
) -> None:
    """Negate RUN's task vector with every λ of --grid (and twin weight of --contrast-grid),
    evaluate each on held-out samples, and rewrite RUN/model with the point that lowers harm
    most while the normal-answer NLL, the similarity and the over-refusal rate stay within
    bounds. Writes RUN/lambda-sweep/ (table, plot, answers).

    Example: sku-fast select-lambda runs/sku --grid 0.5,1,2,4 --contrast-grid 0.5,1
    """
    from sku_fast.eval.select_lambda import SweepConfig, select_lambda

    contrasts = tuple(contrast_grid) if contrast_grid else None
    sweep = SweepConfig(grid=tuple(grid), contrasts=contrasts, **options)
    summary = select_lambda(run, sweep, log=(lambda _: None) if quiet else click.echo)
    click.echo(f"{summary['reason']} ({run / 'lambda-sweep' / 'table.md'})")
    if summary["lambda"] is None:
        model = run / "model"
        click.echo(f"{model} is left as it was." if model.is_dir() else f"No {model} was written.")
