"""Writing output files so that a failure never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from digitnet.errors import DigitnetError

_ADVICE = {
    errno.ENOSPC: "free some disk space or write to another disk",
    errno.EDQUOT: "free some of your disk quota or write to another disk",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
}

T = TypeVar("T")


class WriteError(DigitnetError):
    """A file that could not be written; `reason` is the system's word for why (no path in it)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.reason = reason
        super().__init__(f"could not write {path}: {reason}")


def write_atomically(path: str | Path, write: Callable[[Path], T]) -> T:
    """`write` a temp file beside `path`, flush it to disk, rename it over `path`; returns what `write` returns.

    Readers, and a crash or kill at any moment, see the old file or the whole new one; a killed
    process at worst leaves a hidden `.<name>.<random>.tmp` beside it, which no glob for images
    or models picks up (so `write` must name its format: savefig(format=...), not by suffix).
    A failed write removes the temp file; an OS error (full disk, unwritable folder) becomes one
    DigitnetError.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = write(tmp)
        _fsync(tmp)  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
        if os.name != "nt":  # Windows cannot open a folder to sync it
            _fsync(path.parent)  # and the rename itself
        return result
    except OSError as err:
        _remove(tmp)
        advice = _ADVICE.get(err.errno)
        raise WriteError(path, f"{err.strerror or err}" + (f"; {advice}" if advice else "")) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    """Best effort: the error that made the write fail is the one to report."""
    with contextlib.suppress(OSError):
        tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwritable(folder: str | Path) -> Path | None:
    """What stands in the way of creating files in `folder` (made when missing): its nearest existing
    ancestor if that is a file or a folder no file can be created in, else None. Creates nothing for
    good; a trial file is the only sure test (root passes every permission check on a read-only place)."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if existing.is_dir():
        try:
            tempfile.TemporaryFile(dir=existing).close()
            return None
        except OSError:
            pass
    return existing
