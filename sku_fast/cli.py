"""The `sku-fast` command. Each subcommand lives in sku_fast/commands/ and is imported only
when it runs (or when --help lists it), so `sku-fast negate` never imports torch."""

import contextlib
import signal
import threading
from collections.abc import Iterator
from importlib import import_module

import click

from sku_fast import __version__
from sku_fast.errors import SkuFastError

# subcommand name -> "module:attribute" of its click.Command
SUBCOMMANDS = {
    "arithmetic": "sku_fast.commands.negate:arithmetic_command",
    "negate": "sku_fast.commands.negate:negate_command",
    "negate-lora": "sku_fast.commands.negate:negate_lora_command",
    "unlearn": "sku_fast.commands.unlearn:unlearn_command",
    "select-lambda": "sku_fast.commands.select_lambda:select_lambda_command",
    "eval": "sku_fast.commands.evaluate:eval_command",
    "compare": "sku_fast.commands.evaluate:compare_command",
}


# top-level module -> the extra that installs it (the base install is the engine and the CLI)
EXTRA_OF_MODULE = {
    **dict.fromkeys(
        ("torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "gguf",
         "yaml", "triton"),
        "train",
    ),
    "matplotlib": "eval",
}  # fmt: skip


def missing_extra_message(command: str | None, error: ModuleNotFoundError) -> str | None:
    """One line saying which extra to install, for a module that an extra provides."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    what = f"`sku-fast {command}`" if command else "this command"
    return (
        f"{what} needs the [{extra}] extra (module {top!r} is not installed): "
        f"pip install 'sku-fast[{extra}]'"
    )


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP (a killed job, a closed terminal) end a command the way Ctrl-C
    does, so temporaries are removed and earlier outputs put back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    handled = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, interrupt) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class LazyGroup(click.Group):
    """A group that imports a subcommand's module on first use and turns our errors, and a
    missing optional dependency, into a one-line message with a non-zero exit instead of a
    traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        try:
            with signals_as_interrupts():
                return super().invoke(ctx)
        except SkuFastError as error:
            raise click.ClickException(str(error)) from error
        except ModuleNotFoundError as error:
            message = missing_extra_message(ctx.invoked_subcommand, error)
            if message is None:
                raise
            raise click.ClickException(message) from error


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sku-fast")
def main() -> None:
    """Selective Knowledge negation Unlearning (SKU) for large language models.

    Train a "harmful" copy of a model, then subtract what it learned from the original.
    The negation streams over memory-mapped safetensors, so any size fits in little RAM.
    """


if __name__ == "__main__":  # `python -m sku_fast.cli`, `accelerate launch -m sku_fast.cli`
    main()
