from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from app.config import ContentSettings
from app.content.store import (
    ContentStore,
    ContentStoreLocked,
    ContentUnavailable,
    article_key,
)


@pytest.fixture(params=["mem", "surrealkv"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ContentStore]:
    url = "mem://" if request.param == "mem" else f"surrealkv://{tmp_path / 'content'}"
    opened = await ContentStore.open(ContentSettings(surrealdb_url=url))
    try:
        yield opened
    finally:
        await opened.close()


def kv_settings(tmp_path: Path) -> ContentSettings:
    return ContentSettings(surrealdb_url=f"surrealkv://{tmp_path / 'data' / 'content'}")


async def test_a_stored_record_reads_back_with_its_id(store: ContentStore) -> None:
    record = {
        "video_id": "dQw4w9WgXcQ",
        "title": "Never Gonna Give You Up",
        "transcript": [{"text": "We're no strangers", "start": 18.5, "duration": 3.2}],
        "language": "en",
        "chars": 4521,
    }

    stored = await store.put("video", "dQw4w9WgXcQ", record)

    assert stored == {**record, "id": "video:dQw4w9WgXcQ"}
    assert await store.get("video", "dQw4w9WgXcQ") == stored
    assert await store.exists("video", "dQw4w9WgXcQ")


async def test_a_missing_record_reads_as_none(store: ContentStore) -> None:
    assert await store.get("video", "nope") is None
    assert not await store.exists("video", "nope")


async def test_put_replaces_the_whole_record(store: ContentStore) -> None:
    await store.put("article", "k", {"title": "old", "author": "someone"})

    stored = await store.put("article", "k", {"title": "new"})

    assert stored == {"id": "article:k", "title": "new"}
    assert await store.get("article", "k") == stored


async def test_a_record_read_back_can_be_put_again_unchanged(store: ContentStore) -> None:
    first = await store.put("channel", "UC1", {"name": "A channel", "video_count": 3})

    again = await store.put("channel", "UC1", first)

    assert again == first


async def test_records_of_one_key_in_different_tables_are_separate(store: ContentStore) -> None:
    await store.put("video", "same", {"kind": "video"})
    await store.put("article", "same", {"kind": "article"})

    video = await store.get("video", "same")
    article = await store.get("article", "same")
    assert video is not None
    assert video["kind"] == "video"
    assert article is not None
    assert article["kind"] == "article"


async def test_merge_adds_fields_and_keeps_the_rest(store: ContentStore) -> None:
    await store.put("video", "v1", {"title": "T", "transcript": "words"})

    merged = await store.merge("video", "v1", {"tags": ["music"], "summary": "A song."})

    expected = {"id": "video:v1", "title": "T", "transcript": "words"}
    expected |= {"tags": ["music"], "summary": "A song."}
    assert merged == expected
    assert await store.get("video", "v1") == merged


async def test_merge_of_a_missing_record_returns_none_and_creates_nothing(
    store: ContentStore,
) -> None:
    assert await store.merge("video", "ghost", {"tags": ["x"]}) is None
    assert not await store.exists("video", "ghost")


async def test_none_removes_a_field(store: ContentStore) -> None:
    await store.put("video", "v1", {"title": "T", "summary": "old"})

    merged = await store.merge("video", "v1", {"summary": None})

    assert merged == {"id": "video:v1", "title": "T"}


async def test_query_table_finds_the_records_without_a_field(store: ContentStore) -> None:
    await store.put("video", "tagged", {"title": "a", "tags": ["x"]})
    await store.put("video", "untagged", {"title": "b"})
    await store.put("video", "empty_tags", {"title": "c", "tags": []})
    await store.put("article", "elsewhere", {"title": "d"})

    everything = await store.query_table("video")
    untagged = await store.query_table("video", where_missing="tags")

    assert sorted(row["id"] for row in everything) == [
        "video:empty_tags",
        "video:tagged",
        "video:untagged",
    ]
    assert untagged == [{"id": "video:untagged", "title": "b"}]


async def test_query_table_reaches_nested_fields_and_honours_the_limit(
    store: ContentStore,
) -> None:
    for number in range(5):
        meta = {"summary": "s"} if number % 2 else {}
        await store.put("article", f"a{number}", {"meta": meta})

    missing = await store.query_table("article", where_missing="meta.summary")
    limited = await store.query_table("article", limit=2)

    assert sorted(row["id"] for row in missing) == ["article:a0", "article:a2", "article:a4"]
    assert len(limited) == 2


@pytest.mark.parametrize(
    "key",
    [
        "x; DELETE video",
        "a`b",
        "x⟩; DELETE video; --",
        "video:other",
        "$record",
        "' OR 1=1 --",
        "https://example.com/?a=1&b=2#f",
        "12345",
        "space and ünïcode ✓",
    ],
)
async def test_a_hostile_key_is_only_data(store: ContentStore, key: str) -> None:
    await store.put("video", "bystander", {"title": "must survive"})

    stored = await store.put("video", key, {"title": "hostile"})

    assert stored["id"] == f"video:{key}"
    assert await store.get("video", key) == stored
    assert await store.exists("video", key)
    assert (await store.merge("video", key, {"tags": ["t"]})) is not None
    assert await store.get("video", "bystander") == {
        "id": "video:bystander",
        "title": "must survive",
    }
    rows = await store.query_table("video")
    assert sorted(row["id"] for row in rows) == sorted(["video:bystander", f"video:{key}"])


@pytest.mark.parametrize("table", ["user", "video; DELETE video", "", "VIDEO", "type::table"])
async def test_only_the_content_tables_are_accepted(store: ContentStore, table: str) -> None:
    with pytest.raises(ValueError, match="unknown content table"):
        await store.get(table, "k")
    with pytest.raises(ValueError, match="unknown content table"):
        await store.put(table, "k", {})
    with pytest.raises(ValueError, match="unknown content table"):
        await store.query_table(table)


async def test_an_empty_key_is_refused(store: ContentStore) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        await store.put("video", "", {})


@pytest.mark.parametrize("field", ["tags; DELETE video", "a b", "tags)", "", "1abc", "a..b"])
async def test_where_missing_takes_only_a_field_name(store: ContentStore, field: str) -> None:
    with pytest.raises(ValueError, match="field name"):
        await store.query_table("video", where_missing=field)


async def test_records_come_back_as_plain_json(store: ContentStore) -> None:
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)

    stored = await store.put(
        "video", "v1", {"published_at": when, "nested": [{"at": when}], "score": 0.5}
    )

    assert stored["published_at"] == "2024-05-01T12:30:00+00:00"
    assert stored["nested"] == [{"at": "2024-05-01T12:30:00+00:00"}]
    assert msgspec.json.decode(msgspec.json.encode(stored)) == stored
    read = await store.get("video", "v1")
    assert read == stored


