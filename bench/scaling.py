"""Appends over HTTP on PostgreSQL beside SQLite, and 1, 2 and 3 instances on one PostgreSQL:
throughput, and how soon an event appended on one instance reaches a subscriber on another.

    python -m bench.scaling [--rounds 3] [--single N] [--batch N] [--paced-seconds S]

Contenders, each started fresh (a new database) for every measurement, alternating round by
round (sqlite, pg x1, pg x2, pg x3, ceiling, sqlite, …) so the machine's noise falls on all:

- ``sqlite x1``: one ``python -m app serve`` on a new SQLite file (the default appender);
- ``postgres xN``: N instances on one new PostgreSQL database;
- ``ceiling xN``: the same load clients against N trivial servers that answer at once
  (:mod:`bench.peers.trivial`): the clients' own limit, printed beside the figures so that no
  figure is the client's.

On each, in order, each phase once the projections of every instance hold the whole log:
``single`` (``POST /agents/{id}/events``, one event a request) and
``batch`` (``POST /agents/events``, 100 a request) as fast as they are answered, by
:data:`CONNECTIONS` keep-alive connections on plain sockets spread over the instances and over
:data:`CLIENT_PROCESSES` processes of their own; then ``paced``: one producer process posts
:data:`PACED_RATE` events/s paced by the clock, round robin over the instances, each event
carrying its send time and the instance it was posted to. All the while a subscriber process
holds one SSE stream (``/events/stream``) per instance; every stream must receive every
event once, in order, or the run fails. Latency is receive time minus send time (one
machine, one clock); ``cross`` counts only events appended on another instance than the
subscriber's (with one instance, every event is the subscriber's own).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from bench.load import (
    REPO_ROOT,
    free_port,
    read_response,
    start_server,
    stop_server,
    wait_projected,
    wait_ready,
)
from bench.report import quantile

__all__ = ["main", "run"]

ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
#: Keep-alive connections posting, spread over the instances and the client processes.
CONNECTIONS = 48
CLIENT_PROCESSES = 2
BATCH = 100
SOURCES = 100
PACED_RATE = 1000
#: The paced producer's connections per instance: each waits for its answer, so several let
#: appends overlap as those of many agents do.
PACED_CONNECTIONS = 32

SQLITE = "sqlite x1"
CEILING = "ceiling"


def postgres(instances: int, prefix: str = "") -> str:
    return f"{prefix}postgres x{instances}"


# -- requests -------------------------------------------------------------------------------


def _payload(n: int, origin: int) -> dict[str, object]:
    return {
        "sent": time.time(),
        "origin": origin,
        "agent_name": "bench",
        "status": "running",
        "message": f"step {n}",
        "progress": 0.5,
    }


def _request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def _single(prefix: str, n: int, origin: int) -> bytes:
    body = msgspec.json.encode({"event": "progress", "payload": _payload(n, origin)})
    return _request(f"/agents/{prefix}-{n % SOURCES}/events", body)


def _batch(prefix: str, first: int, origin: int) -> bytes:
    events = [
        {
            "source_id": f"{prefix}-{n % SOURCES}",
            "event": "progress",
            "payload": _payload(n, origin),
        }
        for n in range(first, first + BATCH)
    ]
    return _request("/agents/events", msgspec.json.encode({"events": events}))


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    status = await read_response(reader)
    if b" 201 " not in status:
        raise RuntimeError(f"POST answered {status!r}")


# -- client processes ------------------------------------------------------------------------


def _post_process(
    conn: Connection, ports: list[int], connections: int, kind: str, requests: int
) -> None:
    """A client process: ``connections`` sockets spread over ``ports``; after the go, posts
    ``requests`` requests of ``kind`` as fast as they are answered; sends back its times."""

    async def run() -> tuple[float, float]:
        prefix = f"bench-{os.urandom(4).hex()}"
        sockets = [
            await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
            for i in range(connections)
        ]
        if kind == "single":
            built = deque(_single(prefix, n, -1) for n in range(requests))
        else:
            built = deque(_batch(prefix, n * BATCH, -1) for n in range(requests))
        conn.send("ready")
        await asyncio.to_thread(conn.recv)
        started = time.time()

        async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while built:
                await _send(reader, writer, built.popleft())

        async with asyncio.TaskGroup() as group:
            for reader, writer in sockets:
                group.create_task(work(reader, writer))
        ended = time.time()
        for _, writer in sockets:
            writer.close()
        return started, ended

    try:
        conn.send(asyncio.run(run()))
    except BaseException as exc:
        conn.send(RuntimeError(f"client process: {exc!r}"))


def _paced_process(conn: Connection, ports: list[int], rate: int, seconds: float) -> None:
    """The paced producer: ``rate`` single events/s for ``seconds``, event n posted to
    instance n mod len(ports), at t0 + n/rate; sends back how far behind its schedule it
    fell at most."""

    async def run() -> float:
        prefix = f"paced-{os.urandom(4).hex()}"
        queues: list[asyncio.Queue[int | None]] = [asyncio.Queue() for _ in ports]
        lag = 0.0

        async def work(port: int, queue: asyncio.Queue[int | None], origin: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while (n := await queue.get()) is not None:
                await _send(reader, writer, _single(prefix, n, origin))
            writer.close()

        total = int(rate * seconds)
        conn.send("ready")
        await asyncio.to_thread(conn.recv)
        async with asyncio.TaskGroup() as group:
            for origin, (port, queue) in enumerate(zip(ports, queues, strict=True)):
                for _ in range(PACED_CONNECTIONS):
                    group.create_task(work(port, queue, origin))
            loop = asyncio.get_running_loop()
            start = loop.time()
            for n in range(total):
                due = start + n / rate
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    lag = max(lag, now - due)
                queues[n % len(ports)].put_nowait(n)
            for queue in queues:
                for _ in range(PACED_CONNECTIONS):
                    queue.put_nowait(None)
        return lag

    try:
        conn.send(asyncio.run(run()))
    except BaseException as exc:
        conn.send(RuntimeError(f"paced producer: {exc!r}"))


class _Payload(msgspec.Struct):
    sent: float = 0.0
    origin: int = -1


class _Envelope(msgspec.Struct):
    position: int
    payload: _Payload


_DATA = re.compile(rb"^id: (\d+)\n(?:[^\n]*\n)*?data: ([^\n]*)$", re.MULTILINE)


def _subscribe_process(
    conn: Connection, ports: list[int], after: int, expected: int, timeout: float
) -> None:
    """One SSE stream per instance from ``after``; each must receive the next ``expected``
    events, contiguous. Sends back, per event and stream, (latency s, cross-instance)."""
    decode = msgspec.json.Decoder(_Envelope).decode

    async def follow(index: int, port: int, ready: asyncio.Event) -> list[tuple[float, bool]]:
        found: list[tuple[float, bool]] = []
        last = after
        pending = b""
        headers = {"last-event-id": str(after)}
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream(
                "GET", f"http://127.0.0.1:{port}/events/stream", headers=headers
            ) as response,
        ):
            ready.set()
            async for chunk in response.aiter_raw():
                now = time.time()
                pending += chunk
                end = pending.rfind(b"\n\n")
                if end < 0:
                    continue
                frames, pending = pending[:end], pending[end + 2 :]
                for match in _DATA.finditer(frames):
                    envelope = decode(match.group(2))
                    if envelope.position != last + 1:
                        raise AssertionError(f"stream {index}: {envelope.position} after {last}")
                    last = envelope.position
                    payload = envelope.payload
                    found.append((now - payload.sent, payload.origin not in (-1, index)))
                if last >= after + expected:
                    return found
        raise AssertionError(f"stream {index} ended at {last}")

    async def run() -> list[tuple[float, bool]]:
        readies = [asyncio.Event() for _ in ports]
        async with asyncio.timeout(timeout):
            tasks = [
                asyncio.create_task(follow(i, port, ready))
                for i, (port, ready) in enumerate(zip(ports, readies, strict=True))
            ]
            await asyncio.gather(*(ready.wait() for ready in readies))
            conn.send("ready")
            results = await asyncio.gather(*tasks)
        return [item for result in results for item in result]

    try:
        conn.send(asyncio.run(run()))
    except BaseException as exc:
        conn.send(RuntimeError(f"subscriber: {exc!r}"))


class _Child:
    """A process of this module's, spoken to over a pipe."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=target, args=(theirs, *args), daemon=True)
        self.process.start()

    async def receive(self, seconds: float = 120.0) -> Any:
        ready = await asyncio.to_thread(self.conn.poll, seconds)
        if not ready:
            raise TimeoutError(f"{self.process.name} said nothing in {seconds} s")
        answer = self.conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


