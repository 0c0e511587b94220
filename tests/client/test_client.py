"""``app.client`` against real servers, with the network between them broken on purpose: a
proxy that severs connections, goes silent, or swallows answers, and servers that are
stopped, killed and started again while a producer keeps appending."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import ActivityClient, ActivityError, Reset, StreamEvent
from app.database import create_engine
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.ingest.pipeline import STEPS
from tests.client.proxy import Proxy
from tests.support import (
    InProcessServer,
    LocalSite,
    ServerProcess,
    eventually,
    make_settings,
    running_server,
)

ARTICLE = Path(__file__).resolve().parent.parent / "fixtures" / "articles" / "fog_signals.html"
TOTAL = 5000


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        SSE_RETRY_MS="100",
        INGEST_ALLOW_PRIVATE_URLS="true",
        AGENTS_AUTO_RUN="false",
        ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def proxy(server: InProcessServer) -> AsyncIterator[Proxy]:
    relay = await Proxy(int(server.base_url.rsplit(":", 1)[1])).start()
    try:
        yield relay
    finally:
        await relay.close()


@pytest.fixture
def site() -> Iterator[LocalSite]:
    page = ARTICLE.read_bytes()
    with LocalSite(
        {
            "/fog": (200, "text/html; charset=utf-8", page),
            "/slow": (200, "text/html; charset=utf-8", page.replace(b"Fog", b"Mist")),
        }
    ) as running:
        running.delays["/slow"] = 1.5
        yield running


def load_event(n: int) -> NewEvent:
    return NewEvent("load", f"src-{n % 7}", "tick", canonical_payload({"n": n}))


async def next_item(stream: AsyncIterator[Any], within: float = 15.0) -> Any:
    async with asyncio.timeout(within):
        return await anext(stream)


async def test_every_event_once_in_order_across_cuts_silence_and_two_restarts(
    database_url: str, tmp_path: Path
) -> None:
    server = ServerProcess(
        {
            "DATABASE_URL": database_url,
            "HEARTBEAT_SECONDS": "1",
            "SSE_RETRY_MS": "100",
            "TAIL_POLL_SECONDS": "0.2",
            "AGENTS_AUTO_RUN": "false",
            "ARCHIVE_DIR": str(tmp_path / "archive"),
        }
    )
    server.start()
    await server.wait_ready()
    relay = await Proxy(server.port).start()
    engine = create_engine(database_url, pool_size=2)
    store = await EventStore.open(engine, poll_seconds=0.2)
    positions: list[int] = []
    received: list[StreamEvent | Reset] = []

    async def consume() -> None:
        async with ActivityClient(relay.base_url, idle_timeout=3.0, max_delay=1.0) as client:
            async for item in client.stream({"stream": "load"}, last_event_id=0):
                received.append(item)
                if len(received) >= TOTAL:
                    return

    allowance = 0

    async def produce() -> None:
        """Append in batches of 10 at a steady pace, up to ``allowance`` for now."""
        while len(positions) < TOTAL:
            if len(positions) < allowance:
                start = len(positions)
                results = await store.append([load_event(n) for n in range(start, start + 10)])
                positions.extend(result.position for result in results)
            await asyncio.sleep(0.01)

    async def reached(produced: int, seen: int) -> None:
        """Wait until the producer is past ``produced`` events, the consumer past ``seen``
        and connected: the next break lands on a live stream, with appends still to come."""
        assert await eventually(
            lambda: len(positions) >= produced and len(received) >= seen and relay.open_links > 0,
            within=60,
        ), (produced, seen, len(positions), len(received), relay.open_links)
        seen_at_breaks.append(len(received))

    seen_at_breaks: list[int] = []
    consumer = asyncio.create_task(consume())
    producer = asyncio.create_task(produce())
    try:
        allowance = 1000
        await reached(600, 400)
        assert relay.sever() == 1  # a network drop mid-stream
        allowance = 2000
        await reached(1500, 1200)
        allowance = 2600  # appends go on while the server is down
        await asyncio.to_thread(server.stop)  # restart 1: SIGTERM
        server.start()
        await server.wait_ready()
        allowance = 3400
        await reached(2800, 2700)
        assert relay.freeze() == 1  # a connection that goes silent without closing
        allowance = 4600
        await reached(3800, 3600)
        server.kill()  # restart 2: SIGKILL
        allowance = TOTAL
        server.start()
        await server.wait_ready()
        await asyncio.wait_for(producer, 60)
        await asyncio.wait_for(consumer, 60)
    finally:
        for task in (producer, consumer):
            task.cancel()
        await asyncio.gather(producer, consumer, return_exceptions=True)
        await relay.close()
        await asyncio.to_thread(server.stop)
        await store.close()
        await engine.dispose()

    assert len(positions) == TOTAL
    assert all(isinstance(item, StreamEvent) for item in received)
    events = [item for item in received if isinstance(item, StreamEvent)]
    assert [event.position for event in events] == positions
    assert [event.data["payload"]["n"] for event in events] == list(range(TOTAL))
    # Each cut, stop, freeze and kill came mid-stream and forced a new connection.
    assert seen_at_breaks[-1] < TOTAL, seen_at_breaks
    assert relay.accepted >= 5


async def test_a_silent_connection_is_noticed_after_three_heartbeat_periods(
    server: InProcessServer, proxy: Proxy
) -> None:
    async with ActivityClient(proxy.base_url) as client:  # no idle_timeout: it learns one
        stream = client.stream({"stream": "load"})
        first = asyncio.create_task(next_item(stream, within=30))
        await asyncio.sleep(3.5)  # heartbeats every second: the client learns the period
        assert proxy.freeze() == 1
        frozen_at = time.monotonic()
        result = await server.services.store.append_one(load_event(1))
        event = await first
        waited = time.monotonic() - frozen_at
        await stream.aclose()

    assert isinstance(event, StreamEvent)
    assert event.position == result.position
    assert proxy.accepted == 2
    # Three periods of one second, then the retry: not the 45 s assumed before learning.
    assert 2.5 < waited < 8, waited


@pytest.mark.parametrize("retry_ms", [100, 1500])
async def test_a_dropped_stream_is_resumed_after_the_servers_retry_interval(
    database_url: str, tmp_path: Path, retry_ms: int
) -> None:
    settings = make_settings(
        database_url, SSE_RETRY_MS=str(retry_ms), ARCHIVE_DIR=str(tmp_path / "archive")
    )
    async with running_server(settings) as server:
        relay = await Proxy(int(server.base_url.rsplit(":", 1)[1])).start()
        try:
            async with ActivityClient(relay.base_url) as client:
                stream = client.stream({"stream": "load"})
                await server.services.store.append_one(load_event(0))
                first = await next_item(stream)
                second = asyncio.create_task(next_item(stream))
                relay.sever()
                cut_at = time.monotonic()
                assert await eventually(lambda: relay.accepted == 2, step=0.01)
                waited = time.monotonic() - cut_at
                await server.services.store.append_one(load_event(1))
                resumed = await second
                await stream.aclose()
        finally:
            await relay.close()
    assert (first.data["payload"], resumed.data["payload"]) == ({"n": 0}, {"n": 1})
    # The server's retry, plus at most a quarter of it as jitter (and scheduling slack).
    assert retry_ms / 1000 <= waited < retry_ms / 1000 * 1.25 + 0.3, waited


async def test_an_ingest_is_followed_to_complete_and_its_stream_then_stops_on_204(
    server: InProcessServer, site: LocalSite
) -> None:
    async with ActivityClient(server.base_url) as client:
        progress = client.ingest(f"{site.base_url}/fog")
        events = [event async for event in progress]
        assert progress.ingest_id is not None
        steps = [e.data["step"] for e in events if e.event == "progress"]
        assert steps == list(STEPS["article"])
        assert events[0].event == "requested"
        assert events[-1].event == "complete"
        assert progress.result == events[-1].data
        assert events[-1].data["status"] == "success"

        # Read from the start, the server ends the stream after complete; the client resumes
        # after complete, gets 204, and stops by itself.
        path = f"/ingests/{progress.ingest_id}/stream"
        async with asyncio.timeout(10):
            again = [item async for item in client.stream(path)]
        assert again == events
        async with asyncio.timeout(10):
            after = [item async for item in client.stream(path, events[-1].position)]
        assert after == []


async def test_payload_is_the_events_payload_on_ingest_and_on_the_log_stream_alike(
    server: InProcessServer, site: LocalSite
) -> None:
    async with ActivityClient(server.base_url) as client:
        progress = client.ingest(f"{site.base_url}/fog")
        followed = [event async for event in progress]
        assert progress.ingest_id is not None
        logged: list[StreamEvent] = []
        stream = client.stream({"stream": "ingest", "source_id": progress.ingest_id}, 0)
        while not logged or logged[-1].event != "complete":
            item = await next_item(stream)
            assert isinstance(item, StreamEvent)
            logged.append(item)
        await stream.aclose()

    # The same events, with the same payloads, whichever way they were read.
    assert [(e.position, e.event, e.payload) for e in logged] == [
        (e.position, e.event, e.payload) for e in followed
    ]
    messages = [e.payload.get("message") for e in logged if e.event == "progress"]
    assert messages
    assert all(messages), messages
    # The log stream's frames carry the envelope too; the ingest stream's carry none.
    for event in logged:
        assert event.envelope is not None
        assert event.envelope["payload"] == event.payload
        assert (event.envelope["source_id"], event.envelope["position"]) == (
            progress.ingest_id,
            event.position,
        )
        assert event.data == event.envelope  # the frame as sent
    assert all(event.envelope is None for event in followed)
    assert progress.result == followed[-1].payload == followed[-1].data


async def test_an_ingest_followed_through_a_cut_yields_each_event_once(
    server: InProcessServer, proxy: Proxy, site: LocalSite
) -> None:
    cut = False
    async with ActivityClient(proxy.base_url) as client:
        progress = client.ingest(f"{site.base_url}/slow")
        events: list[StreamEvent] = []
        async with asyncio.timeout(30):
            async for event in progress:
                events.append(event)
                if event.event == "progress" and event.data["step"] == "fetching":
                    # The server is waiting 1.5 s on the slow site: cut the stream now.
                    cut = proxy.sever() == 1
    assert cut
    assert proxy.accepted >= 2  # the stream (after POST /ingests, kept alive), then its resumption
    positions = [event.position for event in events]
    assert positions == sorted(set(positions))
    steps = [e.data["step"] for e in events if e.event == "progress"]
    assert steps == list(STEPS["article"])
    assert events[-1].event == "complete"
    assert events[-1].data["status"] == "success"


async def test_a_resume_point_past_the_head_is_surfaced_as_a_reset(
    server: InProcessServer,
) -> None:
    store = server.services.store
    await store.append([load_event(n) for n in range(3)])
    head = await store.head()
    async with ActivityClient(server.base_url) as client:
        stream = client.stream("/events/stream", last_event_id=head + 50)
        assert await next_item(stream) == Reset(head)
        appended = await store.append_one(load_event(3))
        event = await next_item(stream)
        await stream.aclose()
    assert isinstance(event, StreamEvent)
    # Position head + 1 is below the old resume point, and still yielded: it is new.
    assert event.position == appended.position == head + 1
    assert event.data["payload"] == {"n": 3}


async def test_refusals_raise_instead_of_retrying(server: InProcessServer) -> None:
    async with ActivityClient(server.base_url) as client:
        with pytest.raises(ActivityError) as unknown:
            async with asyncio.timeout(10):
                [item async for item in client.stream("/ingests/ing_nope/stream")]
        with pytest.raises(ActivityError) as bad_url:
            async for _ in client.ingest("ftp://example.com/file"):
                pass
    assert unknown.value.status_code == 404
    assert bad_url.value.status_code == 400
    assert "url" in bad_url.value.message


async def agent_events(client: httpx.AsyncClient, source_id: str) -> list[dict[str, Any]]:
    body = (await client.get("/events", params={"source_id": source_id, "limit": 1000})).json()
    found: list[dict[str, Any]] = body["events"]
    return found


async def test_agent_reports_are_written_once_when_answers_are_lost(
    server: InProcessServer, proxy: Proxy
) -> None:
    async with ActivityClient(proxy.base_url, max_delay=0.5) as client:
        proxy.drop_responses(3)  # started, then its retry's answer, then progress's
        async with client.agent("tagger", heartbeat_seconds=60) as activity:
            await activity.progress(0.5, "Processing video 5/10")
            activity.result = {"tags": 12}
        source_id = activity.source_id

    assert proxy.dropped == 3
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        events = await agent_events(http, source_id)
        row = (await http.get(f"/agents/{source_id}")).json()
    assert [e["event"] for e in events] == ["started", "progress", "complete"]
    assert [e["version"] for e in events] == [1, 2, 3]
    assert len({e["event_id"] for e in events}) == 3
    assert events[1]["payload"]["message"] == "Processing video 5/10"
    assert (row["status"], row["progress"], row["result"]) == ("completed", 1.0, {"tags": 12})


async def test_an_agent_block_that_raises_is_reported_failed_and_heartbeats_meanwhile(
    server: InProcessServer,
) -> None:
    source_id = f"summarizer_{uuid.uuid4().hex[:8]}"

    async def work(client: ActivityClient) -> None:
        async with client.agent("summarizer", source_id, heartbeat_seconds=0.2):
            await asyncio.sleep(0.7)
            raise RuntimeError("disk full")

    async with ActivityClient(server.base_url) as client:
        with pytest.raises(RuntimeError, match="disk full"):
            await work(client)
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        events = await agent_events(http, source_id)
        row = (await http.get(f"/agents/{source_id}")).json()
    names = [e["event"] for e in events]
    assert names[0] == "started"
    assert names[-1] == "failed"
    assert names.count("heartbeat") >= 2
    assert events[-1]["payload"]["message"] == "disk full"
    assert row["status"] == "failed"


async def test_events_pages_through_the_whole_log_and_stats_answer(
    server: InProcessServer,
) -> None:
    store = server.services.store
    for start in range(0, 2500, 500):
        await store.append([load_event(n) for n in range(start, start + 500)])
    await store.append_one(NewEvent("other", "x", "tick", canonical_payload({})))
    async with ActivityClient(server.base_url) as client:
        everything = [e async for e in client.events(0, {"stream": "load"})]
        middle = [e async for e in client.events(1000, {"stream": ["load"]}, until=1500)]
        stats = await client.stats()
    assert [e.payload_dict()["n"] for e in everything] == list(range(2500))
    assert [e.position for e in middle] == list(range(1001, 1501))
    assert stats["events"]["head"] == 2501
