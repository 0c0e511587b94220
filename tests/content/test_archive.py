from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
from pathlib import Path

import pytest

from app.content.archive import Archive
from app.ingest.model import Snippet


async def test_json_is_written_readable_and_decodes_back(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    transcript = {
        "video_id": "dQw4w9WgXcQ",
        "fetched_at": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
        "snippets": [Snippet(text="We're no strangers", start=18.5, duration=3.2)],
    }

    path = await archive.write_json("videos/dQw4w9WgXcQ.json", transcript)

    assert path == tmp_path / "videos" / "dQw4w9WgXcQ.json"
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "video_id"')
    assert json.loads(text) == {
        "video_id": "dQw4w9WgXcQ",
        "fetched_at": "2024-05-01T12:00:00Z",
        "snippets": [{"text": "We're no strangers", "start": 18.5, "duration": 3.2}],
    }


async def test_text_is_written_as_utf8(tmp_path: Path) -> None:
    archive = Archive(tmp_path)

    path = await archive.write_text("articles/abc/text.txt", "Grüße, 世界\n")

    assert path.read_bytes() == "Grüße, 世界\n".encode()


async def test_missing_directories_are_created(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "not" / "yet")

    path = await archive.write_text("a/b/c/file.html", "<html></html>")

    assert path.read_text() == "<html></html>"
    assert path.parent == tmp_path / "not" / "yet" / "a" / "b" / "c"


async def test_rewriting_replaces_the_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    await archive.write_text("x/page.html", "old")

    path = await archive.write_text("x/page.html", "new")

    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["page.html"]


async def test_a_value_that_cannot_be_encoded_leaves_the_old_file(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    path = await archive.write_json("v.json", {"version": 1})

    with pytest.raises(TypeError):
        await archive.write_json("v.json", {"version": object()})

    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["v.json"]


async def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    (tmp_path / "taken" / "inside").mkdir(parents=True)

    with pytest.raises(OSError, match="taken"):
        await archive.write_text("taken", "text")

    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert os.listdir(tmp_path / "taken") == ["inside"]


async def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    size = 4 * 1024 * 1024
    versions = [bytes([ord("a") + n]) * size for n in range(4)]
    path = await archive.write_text("big.txt", versions[0].decode())
    seen: list[bytes] = []
    torn: list[int] = []
    stop = threading.Event()

    def read_until_stopped() -> None:
        while not stop.is_set() or not seen:
            data = path.read_bytes()
            seen.append(data[:1])
            if data not in versions:
                torn.append(len(data))

    reader = asyncio.create_task(asyncio.to_thread(read_until_stopped))
    try:
        for round_ in range(12):
            await archive.write_text("big.txt", versions[round_ % len(versions)].decode())
    finally:
        stop.set()
        await reader

    assert torn == []
    assert len(seen) > 1


@pytest.mark.parametrize(
    "relative",
    [
        "../outside.txt",
        "a/../../outside.txt",
        "a/../b.txt",
        "..",
        "/etc/passwd",
        "//server/share",
        "..\\outside.txt",
        "",
        ".",
        "a/\x00b",
    ],
)
def test_paths_that_leave_the_archive_are_refused(tmp_path: Path, relative: str) -> None:
    archive = Archive(tmp_path / "archive")

    with pytest.raises(ValueError, match="archive path"):
        archive.path(relative)


async def test_writing_outside_the_archive_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    archive = Archive(tmp_path / "archive")

    with pytest.raises(ValueError, match="archive path"):
        await archive.write_text("../escaped.txt", "nope")
    with pytest.raises(ValueError, match="archive path"):
        await archive.write_json("/tmp/escaped.json", {})

    assert not (tmp_path / "escaped.txt").exists()


def test_a_symbolic_link_out_of_the_archive_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    archive = Archive(root)

    with pytest.raises(ValueError, match="leads out of the archive"):
        archive.path("link/secret.txt")


def test_ordinary_nested_paths_resolve_under_the_root(tmp_path: Path) -> None:
    archive = Archive(tmp_path)

    assert archive.path("videos/abc.json") == tmp_path / "videos" / "abc.json"
    assert archive.path("./videos//abc.json") == tmp_path / "videos" / "abc.json"
    assert archive.path("articles/..hidden/x") == tmp_path / "articles" / "..hidden" / "x"