# -- one measurement ---------------------------------------------------------------------------


class Results:
    """Samples per figure and contender, in the order measured."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}

    def add(self, figure: str, contender: str, value: float) -> None:
        self.samples.setdefault(figure, {}).setdefault(contender, []).append(value)

    def median(self, figure: str, contender: str) -> float | None:
        values = self.samples.get(figure, {}).get(contender)
        return statistics.median(values) if values else None


async def _saturate(
    ports: list[int], kind: str, events: int, subscribed: bool, after: int
) -> tuple[float, list[tuple[float, bool]]]:
    """Post ``events`` of ``kind`` over every port at once; events/s, and what the
    subscribers measured."""
    requests = events if kind == "single" else events // BATCH
    share = [requests // CLIENT_PROCESSES] * CLIENT_PROCESSES
    share[0] += requests - sum(share)
    per_process = CONNECTIONS // CLIENT_PROCESSES
    subscriber = _Child(_subscribe_process, ports, after, events, 300.0) if subscribed else None
    clients = [_Child(_post_process, ports, per_process, kind, n) for n in share]
    try:
        if subscriber is not None:
            await subscriber.receive()
        for client in clients:
            await client.receive()
        for client in clients:
            client.conn.send("go")
        times = [await client.receive(300.0) for client in clients]
        rate = events / (max(t[1] for t in times) - min(t[0] for t in times))
        latencies = await subscriber.receive(300.0) if subscriber is not None else []
        return rate, latencies
    finally:
        for child in [*clients, *([subscriber] if subscriber else [])]:
            child.close()


async def _paced(
    ports: list[int], seconds: float, after: int
) -> tuple[list[tuple[float, bool]], float]:
    total = int(PACED_RATE * seconds)
    subscriber = _Child(_subscribe_process, ports, after, total, 300.0)
    producer = _Child(_paced_process, ports, PACED_RATE, seconds)
    try:
        await subscriber.receive()
        await producer.receive()
        producer.conn.send("go")
        lag = await producer.receive(seconds + 120.0)
        latencies = await subscriber.receive(300.0)
        return latencies, lag
    finally:
        producer.close()
        subscriber.close()


def _record(results: Results, name: str, figure: str, latencies: list[tuple[float, bool]]) -> None:
    every = [seconds for seconds, _ in latencies]
    cross = [seconds for seconds, crossed in latencies if crossed] or every
    results.add(f"{figure} p50", name, quantile(every, 0.5) * 1000)
    results.add(f"{figure} p99", name, quantile(every, 0.99) * 1000)
    results.add(f"{figure} cross p99", name, quantile(cross, 0.99) * 1000)


def _profile(pids: list[int], directory: Path, label: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on every server process (with its native frames' Python callers), as
    collapsed stacks, until stopped: where the time of a phase goes."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--output",
                str(directory / f"{label}-{index}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for index, pid in enumerate(pids)
    ]


_METRIC = re.compile(
    r"^activity_append_(commit_seconds|batch_events)_(sum|count) ([0-9.e+-]+)$", re.MULTILINE
)


def _append_metrics(ports: list[int]) -> str:
    """Per instance: transactions, their mean events and mean seconds to write and commit."""
    cells = []
    for port in ports:
        found = {
            f"{m[1]}_{m[2]}": float(m[3])
            for m in _METRIC.finditer(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        }
        count = found.get("batch_events_count", 0) or 1
        cells.append(
            f"{found.get('batch_events_count', 0):,.0f} tx, "
            f"{found.get('batch_events_sum', 0) / count:.1f} events/tx, "
            f"{1000 * found.get('commit_seconds_sum', 0) / count:.2f} ms/tx"
        )
    return "; ".join(cells)


async def _projected(ports: list[int]) -> None:
    """Until every instance's projections hold the whole log: a phase starts on a service
    that has folded what came before, not one still folding the last phase's events."""
    for port in ports:
        await asyncio.to_thread(wait_projected, f"http://127.0.0.1:{port}")


