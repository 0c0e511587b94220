"""A YouTube video ingest end to end: a real server runs the job, the real
youtube-transcript-api talks to a fake YouTube at the network's edge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import responses

from app.ingest.pipeline import STEPS
from tests.fakes.youtube import (
    OEMBED,
    VIDEO,
    WATCH,
    player,
    read_fixture,
    serve_player,
    serve_timedtext,
    serve_video,
    serve_watch_page,
)
from tests.support import InProcessServer, SseFrame, make_settings, read_frames, running_server

URL = f"https://www.youtube.com/watch?v={VIDEO}&t=42s"


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
        yield mock


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_RETRY_BASE_SECONDS="0.05",
        INGEST_RETRY_ATTEMPTS="3",
    )
    async with running_server(settings) as running:
        yield running


async def ingest(server: InProcessServer, url: str = URL) -> list[SseFrame]:
    frames = []
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=60) as client,
        client.stream("POST", "/ingest/stream", json={"url": url}) as response,
    ):
        assert response.status_code == 200
        async for frame in read_frames(response):
            if frame.id is not None:
                frames.append(frame)
    return frames


def progress(frames: list[SseFrame]) -> list[dict[str, Any]]:
    return [frame.json() for frame in frames if frame.event == "progress"]


async def test_a_video_ingest_reports_each_step_and_stores_the_transcript(
    server: InProcessServer, youtube: responses.RequestsMock
) -> None:
    serve_video(youtube, VIDEO, player("player_manual_and_generated.json"))
    frames = await ingest(server)

    steps = progress(frames)
    assert [step["step"] for step in steps] == list(STEPS["video"])
    by_step = {step["step"]: step for step in steps}
    assert by_step["extracted_id"]["video_id"] == VIDEO
    length = by_step["transcript_fetched"]["transcript_length"]
    assert by_step["transcript_fetched"]["message"] == f"Transcript fetched ({length:,} chars)"
    assert frames[-1].event == "complete"
    result = frames[-1].json()
    assert result["type"] == "video"
    assert result["status"] == "success"
    assert result["details"]["video_id"] == VIDEO

    record = await server.services.content.get("video", VIDEO)
    assert record is not None
    assert record["transcript_length"] == length == len(record["transcript"])
    assert record["language_code"] == "en"
    assert record["is_generated"] is False
    assert record["title"] == json.loads(read_fixture("oembed.json"))["title"]
    archived = json.loads(
        await asyncio.to_thread(Path(result["details"]["archive_path"]).read_text, "utf-8")
    )
    assert archived["video_id"] == VIDEO
    assert archived["snippets"]
    assert {"text", "start", "duration"} <= archived["snippets"][0].keys()

    again = await ingest(server)
    assert again[-1].json()["status"] == "skipped"
    assert [step["step"] for step in progress(again)] == list(STEPS["video"][:3])


async def test_a_video_without_transcripts_ends_as_a_permanent_error(
    server: InProcessServer, youtube: responses.RequestsMock
) -> None:
    serve_video(youtube, VIDEO, player("player_transcripts_disabled.json"))
    frames = await ingest(server)
    result = frames[-1].json()
    assert result["status"] == "error"
    assert result["details"]["error_kind"] == "transcripts_disabled"
    assert result["details"]["retryable"] is False
    assert not any(step.get("retrying") for step in progress(frames))
    assert await server.services.content.get("video", VIDEO) is None


async def test_a_blocked_request_is_retried_and_the_retries_are_reported(
    server: InProcessServer, youtube: responses.RequestsMock
) -> None:
    data = player("player_manual_and_generated.json")
    serve_watch_page(youtube, VIDEO, status=429, body="Too Many Requests")
    serve_watch_page(youtube, VIDEO, status=429, body="Too Many Requests")
    serve_watch_page(youtube, VIDEO)
    serve_player(youtube, VIDEO, data)
    serve_timedtext(youtube, data)

    frames = await ingest(server)
    retries = [step for step in progress(frames) if step.get("retrying")]
    assert [(r["attempt"], r["attempts"]) for r in retries] == [(2, 3), (3, 3)]
    assert retries[0]["message"].endswith(". Retrying in 0.05 s (attempt 2/3).")
    assert retries[1]["message"].endswith(". Retrying in 0.1 s (attempt 3/3).")
    assert not any(".;" in r["message"] for r in retries)
    assert frames[-1].json()["status"] == "success"


async def test_a_block_that_persists_ends_as_a_retryable_error(
    server: InProcessServer, youtube: responses.RequestsMock
) -> None:
    youtube.get(WATCH, status=429, body="Too Many Requests")
    frames = await ingest(server)
    result = frames[-1].json()
    assert result["status"] == "error"
    assert result["details"]["retryable"] is True
    assert result["details"]["error_kind"] == "ip_blocked"
    assert "YOUTUBE_PROXY_URL" in result["message"]
    assert len([s for s in progress(frames) if s.get("retrying")]) == 2
