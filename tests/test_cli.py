from click.testing import CliRunner

from sku_fast import __version__
from sku_fast.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_every_subcommand_has_help():
    runner = CliRunner()
    listed = runner.invoke(main, ["--help"])
    assert listed.exit_code == 0
    for name in main.list_commands(None):
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


def test_runs_as_a_module_for_accelerate_launch():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sku_fast.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
