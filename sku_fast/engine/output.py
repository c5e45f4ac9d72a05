"""Writing a result beside its inputs safely: the checks on the output path and the atomic write.

An output is built under a temporary name beside the target, fsynced, then renamed into place,
so a reader sees the old output or the whole new one, never a part. Used by the streaming
engine (`arithmetic`), the LoRA negation (`adapter_negation`), the trainer's checkpoints and the
run folder of `sku-fast unlearn`. Standard library only.

Temporaries carry their owner in their name, `.<out>.sku-fast-<tmp|old>-<host>-<pid>-<random>`:
a run killed where it could not clean up (SIGKILL, power loss) leaves one behind, and the next
run into the same output removes it once its owner is gone, restoring a previous output that
was moved aside mid-swap. Nothing without that mark is ever removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from sku_fast.errors import CheckpointError

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
_MARK = "sku-fast"
# longest output name used verbatim inside a temporary's name; longer ones are shortened
_NAME_IN_TEMPORARY = 150


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """Never write into, over or around an input, through symlinks either: each input is
    compared as given (made absolute) and with its links resolved. The name must fit the file
    system, and an existing output needs `overwrite`."""
    target = out.resolve()
    for path in inputs:
        for inp in {path.resolve(), path.absolute()}:
            if target == inp or inp in target.parents:
                raise CheckpointError(f"output {out} is the input {path} or inside it")
            if target in inp.parents:
                raise CheckpointError(f"output {out} contains the input {path}")
    if len(out.name.encode()) > NAME_MAX:
        raise CheckpointError(
            f"output name {out.name[:40]}... is {len(out.name.encode())} bytes; file systems "
            f"allow {NAME_MAX}: choose a shorter name"
        )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(
            f"output {out} already exists (use --overwrite or overwrite=True to replace it)"
        )


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    """Copy the bytes of `src` to `dst` and fsync them."""
    shutil.copyfile(src, dst)
    fsync_path(dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(out: Path) -> str:
    """`.<name>.sku-fast-`, with a long name shortened (and hashed) so temporaries fit."""
    name = out.name
    if len(name.encode()) > _NAME_IN_TEMPORARY:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name.encode()[:_NAME_IN_TEMPORARY].decode(errors="ignore") + "~" + digest
    return f".{name}.{_MARK}-"


def temporary_path(out: Path, role: str) -> Path:
    """A fresh temporary name beside `out` that records this process as its owner."""
    token = f"{role}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return out.with_name(_prefix(out) + token)


def _owner_gone(host: str, pid: str) -> bool:
    if host != _host() or not pid.isdigit():
        return False  # another machine's, or not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, under another user
        return False
    return False


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries of `out` whose owner process is gone; a previous output that
    was moved aside mid-swap is put back first when `out` is missing. Returns what was
    removed or restored."""
    prefix = _prefix(out)
    handled = []
    if not out.parent.is_dir():
        return handled
    for path in sorted(out.parent.iterdir()):
        if not path.name.startswith(prefix):
            continue
        parts = path.name[len(prefix) :].split("-")
        if len(parts) != 4 or parts[0] not in ("tmp", "old") or not _owner_gone(*parts[1:3]):
            continue
        if parts[0] == "old" and not (out.exists() or out.is_symlink()):
            os.rename(path, out)  # the swap was cut short: the previous output comes back
        else:
            _remove(path)
        handled.append(path)
    return handled


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, deepest first."""
    created = []
    for parent in [directory, *directory.parents]:
        if parent.exists():
            break
        created.append(parent)
    directory.mkdir(parents=True, exist_ok=True)
    return created


class StagedOutput:
    """`with StagedOutput(out) as tmp: ...; stage.commit()` builds an output at `tmp` beside
    `out` and swaps it into place on commit. Leaving the block without a commit (an error,
    KeyboardInterrupt, SIGTERM through the CLI) removes the temporary and any parent folder
    made for it, and leaves an existing `out` as it was. An OSError becomes a CheckpointError
    naming `out`."""

    def __init__(self, out: Path, *, directory: bool = True) -> None:
        self.out, self.directory = Path(out), directory
        self.path = temporary_path(self.out, "tmp")
        self.committed = False
        self._created: list[Path] = []

    def __enter__(self) -> Path:
        try:
            self._created = _make_parents(self.out.parent)
            remove_stale_temporaries(self.out)
            if self.directory:
                self.path.mkdir()
        except OSError as error:
            self._discard()
            raise self._error(error) from error
        return self.path

    def commit(self) -> None:
        """fsync the temporary and rename it to `out`; a previous `out` is moved aside first
        and removed only once the new one is in."""
        aside = None
        placed = False
        try:
            fsync_path(self.path)
            if self.out.exists() or self.out.is_symlink():
                aside = temporary_path(self.out, "old")
                os.rename(self.out, aside)
            os.rename(self.path, self.out)
            placed = True
            fsync_path(self.out.parent)
        except BaseException as error:
            if placed:
                _remove(self.out)
            if aside is not None:
                os.rename(aside, self.out)  # the previous output, back in place
            if isinstance(error, OSError):
                raise self._error(error) from error
            raise
        self.committed = True
        if aside is not None:
            with contextlib.suppress(OSError):  # the new output is in place
                _remove(aside)

    def __exit__(self, kind, error, traceback) -> None:
        if not self.committed:
            self._discard()
            if isinstance(error, OSError) and not isinstance(error, CheckpointError):
                raise self._error(error) from error

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            _remove(self.path)
        for folder in self._created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _error(self, error: OSError) -> CheckpointError:
        """Names the output, and the file that failed when it is not one we were writing
        (an unreadable input file, a file standing where a folder must go)."""
        culprit = error.filename
        ours = culprit is not None and (
            str(culprit).startswith(str(self.path)) or Path(culprit) == self.out
        )
        where = f" ({culprit})" if culprit is not None and not ours else ""
        return CheckpointError(
            f"{self.out}: cannot write the output: {error.strerror or error}{where}"
        )


def write_atomically(out: Path, write: Callable[[Path], None], *, directory: bool = True) -> None:
    """Create `out` atomically: `write(tmp)` fills a temporary path beside it (a directory made
    for it, or with directory=False a file that `write` creates), which is fsynced and renamed
    into place; see StagedOutput for what happens on failure."""
    stage = StagedOutput(out, directory=directory)
    with stage as tmp:
        write(tmp)
        stage.commit()
