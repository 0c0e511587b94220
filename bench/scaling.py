"""Append throughput and append->deliver latency with 1, 2 and 3 instances on one PostgreSQL.

    python -m bench.scaling [--events 6000] [--rounds 2]

Each instance gets one SSE subscriber; 48 keep-alive clients spread over the instances post
single events carrying their send time; every subscriber must receive every event (once, in
order), and the latency is receive time minus send time, over all subscribers. Instance
counts alternate round by round (1 2 3 1 2 3 …) so the machine's noise falls on all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque

import asyncpg
import httpx
import msgspec

from bench.load import free_port, start_server, stop_server, wait_ready

ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _fresh_database() -> tuple[str, str]:
    name = f"activity_bench_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}", name


async def _drop_database(name: str) -> None:
    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def _subscribe(
    base_url: str, total: int, latencies: list[float], ready: asyncio.Event
) -> None:
    last = 0
    buffer = b""
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("GET", f"{base_url}/agents/stream", params={"last_event_id": 0}) as response,
    ):
        ready.set()
        async for chunk in response.aiter_bytes():
            now = time.time()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if not frame.startswith(b"id: "):
                    continue
                data = frame.rsplit(b"\ndata: ", 1)[1]
                envelope = msgspec.json.decode(data)
                if envelope["position"] != last + 1:
                    raise AssertionError(f"gap or repeat after {last}: {envelope['position']}")
                last = envelope["position"]
                latencies.append(now - envelope["payload"]["sent"])
                if last >= total:
                    return


async def _post(urls: list[str], requests: deque[int]) -> None:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1)) as client:
        while requests:
            n = requests.popleft()
            url = urls[n % len(urls)]
            body = {"event": "progress", "payload": {"agent_name": "bench", "sent": time.time()}}
            answer = await client.post(f"{url}/agents/bench-{n % 50}/events", json=body)
            if answer.status_code != 201:
                raise RuntimeError(f"{answer.status_code}: {answer.text[:200]}")


async def measure(instances: int, events: int) -> tuple[float, float, float]:
    url, name = await _fresh_database()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for _ in range(instances):
            port = free_port()
            env = {"DATABASE_URL": url, "SURREALDB_URL": "mem://", "HEARTBEAT_SECONDS": "15"}
            processes.append(
                start_server(
                    [sys.executable, "-m", "app", "serve", "--log-level", "warning"], port, env
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for process, base in zip(processes, urls, strict=True):
            await asyncio.to_thread(wait_ready, base, 60.0, process)
        latencies: list[float] = []
        readies = [asyncio.Event() for _ in urls]
        subscribers = [
            asyncio.create_task(_subscribe(base, events, latencies, ready))
            for base, ready in zip(urls, readies, strict=True)
        ]
        await asyncio.gather(*(ready.wait() for ready in readies))
        requests = deque(range(events))
        started = time.perf_counter()
        await asyncio.gather(*(_post(urls, requests) for _ in range(48)))
        rate = events / (time.perf_counter() - started)
        await asyncio.wait_for(asyncio.gather(*subscribers), 120)
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        return rate, p50, p99
    finally:
        for process in processes:
            stop_server(process)
        await _drop_database(name)


async def run(events: int, rounds: int) -> dict[int, list[tuple[float, float, float]]]:
    results: dict[int, list[tuple[float, float, float]]] = {1: [], 2: [], 3: []}
    for round_number in range(rounds):
        for instances in (1, 2, 3):
            print(f"round {round_number + 1}: {instances} instance(s)", file=sys.stderr)
            results[instances].append(await measure(instances, events))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = asyncio.run(run(args.events, args.rounds))
    base = statistics.median(r[0] for r in results[1])
    print(f"{'instances':>9} {'appends/s':>10} {'vs 1':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for instances, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        p50 = statistics.median(r[1] for r in rows)
        p99 = statistics.median(r[2] for r in rows)
        print(f"{instances:>9} {rate:>10,.0f} {rate / base:>6.2f} {p50:>8.1f} {p99:>8.1f}")


if __name__ == "__main__":
    main()
