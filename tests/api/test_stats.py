"""``/stats`` and ``/stats/stream`` over a real server: the numbers after ingests and agent
events (agreeing with ``/ingests``, ``/agents`` and ``/events``), and the snapshot stream: one on
connect, one after a change, at most four a second in a burst, ids equal to the positions
reflected, and resume."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    InProcessServer,
    LocalSite,
    SseFrame,
    agent_event,
    make_settings,
    read_frames,
    running_server,
)

ARTICLE = (
    Path(__file__).resolve().parent.parent / "fixtures/articles/fog_signals.html"
).read_bytes()
TITLE = "How Lighthouse Keepers Listened to the Fog"
TOP_FIELDS = {
    "processing_count",
    "active_ingests",
    "ingests",
    "agents",
    "events",
    "recent",
    "position",
}


@pytest.fixture
def site() -> Iterator[LocalSite]:
    html = "text/html; charset=utf-8"
    with LocalSite({"/fog": (200, html, ARTICLE), "/slow": (200, html, ARTICLE)}) as running:
        yield running


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        INGEST_ALLOW_PRIVATE_URLS="true",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        # Agents after an ingest would add activities of their own; these tests count them.
        AGENTS_AUTO_RUN="false",
        HEARTBEAT_SECONDS="1",
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def post(client: httpx.AsyncClient, source_id: str, event: str, **payload: Any) -> int:
    response = await client.post(f"/agents/{source_id}/events", json=agent_event(event, **payload))
    assert response.status_code == 201, response.text
    position: int = response.json()["position"]
    return position


async def log_head_and_count(client: httpx.AsyncClient) -> tuple[int, int]:
    after, count = 0, 0
    while True:
        page = (await client.get("/events", params={"after": after, "limit": 1000})).json()
        count += len(page["events"])
        if page["next_after"] >= page["head"]:
            return page["head"], count
        after = page["next_after"]


@contextlib.asynccontextmanager
async def stats_frames(
    client: httpx.AsyncClient, headers: dict[str, str] | None = None
) -> AsyncIterator[AsyncIterator[SseFrame]]:
    async with client.stream("GET", "/stats/stream", headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"] == "text/event-stream"
        async with contextlib.aclosing(read_frames(response)) as frames:  # type: ignore[type-var]
            first = await anext(frames)
            assert first.retry == 3000
            assert first.id is None
            assert first.data == ""
            yield frames


async def next_stats(frames: AsyncIterator[SseFrame], within: float = 10.0) -> SseFrame:
    """The next ``stats`` frame, passing over heartbeats."""
    async with asyncio.timeout(within):
        async for frame in frames:
            if frame.event == "stats":
                return frame
            assert frame.event == "heartbeat", frame
            assert frame.id is None, frame
    raise AssertionError("stream ended")


async def test_the_numbers_after_ingests_and_agent_events(
    client: httpx.AsyncClient, site: LocalSite
) -> None:
    empty = await stats(client)
    assert set(empty) == TOP_FIELDS
    assert empty["processing_count"] == 0
    assert empty["active_ingests"] == []
    assert empty["recent"] == []
    assert empty["ingests"]["total"] == 0
    assert set(empty["ingests"]["by_status"].values()) == {0}
    assert empty["agents"] | {"by_status": None} == {
        "running": 0,
        "stalled": 0,
        "total": 0,
        "pending": 0,
        "finished": 0,
        "by_status": None,
    }
    assert empty["events"] == {"head": 0, "total": 0, "by_stream": {}}

    done = await client.post("/ingest", json={"url": f"{site.base_url}/fog"})
    assert done.json()["status"] == "success", done.text
    failed = await client.post("/ingest", json={"url": f"{site.base_url}/gone"})
    assert failed.json()["status"] == "error", failed.text
    await post(client, "tagger_a", "started", message="Tagging", progress=0.0)
    await post(client, "tagger_a", "progress", message="Processing video 5/10", progress=0.5)
    await post(client, "summarizer_b", "started", agent_name="summarizer")
    await post(client, "summarizer_b", "complete", agent_name="summarizer", message="Summarised")
    await post(client, "tagger_c", "failed", message="Model unavailable")

    body = await stats(client)
    head, count = await log_head_and_count(client)
    assert body["position"] == head
    assert body["events"]["head"] == head
    assert body["events"]["total"] == count
    assert sum(body["events"]["by_stream"].values()) == count
    assert body["events"]["by_stream"]["agent"] == 5
    ingests = body["ingests"]
    assert ingests["total"] == 2
    assert ingests["by_status"]["success"] == 1
    assert ingests["by_status"]["error"] == 1
    assert ingests["by_type"] == {"video": 0, "channel": 0, "article": 2}
    assert body["agents"]["running"] == 1
    assert body["agents"]["total"] == 3
    assert body["agents"]["finished"] == 2
    assert body["agents"]["by_status"]["completed"] == 1
    assert body["agents"]["by_status"]["failed"] == 1
    assert body["processing_count"] == 1  # the running tagger; no ingest is running
    assert body["active_ingests"] == []

    # The same numbers as the projections' own endpoints.
    for status in ("success", "error"):
        rows = (await client.get("/ingests", params={"status": status})).json()
        assert len(rows) == ingests["by_status"][status]
    running = (await client.get("/agents", params={"status": "running"})).json()
    assert [row["source_id"] for row in running] == ["tagger_a"]

    recent = body["recent"]
    assert [(item["kind"], item["status"]) for item in recent] == [
        ("agent", "failed"),
        ("agent", "completed"),
        ("ingest", "error"),
        ("ingest", "success"),
    ]
    positions = [item["position"] for item in recent]
    assert positions == sorted(positions, reverse=True)
    assert recent[0]["source_id"] == "tagger_c"
    assert recent[0]["label"] == "tagger"
    assert recent[0]["message"] == "Model unavailable"
    assert recent[1]["label"] == "summarizer"
    assert recent[1]["started_at"] is not None
    success = recent[3]
    assert success["url"] == f"{site.base_url}/fog"
    assert success["title"] == TITLE
    assert success["label"] == "article"
    assert success["started_at"] <= success["completed_at"]
    assert recent[2]["url"] == f"{site.base_url}/gone"


async def test_a_running_ingest_is_active_with_its_step_then_recent(
    client: httpx.AsyncClient, site: LocalSite
) -> None:
    site.delays["/slow"] = 1.5
    url = f"{site.base_url}/slow"
    accepted = (await client.post("/ingests", json={"url": url})).json()
    ingest_id = accepted["ingest_id"]
    deadline = time.monotonic() + 10
    while True:
        body = await stats(client)
        active = body["active_ingests"]
        if active and active[0]["step"] == "fetching":
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)
    assert [row["ingest_id"] for row in active] == [ingest_id]
    assert active[0]["url"] == url
    assert active[0]["status"] == "running"
    assert active[0]["type"] == "article"
    assert active[0]["started_at"] is not None
    assert body["processing_count"] == 1
    assert body["ingests"]["by_status"]["running"] == 1

    deadline = time.monotonic() + 15
    while (body := await stats(client))["active_ingests"]:
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)
    assert body["processing_count"] == 0
    assert body["recent"][0]["source_id"] == ingest_id
    assert body["recent"][0]["status"] == "success"


async def test_rebuilding_the_stats_projection_gives_the_same_numbers(
    client: httpx.AsyncClient, server: InProcessServer
) -> None:
    for index in range(30):
        await post(client, f"agent_{index % 7}", "progress", progress=index / 30)
        if index % 5 == 4:
            await post(client, f"agent_{index % 7}", "complete")
    before = await stats(client)
    await server.services.projections.rebuild("stats")
    await asyncio.sleep(0.6)  # past the reuse window of the cached snapshot
    after = await stats(client)
    assert after == before
    assert after["events"]["total"] == 36


async def test_the_stream_sends_a_snapshot_on_connect_and_after_each_change(
    client: httpx.AsyncClient,
) -> None:
    position = await post(client, "tagger_1", "started")
    async with stats_frames(client) as frames:
        first = await next_stats(frames)
        assert first.id == str(position)
        assert first.json() == await stats(client)
        assert first.json()["agents"]["running"] == 1

        position = await post(client, "tagger_1", "complete", message="Done")
        second = await next_stats(frames)
        assert second.id == str(position)
        data = second.json()
        assert data["position"] == position
        assert data["agents"]["running"] == 0
        assert data["agents"]["finished"] == 1
        assert data["recent"][0]["source_id"] == "tagger_1"

        # Nothing changes: heartbeats only, no id on them.
        async with asyncio.timeout(5):
            heartbeat = await anext(frames)
        assert heartbeat.event == "heartbeat"
        assert heartbeat.id is None
        assert heartbeat.json()["head"] == position


async def test_a_burst_of_changes_is_coalesced_to_four_snapshots_a_second(
    client: httpx.AsyncClient,
) -> None:
    received: list[tuple[float, SseFrame]] = []
    async with stats_frames(client) as frames:
        await next_stats(frames)

        async def read() -> None:
            while True:
                frame = await next_stats(frames, within=30)
                received.append((time.monotonic(), frame))

        reader = asyncio.create_task(read())
        started = time.monotonic()
        positions: list[int] = []
        while time.monotonic() - started < 2.0:
            # Ten writers at a time, as fast as the server takes them.
            positions += await asyncio.gather(
                *(post(client, f"burst_{n}", "progress", progress=0.5) for n in range(10))
            )
        elapsed = time.monotonic() - started
        last = max(positions)
        deadline = time.monotonic() + 10
        while not received or int(received[-1][1].id or 0) < last:
            assert time.monotonic() < deadline, "the final state never arrived"
            await asyncio.sleep(0.05)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader

    assert len(positions) >= 40, "the burst was too slow to test coalescing"
    # Coalesced: far fewer snapshots than changes, at most ~4 a second, spaced >= 0.25 s.
    assert len(received) <= 4 * (elapsed + 1) + 1, (len(received), elapsed)
    assert len(received) < len(positions) / 2
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(received)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    # Ids are the positions reflected: increasing, each one a real position, the last one the
    # final head, and every snapshot counts exactly the events up to its id.
    ids = [int(frame.id or 0) for _, frame in received]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert ids[-1] == last
    for _, frame in received:
        data = frame.json()
        assert data["position"] == int(frame.id or 0)
        assert data["events"]["total"] == data["events"]["head"] == data["position"]


async def test_resume_with_last_event_id(client: httpx.AsyncClient) -> None:
    first = await post(client, "tagger_1", "progress", progress=0.1)
    head = await post(client, "tagger_1", "progress", progress=0.2)

    # An id at or below the head: the current snapshot, at once.
    for last in (str(first), str(head)):
        async with stats_frames(client, {"Last-Event-ID": last}) as frames:
            frame = await next_stats(frames)
            assert frame.id == str(head)
            assert frame.json()["agents"]["running"] == 1
    query = await client.get("/stats/stream", params={"last_event_id": "x"})
    assert query.status_code == 400
    assert query.json()["extra"]["field"] == "last_event_id"

    # Past the head: one reset naming the head, then the snapshot.
    async with stats_frames(client, {"Last-Event-ID": str(head + 100)}) as frames:
        reset = await anext(frames)
        assert (reset.event, reset.id, reset.json()) == ("reset", None, {"head": head})
        assert (await next_stats(frames)).id == str(head)

    bad = await client.get("/stats/stream", headers={"Last-Event-ID": "-1"})
    assert bad.status_code == 400
    assert set(bad.json()) == {"status_code", "detail", "extra"}


async def test_a_quiet_agent_turns_stalled_on_the_stream(client: httpx.AsyncClient) -> None:
    await post(client, "tagger_quiet", "started")
    async with stats_frames(client) as frames:
        assert (await next_stats(frames)).json()["agents"]["running"] == 1
        # HEARTBEAT_SECONDS=1: three quiet periods make it stalled.
        async with asyncio.timeout(10):
            while True:
                data = (await next_stats(frames)).json()
                if data["agents"]["stalled"] == 1:
                    break
        assert data["agents"]["running"] == 0
        assert data["processing_count"] == 0
    assert (await stats(client))["agents"]["stalled"] == 1


async def test_many_subscribers_see_the_same_snapshots(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, ARCHIVE_DIR=str(tmp_path / "archive"))
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = [await stack.enter_async_context(stats_frames(client)) for _ in range(20)]
        firsts = [await next_stats(frames) for frames in streams]
        assert {frame.data for frame in firsts} == {firsts[0].data}
        position = await post(client, "tagger_1", "progress", progress=0.3)
        seconds = [await next_stats(frames) for frames in streams]
        assert {(frame.id, frame.data) for frame in seconds} == {(str(position), seconds[0].data)}
