"""``/content`` over a real server: what the offline fixtures ingest (a video with a recorded
transcript, a channel's videos, an article) read back, listed, filtered and searched."""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import responses

from tests.fakes.youtube import (
    OEMBED,
    VIDEO,
    player,
    read_fixture,
    serve_player,
    serve_timedtext,
    serve_watch_page,
)
from tests.support import InProcessServer, LocalSite, make_settings, running_server

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ARTICLE = (FIXTURES / "articles" / "fog_signals.html").read_bytes()
ARTICLE_TITLE = "How Lighthouse Keepers Listened to the Fog"
CHANNEL_URL = "https://www.youtube.com/@hollowpine"
CHANNEL_ID = "UCx7Qm2Lr9TbVn4KpWd3Hs8A"
CHANNEL_VIDEOS = ["Jq8vN2xLp4A", "Tz3kW9bRm1E", "hY6pC0sDf5U", "Lm4rX7eQa2O", "Bw1nH8uGk3I"]
# The recorded transcript's captions (timedtext_en.xml), as a reader sees them.
FIRST_CAPTION = "Every subway map you've used is lying to you."
VIGNELLI_AT = 8.88


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        data = player("player_manual_and_generated.json")
        mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
        mock.get(
            f"{CHANNEL_URL}/videos",
            body=(FIXTURES / "channels" / "channel_videos.html").read_text(encoding="utf-8"),
            content_type="text/html; charset=utf-8",
        )
        for video_id in [VIDEO, *CHANNEL_VIDEOS, "Pd5sV2yJc9Z"]:
            serve_watch_page(mock, video_id)
            serve_player(mock, video_id, data)
        serve_timedtext(mock, data)
        mock.add_passthru("http://127.0.0.1")
        yield mock


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE)}) as running:
        yield running


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        INGEST_ALLOW_PRIVATE_URLS="true",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        SURREALDB_URL=f"surrealkv://{tmp_path / 'content'}",
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as opened:
        yield opened