async def measure(
    results: Results,
    name: str,
    servers: tuple[list[int], list[int]],
    args: argparse.Namespace,
    service: bool,
) -> None:
    """Every figure on servers already listening on ``ports`` (their process ids: ``pids``)."""
    ports, pids = servers
    head = 0
    for kind, events in (("single", args.single), ("batch", args.batch)):
        if service:
            await _projected(ports)
        profilers = []
        if args.profile and service:
            profilers = _profile(pids, args.profile, f"{name.replace(' ', '')}-{kind}")
            await asyncio.sleep(0.5)
        rate, latencies = await _saturate(ports, kind, events, service, head)
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        if args.profile and service:
            print(f"  {name} {kind} appends: {_append_metrics(ports)}", file=sys.stderr)
        head += events
        results.add(kind, name, rate)
        if latencies:
            _record(results, name, f"{kind} saturated", latencies)
        print(f"  {name} {kind}: {rate:,.0f} events/s", file=sys.stderr)
    if service:
        await _projected(ports)
        latencies, lag = await _paced(ports, args.paced_seconds, head)
        _record(results, name, "paced", latencies)
        results.add("paced producer lag", name, lag * 1000)
        print(
            f"  {name} paced: p99 {results.samples['paced p99'][name][-1]:.1f} ms, "
            f"cross p99 {results.samples['paced cross p99'][name][-1]:.1f} ms",
            file=sys.stderr,
        )


