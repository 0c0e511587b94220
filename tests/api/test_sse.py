"""``/events/stream`` and ``/agents/stream`` over real sockets: the contract's framing,
heartbeats, resume (header, query, reset, malformed ids), filters, a subscriber dropped at
random while a producer writes, connect/disconnect leaks, and a reader that stops reading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.api.sse import envelope_frame, payload_frame
from app.config import Settings
from app.eventlog import Event, LogEntry, NewEvent, canonical_payload
from tests.support import (
    InProcessServer,
    SseFrame,
    agent_event,
    make_settings,
    read_frames,
    running_server,
)

STREAMS = ["/events/stream", "/agents/stream"]
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
MALFORMED_IDS = ["abc", "-1", "1.5", "99999999999999999999", "1e3", "0x10", "٣"]


#: Every test here runs on each way of writing SSE streams, which must answer alike: the lean
#: transport with the fan-out writing caught-up subscribers (the default), the lean transport
#: alone (SSE_FANOUT=0), and the plain task group alone (SSE_LEAN_STREAMS=0).
TRANSPORTS = {
    "fanout": {"SSE_LEAN_STREAMS": "1", "SSE_FANOUT": "1"},
    "lean": {"SSE_LEAN_STREAMS": "1", "SSE_FANOUT": "0"},
    "task_group": {"SSE_LEAN_STREAMS": "0", "SSE_FANOUT": "0"},
}


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, transport: str) -> Settings:
    return sse_settings(database_url, transport, ARCHIVE_DIR=str(tmp_path / "archive"))


def sse_settings(database_url: str, transport: str, **env: str) -> Settings:
    return make_settings(database_url, **TRANSPORTS[transport], **env)


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


@contextlib.asynccontextmanager
async def sse(
    client: httpx.AsyncClient,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    params: Any = None,
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[SseFrame]]]:
    """An open SSE response and its frames; closing it hangs up on the server."""
    async with client.stream("GET", path, headers=headers, params=params) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async with contextlib.aclosing(read_frames(response)) as frames:  # type: ignore[type-var]
            yield response, frames


async def next_frame(frames: AsyncIterator[SseFrame], within: float = 10.0) -> SseFrame:
    async with asyncio.timeout(within):
        return await anext(frames)


async def next_event(frames: AsyncIterator[SseFrame], within: float = 10.0) -> SseFrame:
    """The next frame with an id (a log event), passing over heartbeats."""
    async with asyncio.timeout(within):
        async for frame in frames:
            if frame.event != "heartbeat":
                return frame
    raise AssertionError("stream ended")


async def expect_retry(frames: AsyncIterator[SseFrame]) -> None:
    first = await next_frame(frames)
    assert (first.retry, first.id, first.event, first.data) == (3000, None, None, ""), first


async def post(
    client: httpx.AsyncClient, source_id: str, event: str = "progress", **kw: Any
) -> int:
    response = await client.post(f"/agents/{source_id}/events", json=agent_event(event, **kw))
    assert response.status_code == 201, response.text
    position: int = response.json()["position"]
    return position


async def append_ingest(server: InProcessServer, source_id: str, event: str = "progress") -> int:
    new = NewEvent(
        stream="ingest", source_id=source_id, event=event, payload=canonical_payload({"n": 1})
    )
    (result,) = await server.services.store.append([new])
    return result.position


async def log_events(client: httpx.AsyncClient, **filters: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(1000):
        response = await client.get("/events", params={"after": after, "limit": 1000, **filters})
        body = response.json()
        events.extend(body["events"])
        if body["next_after"] >= body["head"]:
            return events
        after = body["next_after"]
    raise AssertionError("paging /events did not reach the head")


async def server_head(client: httpx.AsyncClient) -> int:
    head: int = (await client.get("/events", params={"limit": 1})).json()["head"]
    return head


async def wait_until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --- framing -------------------------------------------------------------------------------


async def test_headers_and_retry_frame_arrive_before_any_event(
    database_url: str, transport: str
) -> None:
    # With a heartbeat a minute away, only a flushed retry frame can arrive in time.
    settings = sse_settings(database_url, transport, HEARTBEAT_SECONDS="60")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        sse(client, "/events/stream") as (events_response, events),
        sse(client, "/agents/stream") as (agents_response, agents),
    ):
        for response, frames in [(events_response, events), (agents_response, agents)]:
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            await expect_retry(frames)
        assert await server.services.store.head() == 0
        position = await post(client, "a1", "started")
        for frames in (events, agents):
            frame = await next_frame(frames)
            assert (frame.id, frame.event) == (str(position), "started")


async def test_each_event_is_one_frame_with_position_name_and_envelope(
    client: httpx.AsyncClient,
) -> None:
    await post(client, "a1", "started", message="begin")
    batch = [
        {"source_id": "a1", **agent_event("progress", progress=0.5)},
        {"source_id": "b1", **agent_event("failed", error="x")},
    ]
    assert (await client.post("/agents/events", json={"events": batch})).status_code == 201
    async with (
        sse(client, "/events/stream") as (_, events),
        sse(client, "/agents/stream") as (_, agents),
    ):
        received: dict[str, list[SseFrame]] = {}
        for name, frames in [("events", events), ("agents", agents)]:
            await expect_retry(frames)
            received[name] = [await next_frame(frames) for _ in range(3)]
        await post(client, "a1", "complete")
        for name, frames in [("events", events), ("agents", agents)]:
            received[name].append(await next_event(frames))
    logged = await log_events(client)
    for frames in received.values():
        assert [f.id for f in frames] == [str(e["position"]) for e in logged]
        assert [f.id for f in frames] == ["1", "2", "3", "4"]
        assert [f.event for f in frames] == ["started", "progress", "failed", "complete"]
        assert [f.json() for f in frames] == logged
        assert all(f.retry is None for f in frames)


async def test_frames_are_exactly_the_contract_bytes(client: httpx.AsyncClient) -> None:
    await post(client, "a1", "started")
    envelope = (await log_events(client))[0]
    async with client.stream("GET", "/events/stream") as response:
        buffer = b""
        async with asyncio.timeout(10):
            async for chunk in response.aiter_bytes():
                buffer += chunk
                if buffer.count(b"\n\n") >= 2:
                    break
    retry, event, _ = buffer.split(b"\n\n", 2)
    assert retry == b"retry: 3000"
    lines = event.split(b"\n")
    assert lines[:2] == [b"id: 1", b"event: started"]
    assert len(lines) == 3
    assert lines[2].startswith(b"data: ")
    assert msgspec.json.decode(lines[2][len(b"data: ") :]) == envelope


async def test_heartbeats_carry_the_head_and_no_id(client: httpx.AsyncClient) -> None:
    await post(client, "a1")
    await post(client, "a2")
    # One stream filtered so that no event frame comes (its heartbeats still carry the log's
    # head), one that shows every agent event: heartbeats come between events too.
    async with (
        sse(client, "/events/stream", params={"source_id": "quiet"}) as (_, quiet),
        sse(client, "/agents/stream", headers={"Last-Event-ID": "2"}) as (_, live),
    ):
        for frames in (quiet, live):
            await expect_retry(frames)
            beat = await next_frame(frames, within=10)
            assert (beat.event, beat.id, beat.retry) == ("heartbeat", None, None)
            data = beat.json()
            assert set(data) == {"timestamp", "head"}
            assert data["head"] == 2
            assert TIMESTAMP.fullmatch(data["timestamp"]), data
        position = await post(client, "a3")
        assert (await next_frame(live)).id == str(position)
        for frames in (quiet, live):
            heads = []
            while not heads or heads[-1] != position:
                assert len(heads) < 10, heads
                frame = await next_frame(frames, within=10)
                assert (frame.event, frame.id) == ("heartbeat", None)
                heads.append(frame.json()["head"])
            assert heads == sorted(heads)
            assert set(heads) <= {2, 3}


# --- resume --------------------------------------------------------------------------------


async def ids_until(frames: AsyncIterator[SseFrame], last: int) -> list[int]:
    """Positions of the event frames up to and including ``last``."""
    seen: list[int] = []
    while not seen or seen[-1] < last:
        assert len(seen) <= last, seen
        frame = await next_event(frames)
        assert frame.id is not None, frame
        seen.append(int(frame.id))
    return seen


async def test_resume_from_header_or_query_and_the_header_wins(
    client: httpx.AsyncClient,
) -> None:
    for n in range(5):
        await post(client, f"a{n % 2}")
    cases: list[tuple[dict[str, str], dict[str, str], int]] = [
        ({"Last-Event-ID": "2"}, {}, 2),
        ({}, {"last_event_id": "3"}, 3),
        ({"Last-Event-ID": "4"}, {"last_event_id": "1"}, 4),
        ({"Last-Event-ID": "0"}, {}, 0),
        ({}, {"last_event_id": "0"}, 0),
        ({"Last-Event-ID": "005"}, {}, 5),
        ({}, {}, 0),
    ]
    for path in STREAMS:
        for headers, params, after in cases:
            async with sse(client, path, headers=headers, params=params) as (_, frames):
                await expect_retry(frames)
                # A live event marks the end: everything before it must be exactly the replay.
                marker = await post(client, "marker")
                assert await ids_until(frames, marker) == list(range(after + 1, marker + 1)), (
                    path,
                    headers,
                    params,
                )


async def test_id_past_the_head_gets_one_reset_then_continues_from_the_head(
    client: httpx.AsyncClient,
) -> None:
    for _ in range(3):
        await post(client, "a1")
    for path in STREAMS:
        for headers, params in [({"Last-Event-ID": "100"}, {}), ({}, {"last_event_id": "100"})]:
            head = await server_head(client)
            async with sse(client, path, headers=headers, params=params) as (_, frames):
                await expect_retry(frames)
                reset = await next_frame(frames)
                assert (reset.event, reset.id, reset.json()) == ("reset", None, {"head": head})
                position = await post(client, "a1")
                frame = await next_event(frames)
                assert (frame.id, frame.event) == (str(position), "progress")
                assert position == head + 1


async def test_malformed_last_event_id_is_a_400_naming_it(
    client: httpx.AsyncClient, server: InProcessServer
) -> None:
    await post(client, "a1")
    for path in STREAMS:
        for value in MALFORMED_IDS:
            for headers, params, name in [
                ({"Last-Event-ID": value.encode()}, {}, "Last-Event-ID"),
                ({}, {"last_event_id": value}, "last_event_id"),
            ]:
                response = await client.get(path, headers=headers, params=params)
                assert response.status_code == 400, (path, value, name, response.text)
                assert response.headers["content-type"].startswith("application/json")
                body = response.json()
                assert set(body) == {"status_code", "detail", "extra"}, body
                assert body["status_code"] == 400
                assert name in body["detail"], body
    assert server.services.store.feed.subscribers == 0


# --- filters -------------------------------------------------------------------------------


async def filtered_ids(
    client: httpx.AsyncClient,
    path: str,
    params: list[tuple[str, str]],
    marker: Any,
    headers: dict[str, str] | None = None,
) -> list[int]:
    """Event ids a filtered stream shows up to the (matching) event ``marker()`` appends."""
    async with sse(client, path, params=params, headers=headers) as (_, frames):
        await expect_retry(frames)
        last = await marker()
        return await ids_until(frames, last)


async def expected_ids(client: httpx.AsyncClient, predicate: Any, after: int = 0) -> list[int]:
    return [
        e["position"] for e in await log_events(client) if predicate(e) and e["position"] > after
    ]


async def test_events_stream_filters(client: httpx.AsyncClient, server: InProcessServer) -> None:
    for n in range(8):
        if n % 3 == 2:
            await append_ingest(server, f"i{n % 2}")
        else:
            await post(client, f"a{n % 2}", "started" if n < 3 else "progress")

    async def ingest_marker() -> int:
        await post(client, "a0")  # a live event the filter leaves out, then one it keeps
        return await append_ingest(server, "marker")

    async def a1_marker() -> int:
        await post(client, "a2")
        return await post(client, "a1")

    async def started_marker() -> int:
        await post(client, "a0", "progress")
        return await post(client, "a9", "started")

    cases: list[tuple[list[tuple[str, str]], dict[str, str], Any, Any, int]] = [
        ([("stream", "ingest")], {}, ingest_marker, lambda e: e["stream"] == "ingest", 0),
        ([("source_id", "a1")], {}, a1_marker, lambda e: e["source_id"] == "a1", 0),
        (
            [("source_id", "a1"), ("source_id", "a0")],
            {},
            a1_marker,
            lambda e: e["source_id"] in ("a0", "a1"),
            0,
        ),
        ([("event", "started")], {}, started_marker, lambda e: e["event"] == "started", 0),
        (
            [("stream", "agent"), ("event", "started"), ("event", "failed")],
            {},
            started_marker,
            lambda e: e["stream"] == "agent" and e["event"] in ("started", "failed"),
            0,
        ),
        # Resume with a filter: only matching events after the id.
        (
            [("source_id", "a1")],
            {"Last-Event-ID": "4"},
            a1_marker,
            lambda e: e["source_id"] == "a1",
            4,
        ),
        (
            [("stream", "ingest"), ("last_event_id", "3")],
            {},
            ingest_marker,
            lambda e: e["stream"] == "ingest",
            3,
        ),
    ]
    for params, headers, marker, predicate, after in cases:
        got = await filtered_ids(client, "/events/stream", params, marker, headers=headers)
        assert got == await expected_ids(client, predicate, after), params


async def test_agents_stream_filters(client: httpx.AsyncClient, server: InProcessServer) -> None:
    names = ["tagger", "summarizer", "indexer"]
    for n in range(9):
        await post(client, f"run-{n % 4}", agent_name=names[n % 3])
        if n % 4 == 0:
            await append_ingest(server, f"i{n}")

    async def tagger_marker() -> int:
        await post(client, "run-0", agent_name="indexer")
        await append_ingest(server, "between")
        return await post(client, "run-9", agent_name="tagger")

    async def run1_marker() -> int:
        await post(client, "run-2")
        await append_ingest(server, "run-1")  # same source id, another stream
        return await post(client, "run-1")

    def agent(predicate: Any) -> Any:
        return lambda e: e["stream"] == "agent" and predicate(e)

    def named(*names: str) -> Any:
        return agent(lambda e: e["payload"]["agent_name"] in names)

    cases: list[tuple[list[tuple[str, str]], dict[str, str], Any, Any, int]] = [
        ([], {}, tagger_marker, agent(lambda e: True), 0),
        ([("agent_name", "tagger")], {}, tagger_marker, named("tagger"), 0),
        (
            [("agent_name", "tagger"), ("agent_name", "summarizer")],
            {},
            tagger_marker,
            named("tagger", "summarizer"),
            0,
        ),
        ([("source_id", "run-1")], {}, run1_marker, agent(lambda e: e["source_id"] == "run-1"), 0),
        (
            [("source_id", "run-1"), ("last_event_id", "6")],
            {},
            run1_marker,
            agent(lambda e: e["source_id"] == "run-1"),
            6,
        ),
        ([("agent_name", "tagger")], {"Last-Event-ID": "5"}, tagger_marker, named("tagger"), 5),
    ]
    for params, headers, marker, predicate, after in cases:
        got = await filtered_ids(client, "/agents/stream", params, marker, headers=headers)
        assert got == await expected_ids(client, predicate, after), (params, headers)


# --- resume property -----------------------------------------------------------------------


async def produce(client: httpx.AsyncClient, rng: random.Random, total: int) -> None:
    """``total`` agent events from four concurrent writers, singly and in small batches."""
    names = ["tagger", "summarizer", "indexer"]
    plan: list[list[dict[str, Any]]] = []
    left = total
    while left:
        size = min(left, rng.choice([1, 1, 1, 2, 5, 9]))
        plan.append(
            [
                {
                    "source_id": f"job-{rng.randrange(12)}",
                    **agent_event("progress", agent_name=rng.choice(names), n=total - left + i),
                }
                for i in range(size)
            ]
        )
        left -= size

    async def writer(requests: list[list[dict[str, Any]]]) -> None:
        for events in requests:
            if len(events) == 1:
                one = dict(events[0])
                source_id = one.pop("source_id")
                response = await client.post(f"/agents/{source_id}/events", json=one)
            else:
                response = await client.post("/agents/events", json={"events": events})
            assert response.status_code == 201, response.text
            await asyncio.sleep(rng.random() * 0.01)

    async with asyncio.TaskGroup() as group:
        for k in range(4):
            group.create_task(writer(plan[k::4]))


async def follow_with_drops(
    client: httpx.AsyncClient,
    path: str,
    params: list[tuple[str, str]],
    rng: random.Random,
    drops: int,
    drop_within: int,
    target: asyncio.Future[int],
) -> tuple[list[dict[str, Any]], int]:
    """Follow ``path``, hanging up after a random number of events ``drops`` times and
    resuming from the last id seen, alternately by header and by query parameter."""
    received: list[dict[str, Any]] = []
    last: int | None = None
    connections = 0
    # Where to hang up: after this many events on each connection (0: right after retry).
    # Together they stay below ``drop_within`` events, so every drop happens before the end.
    quotas = [rng.randrange(0, drop_within // drops) for _ in range(drops)]
    while True:
        connections += 1
        headers: dict[str, str] = {}
        query = list(params)
        if last is not None:
            if connections % 2:
                headers["Last-Event-ID"] = str(last)
            else:
                query.append(("last_event_id", str(last)))
        quota = quotas.pop() if quotas else None
        async with sse(client, path, headers=headers, params=query) as (_, frames):
            await expect_retry(frames)
            taken = 0
            while quota is None or taken < quota:
                if target.done() and last is not None and last >= target.result():
                    return received, connections
                frame = await next_frame(frames, within=15)
                if frame.event == "heartbeat":
                    continue
                assert frame.id is not None, frame
                received.append(frame.json())
                last = int(frame.id)
                taken += 1


@pytest.mark.slow
async def test_dropped_subscribers_resume_without_gap_or_duplicate(
    client: httpx.AsyncClient,
) -> None:
    rng = random.Random(20250124)
    total = 500
    last_any: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    last_tagger: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with asyncio.timeout(120):
        whole = asyncio.create_task(
            follow_with_drops(
                client, "/events/stream", [], random.Random(rng.random()), 10, total, last_any
            )
        )
        tagger = asyncio.create_task(
            follow_with_drops(
                client,
                "/agents/stream",
                [("agent_name", "tagger")],
                random.Random(rng.random()),
                10,
                total // 4,  # about a third of the events are the tagger's
                last_tagger,
            )
        )
        await produce(client, random.Random(rng.random()), total)
        log = await log_events(client)
        assert len(log) == total
        taggers = [e for e in log if e["payload"]["agent_name"] == "tagger"]
        last_any.set_result(log[-1]["position"])
        last_tagger.set_result(taggers[-1]["position"])
        got_all, connections_all = await whole
        got_tagger, connections_tagger = await tagger
    assert connections_all == 11
    assert connections_tagger == 11
    assert [e["position"] for e in got_all] == [e["position"] for e in log]
    assert got_all == log
    assert got_tagger == taggers


# --- leaks ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_many_connect_disconnect_cycles_leak_nothing(
    client: httpx.AsyncClient, server: InProcessServer
) -> None:
    for n in range(3):
        await post(client, f"a{n}", agent_name="tagger")
    feed = server.services.store.feed
    # One warm-up cycle, so that anything created once per process exists before counting.
    async with sse(client, "/events/stream") as (_, frames):
        await expect_retry(frames)
    await wait_until(lambda: feed.subscribers == 0, 10, "the warm-up subscriber to go")
    baseline = len(asyncio.all_tasks())
    rng = random.Random(7)
    plans = [
        (
            rng.choice(STREAMS),
            rng.choice([{}, {"Last-Event-ID": "0"}, {"Last-Event-ID": "99"}]),
            rng.choice([[], [("source_id", "a1")], [("agent_name", "tagger")]]),
            rng.random() < 0.5,
        )
        for _ in range(1000)
    ]
    plans = [(p, h, q if p == "/agents/stream" else q[:0], more) for p, h, q, more in plans]
    queue = list(plans)
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as many:

        async def cycle(path: str, headers: dict[str, str], params: Any, more: bool) -> None:
            async with sse(many, path, headers=headers, params=params) as (_, frames):
                await expect_retry(frames)
                if more:
                    await next_frame(frames)  # an event, a reset or a heartbeat

        async def worker() -> None:
            while queue:
                await cycle(*queue.pop())

        async with asyncio.timeout(120), asyncio.TaskGroup() as group:
            for _ in range(20):
                group.create_task(worker())
    assert not queue
    await wait_until(lambda: feed.subscribers == 0, 20, "every subscription to be released")
    await wait_until(
        lambda: len(asyncio.all_tasks()) <= baseline,
        20,
        f"tasks back to {baseline} (now {len(asyncio.all_tasks())})",
    )
    # And the server still serves streams.
    async with sse(client, "/events/stream", headers={"Last-Event-ID": "2"}) as (_, frames):
        await expect_retry(frames)
        assert (await next_event(frames)).id == "3"


# --- a subscriber that stops reading --------------------------------------------------------


def _decode_chunked(raw: bytes) -> tuple[bytes, bool]:
    """The body of a chunked HTTP/1.1 response (a chunk cut off by the connection's end
    included as far as it came), and whether it ended with its last chunk."""
    body = b""
    while raw:
        size_line, _, rest = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, True
        body += rest[:size]
        raw = rest[size + 2 :]
    return body, False


@pytest.mark.slow
async def test_a_subscriber_that_stops_reading_is_dropped_without_blocking_others(
    database_url: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_timeout = 1.0
    settings = sse_settings(database_url, transport, SSE_WRITE_TIMEOUT_SECONDS=str(write_timeout))
    big = "x" * 50_000
    server_errors = logging.getLogger("uvicorn.error")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        # Once uvicorn has configured its loggers, which do not propagate to the root, where
        # caplog listens.
        server_errors.addHandler(caplog.handler)
        feed = server.services.store.feed
        host, port = server.base_url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        slow_peer = sock.getsockname()
        writer.write(f"GET /events/stream HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        head = b""
        async with asyncio.timeout(10):
            while b"retry: 3000" not in head:
                head += await reader.read(4096)
        assert head.startswith(b"HTTP/1.1 200")
        # From here on the slow client reads nothing.

        received: list[int] = []

        async def normal_subscriber() -> None:
            async with sse(client, "/events/stream") as (_, frames):
                async for frame in frames:
                    if frame.id is not None:
                        received.append(int(frame.id))

        normal = asyncio.create_task(normal_subscriber())
        try:
            await wait_until(lambda: feed.subscribers == 2, 10, "both subscribers")

            def slow_connection_stuck() -> bool:
                # The server's side of the slow client's connection has more queued than the
                # transport's high-water mark: its next write waits for the peer.
                for connection in server.server.server_state.connections:
                    transport = connection.transport
                    if transport.get_extra_info("peername") == slow_peer:
                        return bool(transport.get_write_buffer_size() > 64 * 1024)
                return False

            stuck_at: float | None = None
            dropped_at: float | None = None
            batch = [{"source_id": "big", **agent_event("progress", blob=big)} for _ in range(10)]
            async with asyncio.timeout(120):
                for _ in range(200):  # at most 100 MB, far more than any socket buffers
                    response = await client.post("/agents/events", json={"events": batch})
                    assert response.status_code == 201, response.text
                    last = response.json()["positions"][-1]
                    # The other subscriber keeps up, append after append.
                    await wait_until(
                        lambda last=last: received and received[-1] >= last, 10, f"event {last}"
                    )
                    if stuck_at is None and slow_connection_stuck():
                        stuck_at = time.monotonic()
                    if feed.subscribers == 1:
                        dropped_at = time.monotonic()
                        break
                    if stuck_at is not None and time.monotonic() - stuck_at > 2 * write_timeout:
                        break
                assert stuck_at is not None, "the slow subscriber's connection never filled up"
                # A stuck write may wait for the next frame (a heartbeat at most 1 s away), then
                # for the write timeout.
                await wait_until(lambda: feed.subscribers == 1, 1 + write_timeout + 8, "the drop")
                dropped_at = dropped_at or time.monotonic()
                assert dropped_at - stuck_at < 1 + write_timeout + 8

                # The slow client, reading again, finds frames in order and then the end of
                # the connection, without the last chunk: the response was cut, not completed.
                # The connection was aborted with what it could not take, so the last frame
                # may be cut too: without its blank line, an SSE client drops it, and resumes
                # after the last whole one.
                raw = head
                while chunk := await reader.read(1 << 20):
                    raw += chunk
            writer.close()
            _, _, chunked = raw.partition(b"\r\n\r\n")
            body, completed = _decode_chunked(chunked)
            assert not completed
            *whole, _cut = body.split(b"\n\n")
            ids = [int(f.split(b"\n", 1)[0].removeprefix(b"id: ")) for f in whole[1:]]
            assert ids == list(range(1, len(ids) + 1))
            assert len(ids) < received[-1]
            # An expected end, said once as a warning with its reason; not the server's
            # "returned without completing response" error.
            closing = [r for r in caplog.records if "closing an SSE stream" in r.getMessage()]
            assert [r.levelname for r in closing] == ["WARNING"]
            assert "SSE_WRITE_TIMEOUT_SECONDS" in closing[0].getMessage()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

            # The normal subscriber got everything, and keeps getting it.
            position = await post(client, "after")
            try:
                await wait_until(lambda: received[-1] == position, 10, "the last event")
            except AssertionError as missing:
                ended = f"ended with {normal.exception()!r}" if normal.done() else "reading"
                detail = f"event {position}: subscriber {ended}, last ids {received[-3:]}"
                raise AssertionError(detail) from missing
            assert received == list(range(1, position + 1))
        finally:
            normal.cancel()
            server_errors.removeHandler(caplog.handler)
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await normal
        await wait_until(lambda: feed.subscribers == 0, 10, "no subscribers")


def test_a_replayed_entry_is_framed_byte_for_byte_as_a_live_one() -> None:
    """Entries read from the table for one replay build their frames without the cache; a
    client that resumes must get exactly the bytes a live subscriber got."""
    event = Event(
        position=42,
        stream="agent",
        source_id='odd "source" \\ é',
        version=7,
        event="progress",
        event_id="01a243d5-4421-763c-8018-1e6ce5935993",
        timestamp="2026-12-05T01:32:59.809Z",
        payload=canonical_payload({"agent_name": "a", "message": "line\nbreak", "n": [1, 2]}),
    )
    live, replayed = LogEntry(event), LogEntry(event, shared=False)
    for build in (envelope_frame, payload_frame):
        assert build(replayed) == build(live)
    frame = envelope_frame(replayed)
    assert frame.startswith(b"id: 42\nevent: progress\ndata: ")
    assert frame.endswith(b"}\n\n")
    assert frame.count(b"\n") == 4
    assert msgspec.json.decode(frame.split(b"data: ", 1)[1]) == msgspec.json.decode(
        msgspec.json.encode(event)
    )
    # The live entry keeps its frame for every other subscriber; the replayed one keeps none.
    assert envelope_frame(live) is envelope_frame(live)
    assert envelope_frame(replayed) is not envelope_frame(replayed)


# --- replays framed by the database ---------------------------------------------------------

# Streams whose replays read pages the database frames (the whole log, a stream, a source,
# event names), and one whose pages are checked in Python (an agent name).
REPLAYED = [
    ("/events/stream", {}),
    ("/events/stream", {"stream": "ingest"}),
    ("/events/stream", {"source_id": 'odd "source" \\ é'}),
    ("/events/stream", {"event": "started"}),
    ("/agents/stream", {}),
    ("/agents/stream", {"agent_name": "tagger"}),
]


async def event_frames(
    client: httpx.AsyncClient, path: str, params: dict[str, str], count: int
) -> list[bytes]:
    """The first ``count`` frames with an id, exactly as sent (heartbeats left out)."""
    found: list[bytes] = []
    buffer = b""
    async with client.stream("GET", path, params=params) as response:
        assert response.status_code == 200
        async with asyncio.timeout(30):
            async for chunk in response.aiter_raw():
                buffer += chunk
                *frames, buffer = buffer.split(b"\n\n")
                found += [frame + b"\n\n" for frame in frames if frame.startswith(b"id: ")]
                if len(found) >= count:
                    return found
    raise AssertionError(f"{path} {params}: the stream ended after {len(found)} frames")


def streamed(envelope: dict[str, Any], path: str, params: dict[str, str]) -> bool:
    """Whether the stream at ``path`` with ``params`` (one value each) carries ``envelope``."""
    if path == "/agents/stream" and envelope["stream"] != "agent":
        return False
    for name, value in params.items():
        found = envelope["payload"].get(name) if name == "agent_name" else envelope[name]
        if found != value:
            return False
    return True


async def test_a_replay_after_a_restart_is_byte_for_byte_what_the_feed_gave(
    database_url: str, transport: str
) -> None:
    """After a restart, replays read the table (as frames the database builds from the rows):
    each client gets exactly the bytes the running service sent from its feed."""
    # Heartbeats far apart: however slow the machine, neither server's watchdog marks an agent
    # stalled between the two reads, so both replays read the same log.
    settings = sse_settings(database_url, transport, HEARTBEAT_SECONDS="60")
    odd = ['odd "source" \\ é', "\x85 sep\u2028", "😀 \U0010ffff", "plain"]
    async with (
        running_server(settings) as first,
        httpx.AsyncClient(base_url=first.base_url, timeout=30) as client,
    ):
        for n in range(240):
            if n % 3:
                await post(
                    client,
                    f"a{n % 5}",
                    ["progress", "started"][n % 2],
                    agent_name=["tagger", "writer"][n % 2],
                    message=f'line {n}\nwith "quotes", \\ and é 😀',
                )
                continue
            ingest = NewEvent(
                stream="ingest",
                source_id=odd[n % 4],
                event=["started", "progress"][n % 2],
                payload=canonical_payload({"n": n, "text": "tab\t\x01 \u2028"}),
            )
            await first.services.store.append([ingest])
        log = await log_events(client)
        sent: dict[tuple[str, tuple[tuple[str, str], ...]], list[bytes]] = {}
        for path, params in REPLAYED:
            count = sum(1 for envelope in log if streamed(envelope, path, params))
            assert count >= 20, (path, params)
            sent[path, tuple(params.items())] = await event_frames(client, path, params, count)
    async with (
        running_server(settings) as second,
        httpx.AsyncClient(base_url=second.base_url, timeout=30) as client,
    ):
        assert second.services.store.feed.entries_after(0) is None, "a new feed holds nothing"
        for (path, params), frames in sent.items():
            assert await event_frames(client, path, dict(params), len(frames)) == frames


async def collect_frames(
    client: httpx.AsyncClient, path: str, params: dict[str, str], into: list[bytes]
) -> None:
    """Every frame with an id of one stream, exactly as sent, appended to ``into`` as it
    arrives (until cancelled)."""
    buffer = b""
    async with client.stream("GET", path, params=params) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            into += [frame + b"\n\n" for frame in frames if frame.startswith(b"id: ")]


def metric(text: str, name: str) -> float:
    """A sample without labels, from the Prometheus text of ``/metrics``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_live_frames_are_byte_for_byte_what_a_replay_sends(
    database_url: str, transport: str
) -> None:
    """Subscribers caught up when events commit get, on every way of writing streams (the
    fan-out's one pass over all of them, straight to their connections, included), exactly
    the frames a replay of the same events sends: filters applied, several events of one
    commit together, a commit too large for one write, odd characters."""
    settings = sse_settings(database_url, transport, HEARTBEAT_SECONDS="60")
    odd = ['odd "source" \\ é', "\x85 sep\u2028", "😀 \U0010ffff"]
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        feed = server.services.store.feed
        received: dict[tuple[str, tuple[tuple[str, str], ...]], list[bytes]] = {
            (path, tuple(params.items())): [] for path, params in REPLAYED
        }
        readers = [
            asyncio.create_task(collect_frames(client, path, dict(params), frames))
            for (path, params), frames in received.items()
        ]
        try:
            await wait_until(lambda: feed.subscribers == len(readers), 10, "the subscribers")
            await asyncio.sleep(0.2)  # each has read the empty log and waits for the next
            for n in range(30):
                await post(
                    client,
                    f"a{n % 5}",
                    ["progress", "started"][n % 2],
                    agent_name=["tagger", "writer"][n % 3 % 2],
                    message=f'line {n}\nwith "quotes", \\ and é 😀',
                )
                if n % 10 == 0:
                    # Three events in one commit, for the stream, source and name filters.
                    await server.services.store.append(
                        [
                            NewEvent(
                                stream="ingest",
                                source_id=source,
                                event=["started", "progress"][k % 2],
                                payload=canonical_payload({"n": n, "text": "tab\t\x01 \u2028"}),
                            )
                            for k, source in enumerate(odd)
                        ]
                    )
            batch = [
                {"source_id": f"b{k}", **agent_event("started", agent_name="tagger", k=k)}
                for k in range(5)
            ]
            assert (await client.post("/agents/events", json={"events": batch})).status_code == 201
            # Larger than one write: written in pieces by the subscriber's own task.
            big = [
                {"source_id": "big", **agent_event("progress", blob="x" * 40_000, k=k)}
                for k in range(8)
            ]
            assert (await client.post("/agents/events", json={"events": big})).status_code == 201
            await post(client, "last", "started")
            log = await log_events(client)
            for (path, params), frames in received.items():
                count = sum(1 for envelope in log if streamed(envelope, path, dict(params)))
                await wait_until(lambda f=frames, c=count: len(f) >= c, 20, f"{path} {params}")
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        for (path, params), frames in received.items():
            replayed = await event_frames(client, path, dict(params), len(frames))
            assert frames == replayed, (path, params)
        written = metric((await client.get("/metrics")).text, "activity_sse_fanout_frames_total")
        if transport == "fanout":
            # All but the large commit's frames, and the few a subscriber still writing its
            # pieces (or not yet waiting when the first event came) takes itself.
            live = sum(len(frames) for frames in received.values())
            assert live - 12 * len(received) <= written <= live
        else:
            assert written == 0


