"""Atomic outputs: temporaries carry their owner, stale ones are cleaned up by the next run
into the same output (a previous output cut off mid-swap comes back), long names fit, and
folders made for a failed output are removed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sku_fast.engine import output
from sku_fast.engine.output import (
    NAME_MAX,
    StagedOutput,
    check_output,
    remove_stale_temporaries,
    temporary_path,
    write_atomically,
)
from sku_fast.errors import CheckpointError


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary_of(out: Path, role: str, pid: int) -> Path:
    path = temporary_path(out, role)
    parts = path.name.rsplit("-", 2)  # ...-<pid>-<random>
    return path.with_name(f"{parts[0]}-{pid}-{parts[2]}")


def test_a_killed_runs_temporary_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    stale = _temporary_of(out, "tmp", _dead_pid())
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x" * 100)
    alive = _temporary_of(out, "tmp", os.getpid())  # a concurrent run's: not ours to touch
    alive.mkdir()
    foreign = tmp_path / ".out.tmp-12345678"  # no sku-fast mark: never touched
    foreign.mkdir()
    write_atomically(out, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert not stale.exists()
    assert alive.is_dir() and foreign.is_dir()
    assert (out / "new.txt").read_text() == "new"


def test_an_output_moved_aside_mid_swap_comes_back(tmp_path):
    """Killed between moving the old output aside and renaming the new one in: the old one is
    restored, not deleted, and the half-placed new one is dropped."""
    out = tmp_path / "out"
    aside = _temporary_of(out, "old", _dead_pid())
    aside.mkdir()
    (aside / "keep.txt").write_text("mine")
    _temporary_of(out, "tmp", _dead_pid()).mkdir()
    assert len(remove_stale_temporaries(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "mine"


def test_long_output_names_fit_and_clean_up(tmp_path):
    out = tmp_path / ("n" * 250)
    check_output(out, [], overwrite=False)
    assert len(temporary_path(out, "tmp").name.encode()) <= NAME_MAX

    def fail(tmp: Path) -> None:
        (tmp / "x").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device"):
        write_atomically(out, fail)
    assert list(tmp_path.iterdir()) == []
    write_atomically(out, lambda tmp: (tmp / "x").write_text("x"))
    assert (out / "x").read_text() == "x"
    with pytest.raises(CheckpointError, match=r"is 256 bytes; file systems allow 255"):
        check_output(tmp_path / ("n" * 256), [], overwrite=False)


def test_folders_made_for_a_failed_output_are_removed(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    (tmp_path / "keep").mkdir()
    with pytest.raises(KeyboardInterrupt), StagedOutput(out) as staging:
        assert staging.parent == out.parent and staging.is_dir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_a_parent_that_cannot_be_created_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"file/out/x: cannot write the output"):
        write_atomically(tmp_path / "file" / "out" / "x", lambda tmp: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_only_the_owners_host_judges_a_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out"
    stale = _temporary_of(out, "tmp", _dead_pid())
    stale.mkdir()
    monkeypatch.setattr(output, "_host", lambda: "otherhst")
    assert remove_stale_temporaries(out) == []
    assert stale.is_dir()