async def test_many_writes_at_once_all_land(store: ContentStore) -> None:
    # Concurrent jobs: the first records of a new table, and merges into one record, conflict
    # inside SurrealDB's optimistic transactions; none may fail or be silently lost.
    await asyncio.gather(*(store.put("video", f"v{n}", {"n": n}) for n in range(30)))
    for round_ in range(10):
        key = f"v{round_}"
        await asyncio.gather(*(store.merge("video", key, {f"f{n}": n}) for n in range(20)))

        merged = await store.get("video", key)
        assert merged is not None
        assert {f"f{n}" for n in range(20)} <= merged.keys()
    assert len(await store.query_table("video")) == 30


async def test_health_passes_while_open_and_fails_once_closed(tmp_path: Path) -> None:
    store = await ContentStore.open(kv_settings(tmp_path))
    await store.health()

    await store.close()

    with pytest.raises(ContentUnavailable, match="closed"):
        await store.health()
    with pytest.raises(ContentUnavailable, match="closed"):
        await store.get("video", "k")
    await store.close()


async def test_credentials_are_not_used_for_an_embedded_database() -> None:
    settings = ContentSettings(surrealdb_url="mem://", user="root", password="secret")

    store = await ContentStore.open(settings)
    try:
        await store.health()
    finally:
        await store.close()