# -- servers -----------------------------------------------------------------------------------


@asynccontextmanager
async def _postgres_database() -> AsyncIterator[str]:
    name = f"bench_scaling_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def _servers(
    count: int, command: list[str], env: dict[str, str] | None, tree: Path = REPO_ROOT
) -> AsyncIterator[tuple[list[int], list[int]]]:
    """``count`` servers run from the source ``tree``: their ports and process ids."""
    ports = [free_port() for _ in range(count)]
    env = {**(env or {}), "PYTHONPATH": str(tree)}
    processes = [start_server(command, port, env, cwd=tree) for port in ports]
    try:
        for process, port in zip(processes, ports, strict=True):
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}", 90.0, process)
        yield ports, [process.pid for process in processes]
    finally:
        for process in processes:
            stop_server(process)


SERVE = [sys.executable, "-m", "app", "serve", "--log-level", "warning"]
TRIVIAL = [sys.executable, "-m", "bench.peers.trivial"]


def _service_env(url: str, extra: dict[str, str]) -> dict[str, str]:
    return {"DATABASE_URL": url, "SURREALDB_URL": "mem://", "HEARTBEAT_SECONDS": "15", **extra}


async def run(args: argparse.Namespace) -> Results:
    results = Results()
    extra = dict(item.split("=", 1) for item in args.env)
    for round_number in range(args.rounds):
        print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'log.db'}"
            async with _servers(1, SERVE, _service_env(url, extra)) as ports:
                await measure(results, SQLITE, ports, args, True)
        for instances in args.instances:
            async with (
                _postgres_database() as url,
                _servers(instances, SERVE, _service_env(url, extra)) as ports,
            ):
                await measure(results, postgres(instances), ports, args, True)
            for label, tree in args.baseline:
                async with (
                    _postgres_database() as url,
                    _servers(instances, SERVE, _service_env(url, extra), tree) as ports,
                ):
                    await measure(results, postgres(instances, f"{label} "), ports, args, True)
        for instances in sorted({1, max(args.instances)}):
            async with _servers(instances, TRIVIAL, None) as ports:
                await measure(results, f"{CEILING} x{instances}", ports, args, False)
    return results


