"""Every benchmark figure, the service beside its peers, rounds alternating (A B A B).

    python -m bench.run --quick    # reduced sizes, 2 rounds: a few minutes
    python -m bench.run            # full sizes, 3 rounds
    python -m bench.run --only append,replay

Figures (bench/README.md explains each): ``append`` durable in-process appends against raw
sqlite3 and Redis Streams; ``http`` appends over HTTP against the naive peer; ``fanout``
SSE fan-out against the naive peer and nchan; ``replay`` one client reading the log over SSE
against the naive peer, Redis XRANGE and nchan's buffer; ``idle`` idle SSE connections;
``growth`` latencies as the log grows; ``servers`` uvicorn against granian; ``chain`` the
audit chain on against off. A peer that
cannot be installed or started is skipped with the reason. Prints medians and ratios, and
the load clients' own ceilings, so that no figure is just a client's limit; the figures are
also written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
import uuid
from pathlib import Path

from app.events.chain import GENESIS, chain_rows
from bench.load import (
    client_ceiling,
    post_events_raw,
    read_your_writes,
    sse_replay,
    wait_projected,
)
from bench.peers.nchan import NchanUnavailable, nchan_replay_rate, nchan_server
from bench.raw_sqlite import raw_sqlite_rate
from bench.redis_figures import (
    HIREDIS_AVAILABLE,
    REDIS_ALWAYS,
    REDIS_CEILING,
    REDIS_EVERYSEC,
    REDIS_REPLAY,
    measure_redis,
    redis_append_rate,
    redis_replay_rate,
)
from bench.report import SERVICE, Figure, quantile, render
from bench.service import Servers, service_append_rate

RESULTS = Path(__file__).resolve().parent / "results"

ALL = ("append", "http", "fanout", "replay", "idle", "growth", "servers", "chain")

NAIVE = "naive (in-memory list, asyncio.Condition)"
#: The service with its append endpoints routed through Litestar like every other route.
ROUTED = "service, appends through the router (DIRECT_APPENDS=0)"
#: The service with its SQLite appender on a thread of its own process, sharing the event
#: loop's GIL (the default gives it a process of its own).
THREAD = "service, appender on a thread (SQLITE_APPENDER=thread)"
#: The service without the audit chain: what computing and storing it costs.
CHAIN_OFF = "service, chain off (AUDIT_CHAIN=0)"
RAW_1000 = "raw sqlite3, batches of 1000, synchronous=FULL"
RAW_100 = "raw sqlite3, batches of 100, synchronous=FULL"
#: nchan replays a channel's buffer in time quadratic in its length (200,000 messages take
#: minutes), so it is measured on a shorter buffer, which flatters it.
NCHAN_REPLAY_EVENTS = 20_000
NCHAN_BUFFER = f"nchan buffer replay of {NCHAN_REPLAY_EVENTS:,} (Last-Event-ID 0:0)"


async def append_figures(quick: bool, rounds: int, scratch: Path) -> list[Figure]:
    events = 20_000 if quick else 100_000
    figure = Figure(
        "append",
        "1. durable append, in-process API, 100 concurrent producers",
        "events/s",
        target=">= 0.50 of raw sqlite3 batches; above redis always",
    )

    async def redis_append(url: str) -> float:
        return await redis_append_rate(url, events)

    parser = "hiredis" if HIREDIS_AVAILABLE else "pure Python (hiredis not installed)"
    print(f"redis-py reply parser: {parser}", file=sys.stderr)

    for round_number in range(rounds):
        print(f"append: round {round_number + 1}/{rounds}", file=sys.stderr)
        figure.add(SERVICE, await service_append_rate(scratch / f"a-{round_number}.db", events))
        figure.add(
            THREAD,
            await service_append_rate(scratch / f"t-{round_number}.db", events, appender="thread"),
        )
        figure.add(
            RAW_1000,
            await asyncio.to_thread(
                raw_sqlite_rate, scratch / f"r-{round_number}.db", events, 1000
            ),
        )
        await measure_redis(figure, REDIS_ALWAYS, "always", redis_append)
        figure.add(
            RAW_100,
            await asyncio.to_thread(raw_sqlite_rate, scratch / f"q-{round_number}.db", events, 100),
        )
        await measure_redis(figure, REDIS_EVERYSEC, "everysec", redis_append)
        await measure_redis(figure, REDIS_CEILING, None, redis_append)
    return [figure]


async def http_figures(quick: bool, rounds: int, servers: Servers) -> list[Figure]:
    single_n = 5_000 if quick else 20_000
    batch_n = 50_000 if quick else 200_000
    single = Figure(
        "http_single",
        "2. append over HTTP, single endpoint, 50 clients",
        "events/s",
        target=">= naive",
    )
    batch = Figure(
        "http_batch",
        "2. append over HTTP, batch endpoint (100 per request), 50 clients",
        "events/s",
        target=">= naive",
    )

    # The same batch runs, timed until the service's projections hold every event too: what
    # it sustains with its read models current. The naive peer keeps no read model.
    projected = Figure(
        "http_batch_projected",
        "2. append over HTTP, batch endpoint, until the projections hold every event",
        "events/s",
        target="(none: what is sustained)",
    )
    until_projected: list[float] = []
    # During the same runs, a client posting one event at a time and reading its own
    # activity back: how long the read waits for the projection, and how often it is stale.
    fresh_p99 = Figure(
        "http_batch_read_your_writes_p99",
        "2. during the batch runs: GET /agents/{id} after its own POST, p99",
        "ms",
        higher_is_better=False,
        target="(none: reads wait up to 2 s for their write)",
    )
    stale = Figure(
        "http_batch_read_your_writes_stale",
        "2. during the batch runs: those reads answered without their write",
        "%",
        higher_is_better=False,
    )

    async def post_single(base_url: str) -> float:
        return await post_events_raw(base_url, 50, single_n, None)

    async def post_batch(base_url: str) -> float:
        return await post_events_raw(base_url, 50, batch_n, 100)

    async def post_batch_then_project(base_url: str) -> float:
        stop = asyncio.Event()
        reader = asyncio.create_task(read_your_writes(base_url, stop))
        started = time.perf_counter()
        try:
            rate = await post_batch(base_url)
        finally:
            stop.set()
            waits, answered_stale = await reader
        await asyncio.to_thread(wait_projected, base_url)
        until_projected.append(batch_n / (time.perf_counter() - started))
        fresh_p99.add(SERVICE, quantile(waits, 0.99) * 1000)
        stale.add(SERVICE, 100 * answered_stale / len(waits))
        return rate

    for round_number in range(rounds):
        print(f"http: round {round_number + 1}/{rounds}", file=sys.stderr)
        single.add(SERVICE, await servers.run_service(post_single))
        single.add(NAIVE, await servers.run_naive(post_single))
        single.add(ROUTED, await servers.run_service(post_single, env={"DIRECT_APPENDS": "0"}))
        batch.add(SERVICE, await servers.run_service(post_batch_then_project))
        projected.add(SERVICE, until_projected[-1])
        naive_rate = await servers.run_naive(post_batch)
        batch.add(NAIVE, naive_rate)
        projected.add(NAIVE, naive_rate)
        batch.add(ROUTED, await servers.run_service(post_batch, env={"DIRECT_APPENDS": "0"}))
        batch.add(THREAD, await servers.run_service(post_batch, env={"SQLITE_APPENDER": "thread"}))
    return [single, batch, projected, fresh_p99, stale]


async def chain_figures(quick: bool, rounds: int, scratch: Path, servers: Servers) -> list[Figure]:
    """What the audit chain costs: the service as it runs (chain on) beside itself with
    AUDIT_CHAIN=0, in-process and over HTTP, the order flipped every round (A B B A ...)."""
    events = 20_000 if quick else 100_000
    batch_n = 50_000 if quick else 200_000
    target = "chain on >= 0.95 of chain off"
    in_process = Figure(
        "chain_append",
        "8. the chain's cost: durable append, in-process API, 100 concurrent producers",
        "events/s",
        target=target,
    )
    in_thread = Figure(
        "chain_append_thread",
        "8. the chain's cost: the same, appender on a thread (SQLITE_APPENDER=thread)",
        "events/s",
        target=target,
    )
    http = Figure(
        "chain_http_batch",
        "8. the chain's cost: append over HTTP, batch endpoint (100 per request), 50 clients",
        "events/s",
        target=target,
    )

    share = Figure(
        "chain_cpu_share",
        "8. the chain's CPU per event (chain_rows, measured alone) as a share of the time per "
        "event of an in-process append with the chain off",
        "%",
        higher_is_better=False,
        target="<= 5%",
    )
    share_http = Figure(
        "chain_cpu_share_http",
        "8. the same, as a share of the time per event of the HTTP batch endpoint, chain off",
        "%",
        higher_is_better=False,
        target="<= 5%",
    )

    async def post_batch(base_url: str) -> float:
        return await post_events_raw(base_url, 50, batch_n, 100)

    count = 0

    async def measure(chain: bool) -> None:
        nonlocal count
        count += 1
        contender = SERVICE if chain else CHAIN_OFF
        rate = await service_append_rate(scratch / f"c-{count}.db", events, chain=chain)
        in_process.add(contender, rate)
        # CPU time, which a busy machine disturbs far less than a rate: the most the chain
        # can take from the writer's time per event.
        cost = chain_seconds_per_event() if not chain else 0.0
        if not chain:
            share.add(SERVICE, cost * rate * 100)
        rate = await service_append_rate(
            scratch / f"ct-{count}.db", events, appender="thread", chain=chain
        )
        in_thread.add(contender, rate)
        env = {} if chain else {"AUDIT_CHAIN": "0"}
        rate = await servers.run_service(post_batch, env=env)
        http.add(contender, rate)
        if not chain:
            share_http.add(SERVICE, cost * rate * 100)

    for round_number in range(rounds):
        print(f"chain: round {round_number + 1}/{rounds}", file=sys.stderr)
        order = (True, False) if round_number % 2 == 0 else (False, True)
        for chain in order:
            await measure(chain)
    return [in_process, in_thread, http, share, share_http]


def chain_seconds_per_event(count: int = 20_000) -> float:
    """CPU seconds :func:`~app.events.chain.chain_rows` takes per event, on rows like the
    append figures' (the best of five runs)."""
    rows = [
        (
            n + 1,
            "agent",
            f"bench-{n % 100}",
            n // 100 + 1,
            "progress",
            str(uuid.uuid4()),
            "2026-01-24T12:34:56.789Z",
            f'{{"agent_name":"bench","message":"step {n}","progress":0.5,"status":"running"}}',
        )
        for n in range(count)
    ]
    best = math.inf
    for _ in range(5):
        started = time.process_time()
        chain_rows(GENESIS, rows)
        best = min(best, time.process_time() - started)
    return best / count