async def raw_stream(client: httpx.AsyncClient, path: str, until: bytes | None) -> bytes:
    """The body of one stream, as sent: to its end, or until ``until`` has arrived."""
    body = b""
    async with client.stream("GET", path, headers={"Last-Event-ID": "0"}) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            body += chunk
            if until is not None and until in body:
                break
    return body


async def test_every_transport_sends_the_same_bytes(database_url: str) -> None:
    """The lean transport and the fan-out are fast paths of the plain one: every stream is
    the same bytes."""
    bodies: dict[str, list[bytes]] = {}
    for transport in sorted(TRANSPORTS):
        settings = sse_settings(database_url, transport, HEARTBEAT_SECONDS="60")
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        ):
            if not bodies:
                for n in range(150):
                    await post(client, f"a{n % 4}", "progress", message=f'line {n}\n"é"')
                for event in ("started", "progress", "complete"):
                    await append_ingest(server, "i1", event)
            head = await server_head(client)
            last = b"id: %d\n" % head
            bodies[transport] = [
                await raw_stream(client, "/events/stream", last),
                await raw_stream(client, "/agents/stream?agent_name=tagger", b"id: 150\n"),
                await raw_stream(client, "/ingests/i1/stream", None),
            ]
    assert bodies["fanout"] == bodies["lean"] == bodies["task_group"]
    assert bodies["lean"][2].endswith(b'event: complete\ndata: {"n":1}\n\n')
