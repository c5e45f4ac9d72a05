"""Writing a result beside its inputs safely: the checks on the output path and the atomic write.

An output is built under a temporary name beside the target, fsynced, then renamed into place,
so a reader sees the old output or the whole new one, never a part. Used by the streaming
engine (`arithmetic`), the LoRA negation (`adapter_negation`) and the trainer's checkpoints.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from sku_fast.errors import CheckpointError


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """Never write into, over or around an input, through symlinks either: each input is
    compared as given (made absolute) and with its links resolved."""
    target = out.resolve()
    for path in inputs:
        for inp in {path.resolve(), path.absolute()}:
            if target == inp or inp in target.parents:
                raise CheckpointError(f"output {out} is the input {path} or inside it")
            if target in inp.parents:
                raise CheckpointError(f"output {out} contains the input {path}")
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


def write_atomically(out: Path, write: Callable[[Path], None], *, directory: bool = True) -> None:
    """Create `out` atomically: `write(tmp)` fills a temporary path beside it (a directory made
    for it, or with directory=False a file that `write` creates), which is fsynced and renamed
    into place. An existing `out` is moved aside first and removed only once the new one is in.

    On any error (KeyboardInterrupt included) the temporary output is removed and an existing
    `out` is put back as it was; an OSError becomes a CheckpointError naming `out`.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    aside: Path | None = None
    placed = False
    try:
        if directory:
            tmp.mkdir()
        write(tmp)
        fsync_path(tmp)
        if out.exists() or out.is_symlink():
            aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, aside)
        os.rename(tmp, out)
        placed = True
        fsync_path(out.parent)
    except BaseException as error:
        if placed:
            _remove(out)
        if aside is not None:
            os.rename(aside, out)  # the previous output, back in place
        _remove(tmp)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"{out}: cannot write the output: {error.strerror or error}"
            ) from error
        raise
    if aside is not None:
        with contextlib.suppress(OSError):  # the new output is in place; a leftover is harmless
            _remove(aside)
