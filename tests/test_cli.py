import pytest
from click.testing import CliRunner

from sku_fast import __version__
from sku_fast.cli import SUBCOMMANDS, main, missing_extra_message


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_loads_and_has_help(name):
    """Walks the registry itself: a subcommand whose module fails to import fails here."""
    runner = CliRunner()
    listed = runner.invoke(main, ["--help"])
    assert listed.exit_code == 0 and name in listed.output
    result = runner.invoke(main, [name, "--help"])
    assert result.exit_code == 0, (name, result.output)
    assert result.output.startswith(f"Usage: main {name}")


def test_a_missing_extra_is_one_line_naming_it():
    error = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert missing_extra_message("unlearn", error) == (
        "`sku-fast unlearn` needs the [train] extra (module 'torch' is not installed): "
        "pip install 'sku-fast[train]'"
    )
    plots = ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")
    assert "[eval] extra" in missing_extra_message("compare", plots)
    assert missing_extra_message("eval", ModuleNotFoundError("x", name="nosuch")) is None


def test_runs_as_a_module_for_accelerate_launch():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sku_fast.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
