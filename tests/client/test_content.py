"""``ActivityClient.list_content``, ``get_content`` and ``search_content`` against a real
server: typed items, pages that continue from their cursor, and refusals as ActivityError."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import responses

from app.client import (
    ActivityClient,
    ActivityError,
    ContentItem,
    ContentPage,
    SearchResults,
    Segment,
)
from tests.fakes.youtube import VIDEO, recorded_video
from tests.support import LocalSite, make_settings, running_server

ARTICLE = (
    Path(__file__).resolve().parent.parent / "fixtures" / "articles" / "fog_signals.html"
).read_bytes()


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with recorded_video() as mock:
        yield mock


@pytest.fixture
async def client(
    database_url: str, tmp_path: Path, youtube: responses.RequestsMock
) -> AsyncIterator[ActivityClient]:
    settings = make_settings(
        database_url,
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_ALLOW_PRIVATE_URLS="true",
        AGENTS_AUTO_RUN="false",
    )
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE)}) as site:
        async with (
            running_server(settings) as server,
            ActivityClient(server.base_url, timeout=60) as opened,
        ):
            for url in (f"https://www.youtube.com/watch?v={VIDEO}", f"{site.base_url}/fog"):
                done = await opened.request("POST", "/ingest", json={"url": url})
                assert done.json()["status"] == "success"
            yield opened


async def test_the_client_reads_and_searches_content_as_typed_values(
    client: ActivityClient,
) -> None:
    first = await client.list_content(limit=1)
    second = await client.list_content(limit=1, cursor=first.next)
    videos = await client.list_content(type="video")
    found = await client.search_content("Vignelli")
    item = await client.get_content(f"video:{VIDEO}")

    assert isinstance(first, ContentPage)
    assert [i.type for i in first.items + second.items] == ["article", "video"]
    assert second.next is None
    assert [i.id for i in videos.items] == [f"video:{VIDEO}"]
    assert isinstance(found, SearchResults)
    assert [hit.id for hit in found.hits] == [f"video:{VIDEO}"]
    assert isinstance(found.hits[0].segment, Segment)
    assert found.hits[0].segment.url == f"https://www.youtube.com/watch?v={VIDEO}&t=8s"
    assert isinstance(item, ContentItem)
    assert item.segments is not None
    assert item.segments[0].text == "Every subway map you've used is lying to you."


async def test_refusals_raise_activity_error_naming_the_problem(client: ActivityClient) -> None:
    with pytest.raises(ActivityError) as unknown:
        await client.get_content("video:nope")
    with pytest.raises(ActivityError) as bad:
        await client.search_content("fog", type="podcast")

    assert unknown.value.status_code == 404
    assert bad.value.status_code == 400
    assert bad.value.extra == {"field": "type"}
