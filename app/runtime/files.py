"""Files written so that a reader, or a crash, sees the old file or the new one, never half."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["fsync_directory", "write_atomically"]


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name in ``target``'s directory, sync it, rename it over
    ``target``, and sync the directory."""
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    # O_EXCL: never write through a name someone else created; 0o666 lets the umask decide.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    # The rename itself lives in the directory: without this a crash may forget it.
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