def render(results: Results, args: argparse.Namespace) -> str:
    contenders = [SQLITE, *(postgres(n) for n in args.instances)]
    for label, _ in args.baseline:
        contenders += [postgres(n, f"{label} ") for n in args.instances]
    ceilings = [f"{CEILING} x{n}" for n in sorted({1, max(args.instances)})]
    lines = [
        f"medians of {args.rounds} round(s); {CONNECTIONS} connections in {CLIENT_PROCESSES} "
        f"client processes; paced {PACED_RATE}/s for {args.paced_seconds:g} s",
        "",
        f"{'':>20} {'single/s':>9} {'batch/s':>9} {'pg/sqlite':>9} {'vs pg x1':>9}"
        f" {'paced p50':>9} {'p99':>7} {'cross p99':>9} {'sat. p99':>8}",
    ]
    sqlite = {kind: results.median(kind, SQLITE) for kind in ("single", "batch")}

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    for name in contenders + ceilings:
        single, batch = results.median("single", name), results.median("batch", name)
        pg = scale = ""
        if "postgres" in name:
            # Against SQLite, and against one instance of the same code.
            one = name.rsplit(" x", 1)[0] + " x1"
            pg = f"{ratio(single, sqlite['single'])}/{ratio(batch, sqlite['batch'])}"
            scale = (
                f"{ratio(single, results.median('single', one))}/"
                f"{ratio(batch, results.median('batch', one))}"
            )
        lines.append(
            f"{name:>20} {number(single):>9} {number(batch):>9} {pg:>9} {scale:>9}"
            f" {number(results.median('paced p50', name), 1):>9}"
            f" {number(results.median('paced p99', name), 1):>7}"
            f" {number(results.median('paced cross p99', name), 1):>9}"
            f" {number(results.median('single saturated p99', name)):>8}"
        )
    lines.append("")
    lines.append("rounds (single/s, batch/s, paced cross p99 ms):")
    for name in contenders + ceilings:
        rows = zip(
            results.samples.get("single", {}).get(name, []),
            results.samples.get("batch", {}).get(name, []),
            results.samples.get("paced cross p99", {}).get(name, [None] * args.rounds),
            strict=False,
        )
        cells = [
            f"{s:,.0f}, {b:,.0f}" + (f", {p:.1f}" if p is not None else "") for s, b, p in rows
        ]
        lines.append(f"{name:>20}: " + "; ".join(cells))
    lags = results.samples.get("paced producer lag", {})
    if lags:
        worst = max(max(values) for values in lags.values())
        lines.append(f"the paced producer fell at most {worst:.1f} ms behind its schedule")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=20_000, help="single appends a run")
    parser.add_argument("--batch", type=int, default=100_000, help="batch-appended events a run")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument(
        "--instances", default="1,2,3", help="PostgreSQL instance counts (default 1,2,3)"
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run the PostgreSQL contenders from the source tree DIR (the code before a "
        "change), named NAME, alternating with this one; may be repeated",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy profiles of every service process here (and print append metrics)",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for every service instance"
    )
    args = parser.parse_args()
    args.instances = [int(n) for n in args.instances.split(",")]
    args.baseline = [
        (name, Path(tree)) for name, tree in (item.split("=", 1) for item in args.baseline)
    ]
    results = asyncio.run(run(args))
    print(render(results, args))


if __name__ == "__main__":
    main()
