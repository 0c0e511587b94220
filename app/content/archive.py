"""The on-disk archive: transcripts as JSON, article HTML and text, each written atomically.

A file is written to a temporary name in its own directory, flushed to disk, then renamed
over the final name, so a reader (or a crash) sees the old file or the new one, never half.
"""

from __future__ import annotations

import asyncio
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from app.runtime.files import write_atomically

__all__ = ["Archive"]

_JSON_INDENT = 2


class Archive:
    """Files under ``root``, addressed by relative paths such as ``videos/<id>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def path(self, relative: str) -> Path:
        """The file ``relative`` names under the root.

        Raises ValueError for an empty or absolute path, a ``..`` part, or a path that leads
        out of the root through a symbolic link.
        """
        if not relative or "\x00" in relative:
            raise ValueError(f"archive path must be a non-empty relative path, got {relative!r}")
        parts = PurePosixPath(relative.replace("\\", "/"))
        if parts.is_absolute() or Path(relative).is_absolute():
            raise ValueError(f"archive path must be relative, got {relative!r}")
        if ".." in parts.parts:
            raise ValueError(f"archive path must not contain '..', got {relative!r}")
        target = self.root.joinpath(*parts.parts)
        if target == self.root:
            raise ValueError(f"archive path must name a file, got {relative!r}")
        root = self.root.resolve()
        if not target.resolve().is_relative_to(root):
            raise ValueError(f"archive path {relative!r} leads out of the archive {root}")
        return target

    async def write_json(self, relative: str, value: Any) -> Path:
        """Write ``value`` as indented JSON (msgspec: structs, datetimes, … as usual)."""
        target = self.path(relative)
        data = msgspec.json.format(msgspec.json.encode(value), indent=_JSON_INDENT) + b"\n"
        await asyncio.to_thread(write_atomically, target, data)
        return target

    async def write_text(self, relative: str, text: str) -> Path:
        target = self.path(relative)
        await asyncio.to_thread(write_atomically, target, text.encode("utf-8"))
        return target

    async def write_bytes(self, relative: str, data: bytes) -> Path:
        target = self.path(relative)
        await asyncio.to_thread(write_atomically, target, data)
        return target
