"""`sku-fast arithmetic`, `sku-fast negate` and `sku-fast negate-lora`: the streaming engine on
the command line. Only click at import time; the engine (no torch) is imported when a command
runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import click

_DTYPES = click.Choice(["bf16", "f16", "f32", "f64"], case_sensitive=False)
# Paths are checked by the engine, whose one-line errors name the problem (click's own
# readability check would print a usage error instead).
_PATH = click.Path(readable=False)


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
            type=click.IntRange(min=1, max=4096),
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


def _part_of_output(filename: str | os.PathLike, out: str) -> bool:
    """OUT, a path inside it, a folder above it, or one of its temporaries beside it."""
    path, target = Path(filename).absolute(), Path(out).absolute()
    if path == target or target in path.parents or path in target.parents:
        return True
    temporary = next((p for p in [path, *path.parents] if p.parent == target.parent), None)
    return temporary is not None and temporary.name.startswith(f".{target.name[:150]}")


def _run(quiet: bool, what: str, out: str, call: Callable[[Callable], object]) -> None:
    from sku_fast.engine.checkpoint import check_output_parent
    from sku_fast.errors import CheckpointError

    bar = _Bar(quiet)
    start = time.perf_counter()
    try:
        check_output_parent(out)
        written = call(bar)
    except ValueError as error:  # a bad option value (weight, scale): no traceback
        raise click.ClickException(str(error)) from error
    except CheckpointError as error:
        # The atomic writer reports any OSError while the output is built as a failure to write
        # OUT; one on an input (a side file of the base that cannot be read) is named as such.
        cause = error.__cause__
        if (
            str(error).startswith(f"{out}: cannot write the output")
            and isinstance(cause, OSError)
            and cause.filename is not None
            and not _part_of_output(cause.filename, out)
        ):
            message = f"{cause.filename}: cannot read: {cause.strerror or cause}"
            raise click.ClickException(message) from error
        raise
    except OSError as error:  # the engine names files in its errors; this is the safety net
        where = f"{error.filename}: " if error.filename is not None else ""
        raise click.ClickException(f"{where}{error.strerror or error}") from error
    finally:
        bar.close()
    if not quiet:
        click.echo(f"{what} -> {written} in {time.perf_counter() - start:.1f} s")


def _parse_add(value: str) -> tuple[str, float]:
    path, sep, weight = value.rpartition(":")
    if not sep or not path:
        raise click.BadParameter(f"expected TUNED:WEIGHT, got {value!r}", param_hint="--add")
    try:
        return path, float(weight)
    except ValueError:
        raise click.BadParameter(f"weight {weight!r} is not a number", param_hint="--add") from None


@click.command("arithmetic")
@click.argument("base", type=_PATH)
@click.argument("out", type=_PATH)
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
        out,
        lambda bar: task_arithmetic(
            base, tuned, out, dtype=dtype, threads=threads, overwrite=overwrite, progress=bar
        ),
    )


@click.command("negate")
@click.argument("base", type=_PATH)
@click.argument("tuned", type=_PATH)
@click.argument("out", type=_PATH)
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
        out,
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
@click.argument("adapter", type=_PATH)
@click.argument("out", type=_PATH)
@click.option("--scale", type=float, default=1.0, show_default=True, help="λ (lora_B × −λ).")
@click.option(
    "--base",
    type=_PATH,
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
        out,
        lambda _bar: negate_lora(adapter, out, scale, base=base, overwrite=overwrite),
    )
