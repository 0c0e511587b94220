"""The service against Redis Streams: durable appends and a full replay to one client.

    python -m bench.redis_figures [--quick] [--rounds N]

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

Contenders alternate within each round (A B A B), each on a fresh server and a fresh file.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT
from redis.utils import HIREDIS_AVAILABLE

from bench.load import sse_replay
from bench.peers.redis_streams import Fsync, RedisUnavailable, redis_server
from bench.raw_sqlite import raw_sqlite_rate
from bench.report import SERVICE, Figure, render
from bench.service import Servers, service_append_rate

__all__ = ["redis_append_rate", "redis_replay_rate", "run"]

STREAM = "agent"
SOURCES = 100
PAGE = 10_000

REDIS_ALWAYS = "redis streams, appendfsync always"
REDIS_EVERYSEC = "redis streams, appendfsync everysec"
REDIS_CEILING = "redis streams, no persistence (client ceiling)"
RAW_SQLITE = "raw sqlite3 batches of 1000, synchronous=FULL"
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


async def _measure_redis(
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


async def run(quick: bool, rounds: int) -> list[Figure]:
    append_events = 20_000 if quick else 100_000
    replay_events = 200_000 if quick else 1_000_000
    append = Figure(
        "append",
        "durable append, in-process API, 100 concurrent producers",
        "events/s",
        target=">= 0.50 of raw sqlite3; above redis always",
    )
    replay = Figure("replay_redis", f"replay of {replay_events:,} events to one client", "events/s")

    async def appended(url: str) -> float:
        return await redis_append_rate(url, append_events)

    async def replayed(url: str) -> float:
        return await redis_replay_rate(url, replay_events)

    async def sse(base_url: str) -> float:
        return await sse_replay(base_url, "/events/stream", replay_events, 0)

    parser = "hiredis" if HIREDIS_AVAILABLE else "pure Python (hiredis not installed)"
    print(f"redis-py reply parser: {parser}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-redis-figures-") as directory:
        scratch = Path(directory)
        servers = Servers(scratch)
        for round_number in range(rounds):
            print(f"round {round_number + 1}/{rounds}", file=sys.stderr)
            append.add(
                SERVICE,
                await service_append_rate(scratch / f"append-{round_number}.db", append_events),
            )
            await _measure_redis(append, REDIS_ALWAYS, "always", appended)
            await _measure_redis(append, REDIS_EVERYSEC, "everysec", appended)
            append.add(
                RAW_SQLITE,
                await asyncio.to_thread(
                    raw_sqlite_rate, scratch / f"raw-{round_number}.db", append_events, 1000
                ),
            )
            await _measure_redis(append, REDIS_CEILING, None, appended)

            replay.add(SERVICE, await servers.run_service(sse, replay_events))
            await _measure_redis(replay, REDIS_REPLAY, "everysec", replayed)
    return [append, replay]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 2 quick, 3)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    print(render(asyncio.run(run(args.quick, rounds))))


if __name__ == "__main__":
    main()
