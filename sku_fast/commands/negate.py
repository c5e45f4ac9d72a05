"""`sku-fast arithmetic`, `sku-fast negate` and `sku-fast negate-lora`: the streaming engine on
the command line. Only click at import time; the engine (no torch) is imported when a command
runs."""

from __future__ import annotations

import time
from collections.abc import Callable

import click

_DTYPES = click.Choice(["bf16", "f16", "f32", "f64"], case_sensitive=False)


def _common_options(command: Callable) -> Callable:
    options = [
        click.option(
            "--dtype",
            type=_DTYPES,
            default=None,
            help="Output dtype of the floating tensors (default: the base's).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Worker threads (default: all cores).",
        ),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _Bar:
    """A tqdm progress bar in bytes, fed with (done, total) by the engine."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(quiet: bool, what: str, call: Callable[[Callable], object]) -> None:
    bar = _Bar(quiet)
    start = time.perf_counter()
    try:
        out = call(bar)
    except ValueError as error:  # a bad option value (weight, scale): no traceback
        raise click.ClickException(str(error)) from error
    finally:
        bar.close()
    if not quiet:
        click.echo(f"{what} -> {out} in {time.perf_counter() - start:.1f} s")


def _parse_add(value: str) -> tuple[str, float]:
    path, sep, weight = value.rpartition(":")
    if not sep or not path:
        raise click.BadParameter(f"expected TUNED:WEIGHT, got {value!r}", param_hint="--add")
    try:
        return path, float(weight)
    except ValueError:
        raise click.BadParameter(f"weight {weight!r} is not a number", param_hint="--add") from None


@click.command("arithmetic")
@click.argument("base", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--add",
    "adds",
    multiple=True,
    required=True,
    metavar="TUNED:WEIGHT",
    help="A tuned checkpoint or LoRA adapter and its weight; repeat for several.",
)
@_common_options
def arithmetic_command(base, out, adds, dtype, threads, overwrite, quiet) -> None:
    """Write OUT = BASE + Σ WEIGHT·(TUNED − BASE), streaming (flat memory).

    BASE and each TUNED are a .safetensors file, a directory with model.safetensors, or a
    sharded directory; a TUNED may also be a PEFT LoRA adapter directory.

    Example: sku-fast arithmetic base/ merged/ --add math/:0.5 --add code/:0.5
    """
    from sku_fast.engine.arithmetic import task_arithmetic

    tuned = [_parse_add(value) for value in adds]
    _run(
        quiet,
        f"{base} + task vectors of {len(tuned)} model(s)",
        lambda bar: task_arithmetic(
            base, tuned, out, dtype=dtype, threads=threads, overwrite=overwrite, progress=bar
        ),
    )


@click.command("negate")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="λ in OUT = BASE − λ·(TUNED − BASE).",
)
@_common_options
def negate_command(base, tuned, out, scale, dtype, threads, overwrite, quiet) -> None:
    """Write OUT = BASE − λ·(TUNED − BASE): subtract what TUNED learned (SKU stage 2).

    TUNED is a checkpoint like BASE or a PEFT LoRA adapter directory (merged while streaming,
    without loading the model).

    Example: sku-fast negate original/ harmful/ unlearned/ --scale 1.0
    """
    from sku_fast.engine.arithmetic import negate

    _run(
        quiet,
        f"{base} − {scale:g}·({tuned} − {base})",
        lambda bar: negate(
            base,
            tuned,
            out,
            scale,
            dtype=dtype,
            threads=threads,
            overwrite=overwrite,
            progress=bar,
        ),
    )


@click.command("negate-lora")
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--scale", type=float, default=1.0, show_default=True, help="λ (lora_B × −λ).")
@click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="Base checkpoint; needed only when the adapter stores whole modules (modules_to_save).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
def negate_lora_command(adapter, out, scale, base, overwrite, quiet) -> None:
    """Write the negated LoRA ADAPTER to OUT: merged onto its base it gives BASE − λ·τ.

    A few MB instead of a whole model; it loads with PEFT like any adapter.

    Example: sku-fast negate-lora harmful-adapter/ negated-adapter/
    """
    from sku_fast.engine.adapter_negation import negate_lora

    _run(
        quiet,
        f"negated adapter {adapter} (λ = {scale:g})",
        lambda _bar: negate_lora(adapter, out, scale, base=base, overwrite=overwrite),
    )
