"""A channel ingest end to end: its videos become child ingests run by the same job runner,
and the channel's row counts how many of them have finished."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import responses

from app.ingest.pipeline import STEPS
from tests.fakes.youtube import (
    OEMBED,
    player,
    read_fixture,
    serve_player,
    serve_timedtext,
    serve_watch_page,
)
from tests.support import (
    InProcessServer,
    SseFrame,
    make_settings,
    read_frames,
    running_server,
)

CHANNELS = Path(__file__).resolve().parent.parent / "fixtures" / "channels"
CHANNEL_URL = "https://www.youtube.com/@hollowpine"
VIDEOS_URL = "https://www.youtube.com/@hollowpine/videos"
PAGE = (CHANNELS / "channel_videos.html").read_text(encoding="utf-8")
HTML = "text/html; charset=utf-8"
FEED_URL = "https://www.youtube.com/feeds/videos.xml?channel_id=UCx7Qm2Lr9TbVn4KpWd3Hs8A"
RESOLVE_URL = re.compile(r"https://www\.youtube\.com/youtubei/v1/navigation/resolve_url.*")
# What requests says when the name www.youtube.com does not resolve (DNS down).
UNREACHABLE = (
    "HTTPSConnectionPool(host='www.youtube.com', port=443): Max retries exceeded with url: "
    '/@hollowpine (Caused by NameResolutionError("<urllib3.connection.HTTPSConnection object '
    "at 0x7f3a2c1e5d10>: Failed to resolve 'www.youtube.com' ([Errno -3] Temporary failure in "
    'name resolution)"))'
)
VIDEO_IDS = [
    "Jq8vN2xLp4A",
    "Tz3kW9bRm1E",
    "hY6pC0sDf5U",
    "Lm4rX7eQa2O",
    "Bw1nH8uGk3I",
    "Pd5sV2yJc9Z",
]


def serve_videos(mock: responses.RequestsMock) -> None:
    """Every video of the channel, for the child ingests."""
    data = player("player_manual_and_generated.json")
    mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
    for video_id in VIDEO_IDS:
        serve_watch_page(mock, video_id)
        serve_player(mock, video_id, data)
    serve_timedtext(mock, data)


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(VIDEOS_URL, body=PAGE, content_type=HTML)
        serve_videos(mock)
        yield mock


@pytest.fixture
def unreachable_youtube() -> Iterator[responses.RequestsMock]:
    """YouTube's channel pages cannot be reached (its name does not resolve): yt-dlp fails on
    every attempt, and each listing ends in the RSS fallback. Tests add the channel page."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(VIDEOS_URL, body=requests.ConnectionError(UNREACHABLE))
        mock.post(RESOLVE_URL, body=requests.ConnectionError(UNREACHABLE))
        mock.get(FEED_URL, body=(CHANNELS / "videos.xml").read_bytes(), content_type="text/xml")
        serve_videos(mock)
        yield mock


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_RETRY_ATTEMPTS="3",
        INGEST_RETRY_BASE_SECONDS="0.05",
    )
    async with running_server(settings) as running:
        yield running


async def ingest_channel(
    client: httpx.AsyncClient,
) -> tuple[str, list[SseFrame], list[dict[str, Any]]]:
    """The channel ingest's id, its stream as it ran, and its retries as the log has them."""
    async with client.stream(
        "POST", "/ingest/stream", json={"url": CHANNEL_URL, "channel_limit": "all"}
    ) as response:
        parent = response.headers["x-ingest-id"]
        frames = [frame async for frame in read_frames(response) if frame.id is not None]
    events = (await client.get(f"/ingests/{parent}/events")).json()["events"]
    retries = [
        event["payload"]
        for event in events
        if event["event"] == "progress" and event["payload"].get("retrying")
    ]
    return parent, frames, retries


async def wait_for_children(
    client: httpx.AsyncClient, parent: str, count: int
) -> list[dict[str, Any]]:
    children: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = (await client.get("/ingests", params={"parent_id": parent})).json()
        if len(children) == count and all(child["status"] == "success" for child in children):
            break
        await asyncio.sleep(0.1)
    return children


