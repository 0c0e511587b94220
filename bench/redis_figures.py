"""Redis Streams measured as the service's peer: durable appends and a full replay to one
client (the figures themselves are run by :mod:`bench.run`, ``--only append,replay``).

Redis Streams are what a team would reach for instead of this service, so the service has
to hold its own against them on the two things it is for:

* durable append, in-process API, 100 concurrent producers: the service's store against
  XADD from 100 asyncio producers sharing one ``redis.asyncio`` pool, with the AOF fsynced
  on every write (``appendfsync always``, equal to the service's ``synchronous=FULL``) and
  once a second; raw sqlite3 batches bound what the disk allows, and Redis with no
  persistence at all bounds what the Python client can send (its ceiling, not Redis's);
* replay: the service's SSE replay of the whole log against one Python client paging the
  stream with XRANGE, 10,000 entries a page, every entry's fields decoded to text. redis-py
  parses replies in pure Python unless ``hiredis`` is installed, and the replay is bound by
  that parser (about 6x slower here), so the run says which parser it used.

Each measurement runs on a fresh server (:func:`measure_redis`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT
from redis.utils import HIREDIS_AVAILABLE

from bench.peers.redis_streams import Fsync, RedisUnavailable, redis_server
from bench.report import Figure

__all__ = [
    "HIREDIS_AVAILABLE",
    "REDIS_ALWAYS",
    "REDIS_CEILING",
    "REDIS_EVERYSEC",
    "REDIS_REPLAY",
    "measure_redis",
    "redis_append_rate",
    "redis_replay_rate",
]

STREAM = "agent"
SOURCES = 100
PAGE = 10_000

REDIS_ALWAYS = "redis streams, appendfsync always"
REDIS_EVERYSEC = "redis streams, appendfsync everysec"
REDIS_CEILING = "redis streams, no persistence (client ceiling)"
REDIS_REPLAY = "redis XRANGE paging (10k/page)"

Fields = dict[FieldT, EncodableT]


def _fields(n: int) -> Fields:
    """One event as stream fields: the service's event name, source and JSON payload."""
    payload = {"agent_name": "bench", "status": "running", "message": f"step {n}", "progress": 0.5}
    return {
        "event": "progress",
        "source_id": f"bench-{n % SOURCES}",
        "payload": msgspec.json.encode(payload),
    }


async def _check_length(client: aioredis.Redis, expected: int) -> None:
    length = await client.xlen(STREAM)
    if length != expected:
        raise RuntimeError(f"expected {expected} entries, the stream holds {length}")


async def redis_append_rate(url: str, events: int, producers: int = 100) -> float:
    """XADD ``events`` entries from ``producers`` tasks, one entry per call; events/s."""
    prepared = [_fields(n) for n in range(events)]
    per_producer = [prepared[i::producers] for i in range(producers)]
    client = aioredis.Redis.from_url(url, max_connections=producers)
    try:
        # Open every connection before timing, as the service's engine pool is warm too.
        await asyncio.gather(*(client.ping() for _ in range(producers)))

        async def produce(mine: list[Fields]) -> None:
            for fields in mine:
                await client.xadd(STREAM, fields)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for mine in per_producer:
                group.create_task(produce(mine))
        elapsed = time.perf_counter() - started
        await _check_length(client, events)
    finally:
        await client.aclose()
    return events / elapsed


async def fill_stream(url: str, events: int, batch: int = 1000) -> None:
    """Append ``events`` entries in pipelined batches (no MULTI), for a replay to read."""
    client = aioredis.Redis.from_url(url)
    try:
        for first in range(0, events, batch):
            pipeline = client.pipeline(transaction=False)
            for n in range(first, min(first + batch, events)):
                pipeline.xadd(STREAM, _fields(n))
            await pipeline.execute()
        await _check_length(client, events)
    finally:
        await client.aclose()


async def redis_replay_rate(url: str, events: int) -> float:
    """Fill the stream with ``events`` entries (untimed), then read them all back with XRANGE
    pages of 10,000, resuming after the last id (exclusive); events/s.

    Fields arrive decoded to ``str`` (``decode_responses``), as a client would use them; the
    clock includes connecting.
    """
    await fill_stream(url, events)
    seen = 0
    started = time.perf_counter()
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        start = "-"
        while True:
            page = await client.xrange(STREAM, min=start, max="+", count=PAGE)
            if not page:
                break
            for _entry_id, fields in page:
                if fields is None or fields["event"] != "progress":
                    raise RuntimeError(f"unexpected entry {fields!r}")
            seen += len(page)
            start = f"({page[-1][0]!s}"
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
    if seen != events:
        raise RuntimeError(f"read {seen} of {events} entries")
    return events / elapsed


async def measure_redis(
    figure: Figure,
    name: str,
    fsync: Fsync,
    measure: Callable[[str], Awaitable[float]],
) -> None:
    """Add one sample for ``name`` on a fresh server, or record why Redis cannot run."""
    if figure.skipped.get(name):
        return
    try:
        async with redis_server(fsync) as url:
            figure.add(name, await measure(url))
    except RedisUnavailable as error:
        print(f"skipping {name}: {error}", file=sys.stderr)
        figure.skip(name, str(error))
