"""Staged output: build the destination in a temporary sibling and move it into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputError
from .safetensors import write_all

FILE_MODE = 0o644
DIR_MODE = 0o755


def check_destination(src: Path | None, dst: Path, overwrite: bool) -> None:
    """Refuse destinations that would write into, over or around the source, or lose data; with ``src`` None
    (a Hub source not yet downloaded), only what DST alone decides."""
    try:
        _check_destination(src.resolve() if src is not None else None, dst.resolve(), overwrite)
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise OutputError(exc.strerror or str(exc), dst) from None
    except RuntimeError:  # Python 3.11's resolve() on a symlink loop
        raise OutputError("symlink loop", dst) from None


def _check_destination(src: Path | None, dst: Path, overwrite: bool) -> None:
    if src is not None and dst == src:
        raise OutputError("destination is the source checkpoint; the source is never written", dst)
    if src is not None and dst.is_relative_to(src):
        raise OutputError("destination is inside the source checkpoint", dst)
    if src is not None and src.is_relative_to(dst):
        raise OutputError("destination contains the source checkpoint", dst)
    if dst.exists() and not dst.is_dir():
        raise OutputError("exists and is not a directory", dst)
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise OutputError("exists and is not empty (use --overwrite to replace it)", dst)
    if not dst.parent.is_dir():
        raise OutputError("parent directory does not exist", dst.parent)
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise OutputError("parent directory is not writable", dst.parent)


@contextlib.contextmanager
def staged(dst: Path, overwrite: bool):
    """Yield a temporary sibling of ``dst``; on success it becomes ``dst``, on any failure it is removed."""
    dst = dst.resolve()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".rmconvert-tmp", dir=dst.parent))
    except OSError as exc:
        raise OutputError(f"cannot create a working directory: {exc.strerror}", dst.parent) from None
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        sync_file(tmp)  # the entries, before the name: a crash never leaves a partial DST
        _move_into_place(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync_file(dst.parent)  # the name


def _move_into_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, dst)  # replaces only a missing or empty directory
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not overwrite:
            reason = (
                "appeared and is not empty (another run?)"
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST)
                else exc.strerror
            )
            raise OutputError(f"cannot move the result into place: {reason}", dst) from None
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".rmconvert-old", dir=dst.parent))
    os.rename(dst, old / "replaced")
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def sync_file(path: Path) -> None:
    """Flush a file's (or a directory's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write a small output file with mode 0644, flushed to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, FILE_MODE)
