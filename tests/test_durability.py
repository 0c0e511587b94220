"""Acknowledged means durable: events acked with 201 by a server that is then killed with
SIGKILL in the middle of a write load are all there after a restart, byte for byte, with no
gap in the positions and no half-written batch."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from tests.support import ServerProcess, read_frames

SOURCES = [f"agent-{index:02d}" for index in range(30)]
KINDS = ("started", "progress", "heartbeat", "complete", "failed")
KILL_AFTER_ACKED = 300


class RawPage(msgspec.Struct):
    events: list[msgspec.Raw]
    next_after: int
    head: int


class Envelope(msgspec.Struct):
    position: int
    stream: str
    source_id: str
    version: int
    event: str
    event_id: str
    timestamp: str
    payload: msgspec.Raw


@dataclass
class Sent:
    source_id: str
    event: str
    event_id: str
    payload: dict[str, Any]

    @property
    def payload_bytes(self) -> bytes:
        # What the server stores: the payload as compact JSON, keys in the order sent.
        return msgspec.json.encode(self.payload)


@dataclass
class Attempt:
    """One POST: a single event or a batch, and its ack if one came back."""

    events: list[Sent]
    batch: bool
    positions: list[int] | None = None
    versions: list[int] | None = None
    timestamp: str | None = None  # the single endpoint's ack carries it


@dataclass
class Load:
    attempts: list[Attempt] = field(default_factory=list)
    acked: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)


def make_event(rng: random.Random, number: int) -> Sent:
    payload: dict[str, Any] = {
        "agent_name": rng.choice(("tagger", "summariser", "indexer")),
        "status": rng.choice(("running", "waiting")),
        "message": f'event {number}: ünïcødé ✓ "quoted" back\\slash </script>\nnew line\t',
        "progress": rng.random(),
        "nested": {"list": [1, 2.5, None, True, "x"], "deep": {"k": [{"z": 1e-7}]}},
        "big": 2**53 + rng.randrange(1000),
        "emoji": "\U0001f680",
    }
    return Sent(rng.choice(SOURCES), rng.choice(KINDS), str(uuid.uuid4()), payload)


def body(sent: Sent, *, with_source: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"event": sent.event, "payload": sent.payload, "event_id": sent.event_id}
    if with_source:
        item["source_id"] = sent.source_id
    return item


async def post_until_refused(client: httpx.AsyncClient, load: Load, seed: int) -> None:
    """Post single events and batches until the server is gone."""
    rng = random.Random(seed)
    for number in range(100_000):
        batch = rng.random() < 0.4
        events = [make_event(rng, number) for _ in range(rng.randint(2, 6) if batch else 1)]
        attempt = Attempt(events, batch)
        load.attempts.append(attempt)
        try:
            if batch:
                response = await client.post(
                    "/agents/events", json={"events": [body(e, with_source=True) for e in events]}
                )
            else:
                response = await client.post(
                    f"/agents/{events[0].source_id}/events", json=body(events[0], with_source=False)
                )
        except httpx.TransportError:
            return  # killed while in flight: this attempt may or may not have been written
        assert response.status_code == 201, response.text
        ack = response.json()
        if batch:
            assert ack["event_ids"] == [e.event_id for e in events]
            attempt.positions, attempt.versions = ack["positions"], ack["versions"]
        else:
            assert ack["event_id"] == events[0].event_id
            attempt.positions, attempt.versions = [ack["position"]], [ack["version"]]
            attempt.timestamp = ack["timestamp"]
        load.acked += len(events)
        if load.acked >= KILL_AFTER_ACKED:
            load.enough.set()
    raise AssertionError("the server was never killed")


async def subscribe(
    client: httpx.AsyncClient, frames: dict[int, bytes], ready: asyncio.Event
) -> None:
    """A live subscriber from position 0, until the server dies under it."""
    with contextlib.suppress(httpx.TransportError):
        async with client.stream(
            "GET", "/events/stream", params={"last_event_id": 0}, timeout=httpx.Timeout(10, read=60)
        ) as response:
            assert response.status_code == 200
            async for frame in read_frames(response):
                ready.set()
                if frame.id is not None:
                    frames[int(frame.id)] = frame.data.encode()


async def read_log(client: httpx.AsyncClient) -> dict[int, bytes]:
    """Every envelope, as the exact JSON bytes GET /events sends."""
    envelopes: dict[int, bytes] = {}
    after = 0
    for _ in range(1000):
        response = await client.get("/events", params={"after": after, "limit": 1000})
        assert response.status_code == 200, response.text
        page = msgspec.json.decode(response.content, type=RawPage)
        for raw in page.events:
            envelopes[msgspec.json.decode(raw, type=Envelope).position] = bytes(raw)
        if page.next_after >= page.head:
            return envelopes
        after = page.next_after
    raise AssertionError("GET /events did not reach the head")


async def replay(client: httpx.AsyncClient, head: int) -> dict[int, bytes]:
    """The SSE stream from last_event_id=0 up to ``head``, as data bytes by id."""
    frames: dict[int, bytes] = {}
    ids: list[int] = []
    async with (
        asyncio.timeout(60),
        client.stream("GET", "/events/stream", params={"last_event_id": 0}) as response,
    ):
        assert response.status_code == 200
        async for frame in read_frames(response):
            if frame.id is None:
                continue
            ids.append(int(frame.id))
            frames[int(frame.id)] = frame.data.encode()
            if ids[-1] >= head:
                break
    assert ids == list(range(1, head + 1))
    return frames


async def test_acknowledged_events_survive_sigkill(database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "HEARTBEAT_SECONDS": "1", "TAIL_POLL_SECONDS": "0.2"}
    first = ServerProcess(env)
    first.start()
    load = Load()
    live: dict[int, bytes] = {}
    try:
        await first.wait_ready()
        async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as client:
            ready = asyncio.Event()
            subscriber = asyncio.create_task(subscribe(client, live, ready))
            await asyncio.wait_for(ready.wait(), 30)
            writers = [
                asyncio.create_task(post_until_refused(client, load, seed)) for seed in range(8)
            ]
            await asyncio.wait_for(load.enough.wait(), 120)
            # Mid-load: requests are in flight, a group commit may be half-way.
            await asyncio.to_thread(first.kill)
            await asyncio.wait_for(asyncio.gather(*writers), 60)
            await asyncio.wait_for(subscriber, 60)
    finally:
        first.kill()
        first.stop()
    assert load.acked >= KILL_AFTER_ACKED
    assert live, "the live subscriber saw nothing before the kill"

    # Heartbeats far apart: the watchdog must not mark the killed server's agents stalled
    # (an append of its own) between the reading of the log and the append after it.
    second = ServerProcess({**env, "HEARTBEAT_SECONDS": "60"})
    second.start()
    try:
        await second.wait_ready()
        async with httpx.AsyncClient(base_url=second.base_url, timeout=30) as client:
            log = await read_log(client)
            head = max(log, default=0)
            replayed = await replay(client, head)
            # The log goes on after the last position, never reusing one.
            after = await client.post(
                "/agents/after-restart/events",
                json={"event": "started", "payload": {"agent_name": "tagger"}},
            )
            assert after.status_code == 201, after.text
            assert after.json()["position"] == head + 1
    finally:
        second.stop()

    # Gapless, and the same bytes from GET /events and from the SSE replay.
    assert sorted(log) == list(range(1, head + 1))
    assert replayed == log
    # What the subscriber saw before the kill is exactly what is there now.
    assert {position: log.get(position) for position in live} == live

    envelopes = {p: msgspec.json.decode(raw, type=Envelope) for p, raw in log.items()}
    by_id = {e.event_id: e for e in envelopes.values()}
    assert len(by_id) == len(envelopes)
    attempted = {sent.event_id for attempt in load.attempts for sent in attempt.events}
    assert set(by_id) <= attempted, "events in the log that nobody sent"

    acked_events = 0
    for attempt in load.attempts:
        present = [by_id.get(sent.event_id) for sent in attempt.events]
        # All or nothing, acked or not.
        assert all(present) or not any(present), attempt
        if attempt.positions is None or attempt.versions is None:
            continue
        acked_events += len(attempt.events)
        for index, (sent, stored) in enumerate(zip(attempt.events, present, strict=True)):
            assert stored is not None, f"acked event {sent.event_id} lost"
            assert stored.position == attempt.positions[index]
            assert stored.version == attempt.versions[index]
            assert (stored.stream, stored.source_id, stored.event) == (
                "agent",
                sent.source_id,
                sent.event,
            )
            assert bytes(stored.payload) == sent.payload_bytes
            if attempt.timestamp is not None:
                assert stored.timestamp == attempt.timestamp
        if attempt.batch:
            assert len({e.timestamp for e in present if e}) == 1  # one transaction
    assert acked_events == load.acked
    # Unacked but written (killed after the commit, before the 201): also whole and exact.
    for sent in (s for attempt in load.attempts for s in attempt.events):
        if sent.event_id in by_id:
            assert bytes(by_id[sent.event_id].payload) == sent.payload_bytes
