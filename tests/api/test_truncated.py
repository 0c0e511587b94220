"""Reads that reach into events retention removed are told so, never silently skip them:
``/events?after=`` carries a ``truncated`` field and every log stream a ``truncated`` frame
(no id) naming the range and the archive segment holding it, then the oldest retained
events; a native EventSource (headless Chromium) sees the frame too."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config.retention import parse_rule
from app.eventlog import Event, NewEvent, canonical_payload
from app.eventlog.archives import Segment
from app.eventlog.retention import Retention
from tests.support import InProcessServer, SseFrame, make_settings, read_frames, running_server

RULES = [parse_rule("agent/heartbeat=7d")]


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        AGENTS_AUTO_RUN="false",
        INGEST_CONCURRENCY="0",
        AGENT_RUN_CONCURRENCY="0",
        LOG_ARCHIVE_DIR=str(tmp_path / "log-archive"),
    )
    async with running_server(settings) as running:
        yield running


async def trimmed_log(server: InProcessServer) -> tuple[list[Event], list[Event], list[Segment]]:
    """Agents beating and reporting, then a purge of their old heartbeats in segments of 30:
    what was written, what the table keeps, and the segments."""
    store = server.services.store
    for round_ in range(30):
        batch = [
            NewEvent(
                "agent",
                f"run-{n}",
                "heartbeat" if round_ % 5 else "progress",
                canonical_payload({"agent_name": "tagger", "message": f"{round_}"}),
            )
            for n in range(3)
        ]
        await store.append(batch)
    written = (await store.read_after(0, limit=1000)).events
    retention = Retention(
        store,
        RULES,
        Path(server.services.settings.retention.archive_dir),
        batch_events=30,
        clock=lambda: datetime.now(UTC) + timedelta(days=8),
    )
    result = await retention.purge()
    kept = (await store.read_after(0, limit=1000)).events
    assert len(result.segments) >= 2
    return written, kept, result.segments


def described(segment: Segment) -> dict[str, Any]:
    return {
        "first": segment.first_position,
        "last": segment.last_position,
        "count": segment.count,
        "segment": segment.name,
    }


async def test_a_page_reaching_into_removed_events_names_them(server: InProcessServer) -> None:
    written, kept, segments = await trimmed_log(server)
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        body = (await client.get("/events", params={"after": 0, "limit": 1000})).json()
        assert [e["position"] for e in body["events"]] == [e.position for e in kept]
        assert body["truncated"] == [described(segment) for segment in segments]

        # Paged: each page names the segments its range reaches into, and no others.
        after = segments[1].first_position
        body = (await client.get("/events", params={"after": after, "limit": 5})).json()
        reached = [
            described(segment)
            for segment in segments
            if segment.last_position > after and segment.first_position <= body["next_after"]
        ]
        assert body["truncated"] == reached
        assert described(segments[0]) not in body["truncated"]

        # Nothing of the progress stream was removed: no field at all, as before retention.
        body = (await client.get("/events", params={"after": 0, "event": "progress"})).json()
        assert "truncated" not in body
        assert [e["position"] for e in body["events"]] == [
            e.position for e in written if e.event == "progress"
        ]


@contextlib.asynccontextmanager
async def frames_of(
    client: httpx.AsyncClient, path: str, last_event_id: int
) -> AsyncIterator[AsyncIterator[SseFrame]]:
    headers = {"Last-Event-ID": str(last_event_id)}
    async with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        async with contextlib.aclosing(read_frames(response)) as frames:  # type: ignore[type-var]
            yield frames


async def until_position(frames: AsyncIterator[SseFrame], last: int) -> list[SseFrame]:
    found = []
    async for frame in frames:
        if (frame.event == "heartbeat" and frame.id is None) or frame.retry is not None:
            continue  # the stream's own heartbeats (agents' heartbeat events have ids)
        found.append(frame)
        if frame.id is not None and int(frame.id) >= last:
            return found
    raise AssertionError("stream ended")


@pytest.mark.parametrize("path", ["/events/stream", "/agents/stream"])
async def test_a_resume_into_removed_events_gets_a_truncated_frame(
    server: InProcessServer, path: str
) -> None:
    _, kept, segments = await trimmed_log(server)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        async with frames_of(client, path, 0) as frames:
            found = await until_position(frames, kept[-1].position)
        control = [frame for frame in found if frame.id is None]
        assert [(frame.event, frame.json()) for frame in control] == [
            ("truncated", described(segment)) for segment in segments
        ]
        # Named before the events it stands among, and then every retained event, once.
        assert found[0].event == "truncated"
        assert [int(frame.id) for frame in found if frame.id is not None] == [
            e.position for e in kept
        ]

        # Resumed past the first segment's range: only the later ones are named.
        after = segments[0].last_position
        async with frames_of(client, path, after) as frames:
            found = await until_position(frames, kept[-1].position)
        assert [frame.json()["segment"] for frame in found if frame.id is None] == [
            segment.name for segment in segments if segment.last_position > after
        ]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
async def test_a_native_event_source_sees_the_truncated_frame(
    server: InProcessServer, backend: str
) -> None:
    if backend != "sqlite":
        pytest.skip("the browser sees the same bytes on every backend; run once")
    playwright_api = pytest.importorskip("playwright.async_api")
    from tests.web.test_dashboard import CHROMIUM_ARGS

    _, kept, segments = await trimmed_log(server)
    async with playwright_api.async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            page = await browser.new_page()
            await page.goto(f"{server.base_url}/")
            seen = await page.evaluate(
                """([last]) => new Promise((resolve, reject) => {
                    const seen = {truncated: [], ids: [], lastEventId: []};
                    const source = new EventSource("/events/stream?last_event_id=0");
                    source.addEventListener("truncated", (e) => {
                        seen.truncated.push(JSON.parse(e.data));
                        seen.lastEventId.push(e.lastEventId);
                    });
                    for (const name of ["heartbeat", "progress"]) {
                        source.addEventListener(name, (e) => {
                            if (name === "heartbeat" && e.lastEventId === "") return;
                            seen.ids.push(Number(e.lastEventId));
                            if (Number(e.lastEventId) >= last) { source.close(); resolve(seen); }
                        });
                    }
                    setTimeout(() => { source.close(); reject(new Error("timeout")); }, 20000);
                })""",
                [kept[-1].position],
            )
        finally:
            await browser.close()
    assert seen["truncated"] == [described(segment) for segment in segments]
    # The frame has no id: the browser's Last-Event-ID is not moved by it.
    assert set(seen["lastEventId"]) == {""}
    assert seen["ids"] == [e.position for e in kept]


async def test_the_python_client_yields_what_was_removed_or_logs_it(
    server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    from app.client import ActivityClient, StreamEvent, Truncated

    _, kept, segments = await trimmed_log(server)
    async with ActivityClient(server.base_url) as client:
        items: list[Any] = []
        async for item in client.stream(last_event_id=0, report_truncated=True):
            items.append(item)
            if isinstance(item, StreamEvent) and item.position >= kept[-1].position:
                break
        assert [item for item in items if isinstance(item, Truncated)] == [
            Truncated(**described(segment)) for segment in segments
        ]
        assert [item.position for item in items if isinstance(item, StreamEvent)] == [
            e.position for e in kept
        ]
        # Not asked to yield them: never silent, a warning names each segment.
        async for item in client.stream(last_event_id=0):
            if item.position >= kept[-1].position:  # type: ignore[union-attr]
                break
    for segment in segments:
        assert any(segment.name in record.getMessage() for record in caplog.records)