async def ingest(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    answer = await client.post("/ingest", json={"url": url, "channel_limit": "all"})
    assert answer.status_code == 200, answer.text
    done: dict[str, Any] = answer.json()
    return done


async def read_when(
    client: httpx.AsyncClient, path: str, ready: Any, within: float = 60
) -> dict[str, Any]:
    """GET ``path`` until ``ready(body)`` holds (agents run after an ingest ends)."""
    deadline = time.monotonic() + within
    while True:
        answer = await client.get(path)
        body: dict[str, Any] = answer.json()
        if answer.status_code == 200 and ready(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never got ready: {answer.status_code} {body}")
        await asyncio.sleep(0.1)


def tagged_and_summarised(item: dict[str, Any]) -> bool:
    return bool(item["tags"]) and bool(item["summary"]) and len(item["agent_runs"]) == 2


async def all_pages(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/content", params=query)).json()
        items += page["items"]
        cursor = page["next"]
        if cursor is None:
            return items


async def test_an_ingested_video_reads_back_whole_and_links_to_its_history(
    client: httpx.AsyncClient, youtube: responses.RequestsMock
) -> None:
    done = await ingest(client, f"https://www.youtube.com/watch?v={VIDEO}")
    assert done["status"] == "success"

    item = await read_when(client, f"/content/video:{VIDEO}", tagged_and_summarised)

    assert item["title"] == "How Transit Maps Lie to You & Why It Works"
    assert item["channel"] == "Lines & Stations"
    assert item["url"] == f"https://www.youtube.com/watch?v={VIDEO}"
    assert item["language"] == "English"
    assert item["text"].startswith(FIRST_CAPTION + " Stations are spaced evenly")
    segments = item["segments"]
    assert segments[0] == {
        "start": 0.4,
        "duration": 3.52,
        "text": FIRST_CAPTION,
        "url": f"https://www.youtube.com/watch?v={VIDEO}&t=0s",
    }
    vignelli = next(s for s in segments if "Vignelli" in s["text"])
    assert vignelli["start"] == VIGNELLI_AT
    assert vignelli["url"] == f"https://www.youtube.com/watch?v={VIDEO}&t=8s"
    assert " ".join(s["text"] for s in segments) == item["text"]
    # From the item to its history in the log.
    assert item["ingest_id"] == done["ingest_id"]
    ingest_row = (await client.get(f"/ingests/{item['ingest_id']}")).json()
    assert ingest_row["url"] == f"https://www.youtube.com/watch?v={VIDEO}"
    assert ingest_row["status"] == "success"
    for run in item["agent_runs"]:
        activity = (await client.get(f"/agents/{run['source_id']}")).json()
        assert activity["agent_name"] == run["agent"]
        assert activity["status"] == "completed"
    assert {run["agent"] for run in item["agent_runs"]} == {"tagger", "summarizer"}


async def test_a_channel_an_article_and_a_video_list_newest_first_and_filter(
    client: httpx.AsyncClient, youtube: responses.RequestsMock, site: LocalSite
) -> None:
    await ingest(client, f"https://www.youtube.com/watch?v={VIDEO}")
    article = await ingest(client, f"{site.base_url}/fog")
    channel = await ingest(client, CHANNEL_URL)
    assert channel["status"] == "queued"
    children = channel["details"]["ingest_ids"]
    for child in children:
        await read_when(client, f"/ingests/{child}", lambda row: row["status"] == "success")
    article_id = article["details"]["record"]
    await read_when(client, f"/content/{article_id}", tagged_and_summarised)

    everything = await all_pages(client, limit=2)
    ids = [item["id"] for item in everything]
    assert len(ids) == len(set(ids)) == 3 + len(children)
    times = [item["ingested_at"] for item in everything]
    assert times == sorted(times, reverse=True)
    assert ids.index(f"channel:{CHANNEL_ID}") < ids.index(article_id)
    assert ids[-1] == f"video:{VIDEO}"

    articles = (await client.get("/content", params={"type": "article"})).json()["items"]
    assert [(a["id"], a["title"]) for a in articles] == [(article_id, ARTICLE_TITLE)]
    assert articles[0]["summary"]
    tag = articles[0]["tags"][0]
    by_tag = (await client.get("/content", params={"tag": tag})).json()["items"]
    assert article_id in [item["id"] for item in by_tag]
    of_channel = await all_pages(client, channel=CHANNEL_ID)
    assert {item["id"] for item in of_channel} == {
        f"channel:{CHANNEL_ID}",
        *(f"video:{video_id}" for video_id in _child_videos(everything, VIDEO)),
    }
    whole_channel = (await client.get(f"/content/channel:{CHANNEL_ID}")).json()
    assert whole_channel["title"] == "Hollow Pine Woodworking"
    stored = [video for video in whole_channel["videos"] if video["id"]]
    assert len(stored) == len(children)


def _child_videos(items: list[dict[str, Any]], apart: str) -> list[str]:
    return [
        item["id"].partition(":")[2]
        for item in items
        if item["type"] == "video" and item["id"] != f"video:{apart}"
    ]


async def test_search_finds_the_article_and_the_second_of_the_video(
    client: httpx.AsyncClient, youtube: responses.RequestsMock, site: LocalSite
) -> None:
    await ingest(client, f"https://www.youtube.com/watch?v={VIDEO}")
    article = await ingest(client, f"{site.base_url}/fog")

    fog = (await client.get("/content/search", params={"q": "fog signal"})).json()
    vignelli = (await client.get("/content/search", params={"q": "Vignelli diagram"})).json()

    assert [hit["id"] for hit in fog["hits"]] == [article["details"]["record"]]
    assert "<mark>" in fog["hits"][0]["snippet"]
    assert fog["hits"][0]["title"] == ARTICLE_TITLE
    assert fog["hits"][0]["segment"] is None
    [hit] = vignelli["hits"]
    assert hit["id"] == f"video:{VIDEO}"
    assert "<mark>Vignelli</mark>" in hit["snippet"]
    assert "<mark>diagram</mark>" in hit["snippet"]
    assert hit["segment"]["start"] == VIGNELLI_AT
    assert hit["segment"]["url"] == f"https://www.youtube.com/watch?v={VIDEO}&t=8s"
    assert "Vignelli" in html.unescape(hit["segment"]["text"])
    only_videos = await client.get("/content/search", params={"q": "fog", "type": "video"})
    assert only_videos.json()["hits"] == []


async def test_a_second_ingest_of_a_url_keeps_one_item(
    client: httpx.AsyncClient, site: LocalSite
) -> None:
    first = await ingest(client, f"{site.base_url}/fog")
    again = await ingest(client, f"{site.base_url}/fog")

    assert again["status"] == "skipped"
    items = (await client.get("/content")).json()["items"]
    assert [item["id"] for item in items] == [first["details"]["record"]]
    assert items[0]["ingest_id"] == first["ingest_id"]


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"q": ""}, "q: must not be empty"),
        ({"q": "x" * 10_000}, "q: must be at most 500 characters, got 10,000"),
        ({"q": "@@"}, "q: '@@' has no words to search for"),
        ({"q": "fog", "type": "podcast"}, "type: must be one of article, channel, video"),
        ({"q": "fog", "since": "yesterday"}, "since: must be an ISO 8601 time"),
    ],
)
async def test_a_search_with_nothing_to_search_for_is_refused_clearly(
    client: httpx.AsyncClient, site: LocalSite, params: dict[str, str], said: str
) -> None:
    await ingest(client, f"{site.base_url}/fog")

    answer = await client.get("/content/search", params=params)

    assert answer.status_code == 400
    assert answer.json()["detail"].startswith(said)
    assert answer.json()["extra"]["field"] == said.partition(":")[0]