async def test_an_unreachable_server_is_reported_as_unavailable() -> None:
    settings = ContentSettings(surrealdb_url="ws://127.0.0.1:9/", user="root", password="root")

    with pytest.raises(ContentUnavailable, match=r"ws://127\.0\.0\.1:9/ is unavailable"):
        await ContentStore.open(settings)


async def test_surrealkv_data_outlives_the_process_that_wrote_it(tmp_path: Path) -> None:
    settings = kv_settings(tmp_path)
    first = await ContentStore.open(settings)
    await first.put("video", "v1", {"title": "kept"})
    await first.merge("video", "v1", {"tags": ["a"]})
    await first.close()

    second = await ContentStore.open(settings)
    try:
        assert await second.get("video", "v1") == {
            "id": "video:v1",
            "title": "kept",
            "tags": ["a"],
        }
    finally:
        await second.close()


async def test_opening_creates_the_parent_directories(tmp_path: Path) -> None:
    settings = ContentSettings(surrealdb_url=f"surrealkv://{tmp_path / 'a' / 'b' / 'content'}")

    store = await ContentStore.open(settings)
    await store.close()

    assert (tmp_path / "a" / "b").is_dir()


async def test_a_path_that_cannot_be_created_is_reported_as_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    settings = ContentSettings(surrealdb_url=f"surrealkv://{tmp_path / 'file' / 'content'}")

    with pytest.raises(ContentUnavailable, match="cannot be opened"):
        await ContentStore.open(settings)


async def test_a_second_opener_in_this_process_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    settings = kv_settings(tmp_path)
    first = await ContentStore.open(settings)

    with pytest.raises(ContentStoreLocked, match="already open in this process") as caught:
        await ContentStore.open(settings)
    assert str(tmp_path / "data" / "content") in str(caught.value)

    await first.close()
    second = await ContentStore.open(settings)
    await second.close()


REPO_ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import asyncio, sys
from app.content.store import ContentStore
from app.config import ContentSettings

async def main():
    store = await ContentStore.open(ContentSettings(surrealdb_url=sys.argv[1]))
    await store.put("video", "from_other", {"title": "written by the holder"})
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await store.close()

asyncio.run(main())
"""


async def start_holder(settings: ContentSettings) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        settings.surrealdb_url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    assert line == b"ready\n"
    return process


async def test_a_path_held_by_another_process_is_refused_naming_path_and_pid(
    tmp_path: Path,
) -> None:
    settings = kv_settings(tmp_path)
    holder = await start_holder(settings)
    try:
        with pytest.raises(ContentStoreLocked) as caught:
            await ContentStore.open(settings)
        message = str(caught.value)
        assert f"content store {tmp_path / 'data' / 'content'} is in use" in message
        assert f"(pid {holder.pid})" in message
        assert "SURREALDB_URL" in message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert await asyncio.wait_for(holder.wait(), timeout=30) == 0

    store = await ContentStore.open(settings)
    try:
        assert await store.get("video", "from_other") == {
            "id": "video:from_other",
            "title": "written by the holder",
        }
    finally:
        await store.close()


async def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    settings = kv_settings(tmp_path)
    holder = await start_holder(settings)

    holder.kill()
    await holder.wait()

    store = await ContentStore.open(settings)
    try:
        await store.health()
        lock_file = tmp_path / "data" / "content.lock"
        assert lock_file.read_text().strip() == str(os.getpid())
    finally:
        await store.close()


def test_article_key_is_a_hash_of_the_normalized_url() -> None:
    expected = hashlib.sha256(b"https://example.com/a?b=1").hexdigest()[:32]

    assert article_key("https://example.com/a?b=1") == expected
    assert article_key(" HTTPS://EXAMPLE.com/a?b=1#top ") == expected
    assert article_key("https://example.com/A?b=1") != expected
    assert len(expected) == 32
