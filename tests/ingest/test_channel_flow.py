"""A channel ingest end to end: its videos become child ingests run by the same job runner,
and the channel's row counts how many of them have finished."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
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
from tests.support import InProcessServer, make_settings, read_frames, running_server

CHANNELS = Path(__file__).resolve().parent.parent / "fixtures" / "channels"
VIDEOS_URL = "https://www.youtube.com/@hollowpine/videos"
VIDEO_IDS = [
    "Jq8vN2xLp4A",
    "Tz3kW9bRm1E",
    "hY6pC0sDf5U",
    "Lm4rX7eQa2O",
    "Bw1nH8uGk3I",
    "Pd5sV2yJc9Z",
]


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    data = player("player_manual_and_generated.json")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(
            VIDEOS_URL,
            body=(CHANNELS / "channel_videos.html").read_text(encoding="utf-8"),
            content_type="text/html; charset=utf-8",
        )
        mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
        for video_id in VIDEO_IDS:
            serve_watch_page(mock, video_id)
            serve_player(mock, video_id, data)
        serve_timedtext(mock, data)
        yield mock


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(database_url, ARCHIVE_DIR=str(tmp_path / "archive"))
    async with running_server(settings) as running:
        yield running


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

        children: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = (await client.get("/ingests", params={"parent_id": parent})).json()
            if len(children) == len(VIDEO_IDS) and all(
                child["status"] == "success" for child in children
            ):
                break
            await asyncio.sleep(0.1)
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
