"""The `sku-fast` command. Each subcommand lives in sku_fast/commands/ and is imported only
when it runs (or when --help lists it), so `sku-fast negate` never imports torch."""

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
    "eval": "sku_fast.commands.evaluate:eval_command",
    "compare": "sku_fast.commands.evaluate:compare_command",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module on first use and turns our errors into a
    one-line message with a non-zero exit instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in SUBCOMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # subcommand not built yet
                return None
            raise
        return getattr(module, attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SkuFastError as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sku-fast")
def main() -> None:
    """Selective Knowledge negation Unlearning (SKU) for large language models.

    Train a "harmful" copy of a model, then subtract what it learned from the original.
    The negation streams over memory-mapped safetensors, so any size fits in little RAM.
    """


if __name__ == "__main__":  # `python -m sku_fast.cli`, `accelerate launch -m sku_fast.cli`
    main()