@pytest.mark.parametrize("query", ["'; DELETE content; --", "$x", "'; DELETE article; -- fog"])
async def test_surrealql_in_a_query_is_searched_for_and_changes_nothing(
    client: httpx.AsyncClient, site: LocalSite, query: str
) -> None:
    await ingest(client, f"{site.base_url}/fog")
    before = (await client.get("/content")).json()

    answer = await client.get("/content/search", params={"q": query})

    assert answer.status_code == 200
    assert answer.json()["query"] == query
    assert answer.json()["hits"] == []
    assert (await client.get("/content")).json() == before


@pytest.mark.parametrize(
    ("path", "params", "status", "field"),
    [
        ("/content/video:nope", {}, 404, None),
        ("/content/podcast:nope", {}, 404, None),
        ("/content", {"type": "podcast"}, 400, "type"),
        ("/content", {"until": "soon"}, 400, "until"),
        ("/content", {"cursor": "not-a-cursor"}, 400, "cursor"),
        ("/content", {"limit": "0"}, 400, None),
    ],
)
async def test_unknown_items_and_bad_filters_are_named(
    client: httpx.AsyncClient,
    path: str,
    params: dict[str, str],
    status: int,
    field: str | None,
) -> None:
    answer = await client.get(path, params=params)

    assert answer.status_code == status
    body = answer.json()
    assert body["status_code"] == status
    if field is not None:
        assert body["extra"]["field"] == field
        assert body["detail"].startswith(f"{field}: ")


async def test_the_routes_are_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/schema")).json()["paths"]

    assert {"/content", "/content/search", "/content/{content_id}"} <= set(paths)
    search = paths["/content/search"]["get"]
    assert {parameter["name"] for parameter in search["parameters"]} >= {"q", "type", "tag"}
    assert "503" in search["responses"]


async def test_read_tokens_guard_the_content(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, READ_TOKENS="reader", ARCHIVE_DIR=str(tmp_path))
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url) as client,
    ):
        for path in ("/content", "/content/search?q=fog", "/content/video:x"):
            assert (await client.get(path)).status_code == 401
            with_token = await client.get(path, headers={"Authorization": "Bearer reader"})
            assert with_token.status_code in (200, 404)