async def replay_figures(quick: bool, rounds: int, servers: Servers) -> list[Figure]:
    events = 200_000 if quick else 1_000_000
    figure = Figure(
        "replay",
        f"4. replay: one client reads {events:,} events over SSE from last_event_id=0",
        "events/s",
        target=">= 200k/s; ahead of redis XRANGE and nchan",
    )

    async def sse(base_url: str) -> float:
        return await sse_replay(base_url, "/events/stream", events, 0)

    async def xrange(url: str) -> float:
        return await redis_replay_rate(url, events)

    for round_number in range(rounds):
        print(f"replay: round {round_number + 1}/{rounds}", file=sys.stderr)
        figure.add(SERVICE, await servers.run_service(sse, events))
        await measure_redis(figure, REDIS_REPLAY, "everysec", xrange)
        figure.add(NAIVE, await servers.run_naive(sse, events))
        if NCHAN_BUFFER not in figure.skipped:
            try:
                with nchan_server() as base_url:
                    figure.add(
                        NCHAN_BUFFER,
                        await nchan_replay_rate(min(events, NCHAN_REPLAY_EVENTS), base_url),
                    )
            except NchanUnavailable as error:
                print(f"skipping nchan: {error}", file=sys.stderr)
                figure.skip(NCHAN_BUFFER, str(error))
            except Exception as error:  # a peer that fails mid-run is reported, not fatal
                print(f"nchan replay failed: {error!r}", file=sys.stderr)
                figure.skip(NCHAN_BUFFER, f"failed: {error!r}")
    return [figure]