async def test_a_channel_queues_one_child_ingest_per_video_and_counts_them(
    server: InProcessServer, youtube: responses.RequestsMock
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        frames = []
        async with client.stream(
            "POST",
            "/ingest/stream",
            json={"url": "https://www.youtube.com/@hollowpine", "channel_limit": "all"},
        ) as response:
            parent = response.headers["x-ingest-id"]
            async for frame in read_frames(response):
                if frame.id is not None:
                    frames.append(frame)

        steps = [f.json()["step"] for f in frames if f.event == "progress"]
        assert steps == list(STEPS["channel"])
        result = frames[-1].json()
        assert result["type"] == "channel"
        assert result["status"] == "queued"
        details = result["details"]
        assert details["channel_id"] == "UCx7Qm2Lr9TbVn4KpWd3Hs8A"
        assert details["channel_name"] == "Hollow Pine Woodworking"
        assert details["video_count"] == len(VIDEO_IDS)
        assert len(set(details["ingest_ids"])) == len(VIDEO_IDS)

        children = await wait_for_children(client, parent, len(VIDEO_IDS))
        assert sorted(child["ingest_id"] for child in children) == sorted(details["ingest_ids"])
        assert all(child["status"] == "success" for child in children)
        assert {child["type"] for child in children} == {"video"}

        row = (await client.get(f"/ingests/{parent}")).json()
        assert row["status"] == "queued"
        assert row["children_total"] == len(VIDEO_IDS)
        assert row["children_done"] == len(VIDEO_IDS)

    channel = await server.services.content.get("channel", "UCx7Qm2Lr9TbVn4KpWd3Hs8A")
    assert channel is not None
    assert channel["video_ids"] == VIDEO_IDS
    for video_id in VIDEO_IDS:
        assert await server.services.content.exists("video", video_id)


async def test_a_listing_that_cannot_reach_youtube_is_retried_and_the_retry_is_logged(
    server: InProcessServer, unreachable_youtube: responses.RequestsMock
) -> None:
    # The channel page (for the feed's channel id) cannot be reached the first time only.
    unreachable_youtube.get(CHANNEL_URL, body=requests.ConnectionError(UNREACHABLE))
    unreachable_youtube.get(CHANNEL_URL, body=PAGE, content_type=HTML)

    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        parent, frames, retries = await ingest_channel(client)

        result = frames[-1].json()
        assert result["status"] == "queued"
        assert result["details"]["source"] == "rss"
        assert result["details"]["video_count"] == len(VIDEO_IDS)
        [retry] = retries
        assert retry["step"] == "listing_videos"
        assert (retry["attempt"], retry["attempts"]) == (2, 3)
        assert retry["error_kind"] == "request_failed"
        assert retry["message"] == (
            "Could not connect to YouTube (network error). Retrying in 0.05 s (attempt 2/3)."
        )
        children = await wait_for_children(client, parent, len(VIDEO_IDS))
    assert all(child["status"] == "success" for child in children)


async def test_a_listing_that_never_reaches_youtube_ends_as_a_retryable_error(
    server: InProcessServer, unreachable_youtube: responses.RequestsMock
) -> None:
    unreachable_youtube.get(CHANNEL_URL, body=requests.ConnectionError(UNREACHABLE))

    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        _, frames, retries = await ingest_channel(client)

    result = frames[-1].json()
    assert result["status"] == "error"
    # A sentence for the user; requests' own words only in the details.
    assert result["message"] == "Could not connect to YouTube (network error)."
    assert UNREACHABLE in result["details"]["error"]
    assert result["details"]["error_kind"] == "request_failed"
    assert result["details"]["retryable"] is True
    assert result["details"]["attempts"] == 3
    assert [(r["attempt"], r["attempts"]) for r in retries] == [(2, 3), (3, 3)]
    for retry in retries:
        assert ".;" not in retry["message"]
        assert "HTTPSConnectionPool" not in retry["message"]
