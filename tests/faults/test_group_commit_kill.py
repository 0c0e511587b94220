"""SIGKILL while large group-committed batches are in flight, three times over: no
acknowledged event is lost, no batch is half-written (acknowledged or not), positions stay
gapless and each source's versions too.

Eight writers keep the appender saturated with 200-event batches, so the append path is inside
a group commit (usually several requests' batches in one transaction) nearly all of the time,
and a kill at a random moment lands in the middle of one."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from tests.support import ServerProcess

BATCH = 200  # a bucket bound of the batch histogram: larger transactions hold 2+ requests
WRITERS = 8
ROUNDS = 3
SOURCES = [f"gc-{index:02d}" for index in range(12)]


@dataclass
class Attempt:
    ids: list[str]
    sources: list[str]
    ns: list[int]
    positions: list[int] | None = None


@dataclass
class Load:
    attempts: list[Attempt] = field(default_factory=list)
    acked: asyncio.Event = field(default_factory=asyncio.Event)


async def write_until_killed(client: httpx.AsyncClient, load: Load, seed: int) -> None:
    rng = random.Random(seed)
    for number in range(10_000):
        sources = [rng.choice(SOURCES) for _ in range(BATCH)]
        attempt = Attempt([str(uuid.uuid4()) for _ in sources], sources, list(range(BATCH)))
        load.attempts.append(attempt)
        events = [
            {
                "source_id": source,
                "event": "progress",
                "event_id": event_id,
                "payload": {"agent_name": "loader", "n": n, "seed": seed, "batch": number,
                            "pad": "p" * rng.randrange(50, 400)},
            }
            for source, event_id, n in zip(sources, attempt.ids, attempt.ns, strict=True)
        ]  # fmt: skip
        try:
            response = await client.post("/agents/events", json={"events": events})
        except httpx.TransportError:
            return
        assert response.status_code == 201, response.text
        attempt.positions = response.json()["positions"]
        load.acked.set()
    raise AssertionError("never killed")


async def metric_lines(client: httpx.AsyncClient, prefix: str) -> list[str]:
    text = (await client.get("/metrics")).text
    return [line for line in text.splitlines() if line.startswith(prefix)]


async def one_round(env: dict[str, str], load: Load, rng: random.Random) -> list[str]:
    server = ServerProcess(env)
    server.start()
    try:
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            load.acked = asyncio.Event()
            writers = [
                asyncio.create_task(write_until_killed(client, load, rng.randrange(1 << 30)))
                for _ in range(WRITERS)
            ]
            await asyncio.wait_for(load.acked.wait(), 60)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            buckets = await metric_lines(client, "activity_append_batch_events_bucket")
            await asyncio.to_thread(server.kill)
            await asyncio.wait_for(asyncio.gather(*writers), 60)
    finally:
        server.kill()
    return buckets


class Envelope(msgspec.Struct):
    position: int
    source_id: str
    version: int
    event_id: str
    payload: dict[str, Any]


class Page(msgspec.Struct):
    events: list[Envelope]
    next_after: int
    head: int


async def read_log(env: dict[str, str]) -> list[Envelope]:
    server = ServerProcess(env)
    server.start()
    try:
        await server.wait_ready()
        found: list[Envelope] = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            after = 0
            while True:
                response = await client.get("/events", params={"after": after, "limit": 1000})
                page = msgspec.json.decode(response.content, type=Page)
                found.extend(page.events)
                if page.next_after >= page.head:
                    return found
                after = page.next_after
    finally:
        server.stop()


async def test_sigkill_during_group_commits_loses_nothing_and_splits_no_batch(
    database_url: str,
) -> None:
    env = {"DATABASE_URL": database_url}
    load = Load()
    rng = random.Random(9)
    grouped = 0
    for _ in range(ROUNDS):
        buckets = await one_round(env, load, rng)
        # Transactions of more than one request's batch: group commits were happening.
        at_most = {line.split('le="')[1].split('"')[0]: int(line.split()[-1]) for line in buckets}
        grouped += int(at_most["+Inf"]) - int(at_most[str(BATCH)])
    assert grouped > 0, "no transaction ever held more than one request"

    log = await read_log(env)
    assert [e.position for e in log] == list(range(1, len(log) + 1))
    by_id = {e.event_id: e for e in log}
    assert len(by_id) == len(log)
    attempted = {event_id for a in load.attempts for event_id in a.ids}
    assert set(by_id) <= attempted
    acked = in_flight = 0
    for attempt in load.attempts:
        present = [by_id.get(event_id) for event_id in attempt.ids]
        assert all(present) or not any(present), "a batch was half-written"
        if attempt.positions is None:
            in_flight += 1
            continue
        acked += 1
        assert [e.position for e in present if e] == attempt.positions, "acknowledged but lost"
        stored = [(e.source_id, e.payload["n"]) for e in present if e]
        assert stored == list(zip(attempt.sources, attempt.ns, strict=True))
    assert acked >= ROUNDS
    assert in_flight >= ROUNDS  # every kill caught requests mid-way
    versions: dict[str, list[int]] = defaultdict(list)
    for event in log:
        versions[event.source_id].append(event.version)
    for source, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), source
