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


# A command that holds a staged output open until it is killed. It starts as a foreground
# process would: a shell without job control starts background jobs with SIGINT ignored, and
# the test suite may run as one.
HOLD_AN_OUTPUT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import sku_fast.engine.arithmetic as arithmetic
from sku_fast.cli import main
from sku_fast.engine.output import write_atomically

def slow_write(tmp):
    (tmp / "part").write_text("half")
    print("ready", flush=True)
    time.sleep(60)

arithmetic.task_arithmetic = lambda base, tuned, out, **kw: write_atomically(Path(out), slow_write)
main(["negate", "base", "tuned", sys.argv[1]])
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_terminated_command_leaves_no_temporary(tmp_path, signal_name):
    import signal
    import subprocess
    import sys

    out = tmp_path / "deep" / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_AN_OUTPUT, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    assert len(list(out.parent.iterdir())) == 1  # the temporary
    child.send_signal(getattr(signal, signal_name))
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 1, stderr
    assert "Aborted!" in stderr
    assert list(tmp_path.iterdir()) == []  # no temporary, and "deep" made for it is gone