async def run(quick: bool, rounds: int, only: tuple[str, ...]) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="activity-bench-") as directory:
        scratch = Path(directory)
        servers = Servers(scratch)
        for name in only:
            started = time.monotonic()
            if name == "append":
                figures += await append_figures(quick, rounds, scratch)
            elif name == "http":
                figures += await http_figures(quick, rounds, servers)
            elif name == "fanout":
                from bench import fanout

                figures += await fanout.run(quick, rounds)
            elif name == "replay":
                figures += await replay_figures(quick, rounds, servers)
            elif name == "idle":
                from bench import connections

                figures += await connections.run(quick, rounds)
            elif name == "growth":
                from bench import growth

                figures += await growth.run(quick, rounds)
            elif name == "chain":
                figures += await chain_figures(quick, rounds, scratch, servers)
            elif name == "servers":
                from bench import servers as server_choice

                figures += await server_choice.run(quick, rounds)
            print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return figures


def _ceilings(quick: bool) -> Figure:
    figure = Figure(
        "client_ceiling",
        "load client's own ceiling (a server that does no work)",
        "events/s",
        reference="sse_http",
    )
    for name, rate in asyncio.run(client_ceiling(clients=50, total=5_000)).items():
        figure.add(name, rate)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 3)")
    parser.add_argument(
        "--only",
        default=",".join(ALL),
        help=f"comma-separated figures to run, of: {', '.join(ALL)} (default: all)",
    )
    args = parser.parse_args()
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    rounds = args.rounds or (2 if args.quick else 3)
    figures = asyncio.run(run(args.quick, rounds, only))
    figures.append(_ceilings(args.quick))
    print(render(figures))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {"quick": args.quick, "rounds": rounds, "figures": [f.as_json() for f in figures]},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
