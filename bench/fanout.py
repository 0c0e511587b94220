"""Fan-out: N SSE subscribers, one producer at a fixed rate; delivered events/s, the
append -> receive latency (p50, p99) and the server's CPU per delivered event.

    python -m bench.fanout [--quick] [--rounds N] [--processes P] [--sizes 100,500,1000]
                           [--no-saturated] [--seconds S]

Contenders, each started fresh for every measurement:

- the service (``python -m app serve`` on a new SQLite file): subscribers on
  ``GET /events/stream``, the producer posts single events to ``POST /agents/{id}/events``;
- the naive in-memory peer (:mod:`bench.peers.naive`), same contract;
- nginx + nchan (:mod:`bench.peers.nchan`): the producer posts to ``/pub``, subscribers
  read ``/sub/<channel>`` as EventSource.

All N subscribers connect first (each has its first response bytes), then one producer
posts ``rate`` events/s for ``seconds``, paced by the clock, round-robin over a few
pipelined keep-alive connections (never waiting for a response before the next send),
each event carrying its send time. Every subscriber must receive every event exactly once,
in the log's order (strictly increasing ids; :mod:`bench.subscribers`), within 60 s plus
the deliveries at 5,000/s from the first send; a contender that does not is reported as
failed and the run exits non-zero. Delivered rate = events received by all subscribers /
(last receive - first send).

The server's CPU is the user + system time of all of its processes (its process group: the
service and its SQLite writer process; nginx's master and worker) from just before the first
send until every subscriber has its last event, per delivered event (:mod:`bench.procs`).

At 500 subscribers each contender is also measured saturated: the producer offers
:data:`SATURATED_RATE` events/s (500,000 deliveries/s), more than anything here delivers, so
the delivered rate is the contender's capacity (at 200/s every contender delivers about the
offered 100,000/s and the rates only say that none fell behind).

Subscribers are spread over worker processes so that the client is not the limit; the
client's own capacity (events/s it could take with a core per process, from the CPU time it
spent per event in the saturated nchan run) is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import httpx

from bench.load import (
    free_port,
    raise_open_files,
    read_response,
    start_server,
    stop_server,
    wait_ready,
)
from bench.peers.nchan import NchanUnavailable, nchan_process
from bench.procs import group_cpu_seconds
from bench.report import SERVICE, Figure, render
from bench.subscribers import MARKER, FanoutResult, SubscriberPool, SubscriberSpec

__all__ = [
    "Contender",
    "FanoutRun",
    "Started",
    "contenders",
    "fanout_once",
    "main",
    "produce",
    "run",
    "service_env",
]

NAIVE = "naive (in-memory Litestar)"
PLAIN = "service, SSE_FANOUT=0"
NCHAN = "nchan (nginx, C)"
CLIENT = "subscriber client"
RATE = 200
TARGET_N = 500
#: The producer's rate for the saturated measurement: at 500 subscribers it offers 500,000
#: deliveries/s, more than any contender (or the subscriber client) takes on this machine, so
#: what is delivered is each contender's capacity, not the offered load.
SATURATED_RATE = 5 * RATE
#: Connections the producer posts over (round-robin, pipelined): its appends overlap, as
#: those of many agents do, and the service can commit them in groups.
PRODUCER_CONNECTIONS = 8
#: Every event must reach every subscriber within ``GRACE_SECONDS`` plus the deliveries at
#: ``SLOWEST_RATE`` from the first send; a contender slower than that is reported as failed.
GRACE_SECONDS = 60.0
SLOWEST_RATE = 5_000.0


@dataclass(frozen=True)
class Started:
    """A running server: where it answers, and its process group (all of its processes)."""

    base_url: str
    pgid: int


@dataclass(frozen=True)
class Contender:
    """How to start a server and speak to it: where subscribers read, where events go."""

    name: str
    start: Callable[[Path], AbstractAsyncContextManager[Started]]
    subscribe_path: str
    last_event_id: str
    publish_path: str
    body: Callable[[int, float], bytes]
    accepted: tuple[bytes, ...]


@dataclass
class FanoutRun:
    """One measurement: what the subscribers got, and when the producer sent."""

    subscribers: int
    events: int
    first_send: float
    last_send: float
    result: FanoutResult
    #: CPU time of the server's processes from just before the first send to the end.
    server_cpu_seconds: float = math.nan

    @property
    def server_cpu_us_per_event(self) -> float:
        """The server's CPU time per delivered event, in microseconds."""
        return 1e6 * self.server_cpu_seconds / max(1, self.result.received)

    @property
    def server_busy(self) -> float:
        """The server's CPU time over the run's length, as a share of one core."""
        took = self.result.last_receive - self.first_send
        return self.server_cpu_seconds / max(1e-9, took)

    @property
    def delivered_rate(self) -> float:
        if not self.result.received:
            return 0.0
        return self.result.received / (self.result.last_receive - self.first_send)

    @cached_property
    def _ordered_latencies(self) -> list[float]:
        return sorted(self.result.latencies_ms)

    def latency_ms(self, quantile: float) -> float:
        ordered = self._ordered_latencies
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    @property
    def client_capacity(self) -> float:
        """Events/s the subscriber processes could take with a core each, from the CPU
        time they used per event."""
        result = self.result
        return result.processes * result.received / max(1e-9, result.cpu_seconds)

    def summary(self) -> str:
        result = self.result
        took = result.last_receive - self.first_send
        offered = self.subscribers * self.events / max(1e-9, self.last_send - self.first_send)
        per_event_us = 1e6 * result.cpu_seconds / max(1, result.received)
        busy = result.cpu_seconds / max(1e-9, took * result.processes)
        return (
            f"delivered {self.delivered_rate:,.0f} events/s ({result.received:,} in {took:.1f} s"
            f"; offered {offered:,.0f}/s), p50 {self.latency_ms(0.5):.1f} ms, p99 "
            f"{self.latency_ms(0.99):.1f} ms; server CPU {self.server_busy:.0%} of a core, "
            f"{self.server_cpu_us_per_event:.2f} us/event; client CPU {result.cpu_seconds:.1f} s, "
            f"{per_event_us:.1f} us/event, {busy:.0%} of {result.processes} processes"
        )

    def check(self) -> None:
        """Every subscriber got every event once, in order; raises otherwise."""
        result = self.result
        if result.errors or result.complete != self.subscribers:
            shown = "; ".join(sorted(set(result.errors))[:3])
            raise RuntimeError(
                f"{result.complete} of {self.subscribers} subscribers got all {self.events} "
                f"events ({result.received:,} of {self.subscribers * self.events:,} received, "
                f"{self.delivered_rate:,.0f}/s): {shown}"
            )


def _agent_body(seq: int, sent: float) -> bytes:
    marker = MARKER % (seq, sent)
    return (
        b'{"event":"progress","payload":{"agent_name":"bench","status":"running",%s,'
        b'"progress":0.5}}' % marker
    )


def _envelope_body(seq: int, sent: float) -> bytes:
    """For nchan, which relays the body as it is: shaped like the service's envelope, so
    both servers move about the same bytes per event."""
    return (
        b'{"position":%d,"stream":"agent","source_id":"fanout-bench","version":%d,'
        b'"event":"progress","event_id":"6f1c2a7e-0d4b-4c39-9f3e-2b8f5a1d7c90",'
        b'"timestamp":"2025-01-24T12:34:56.789Z","payload":{"agent_name":"bench",'
        b'"status":"running",%s,"progress":0.5}}'
    ) % (seq + 1, seq + 1, MARKER % (seq, sent))


@asynccontextmanager
async def _python_server(command: list[str], env: dict[str, str]) -> AsyncIterator[Started]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = start_server(command, port, env)
    try:
        await asyncio.to_thread(wait_ready, base_url, 60.0, process)
        yield Started(base_url, process.pid)
    finally:
        stop_server(process)


def service_env(scratch: Path, **extra: str) -> dict[str, str]:
    """The service's environment for a fan-out run: a fresh SQLite log and content store."""
    name = f"fanout-{os.urandom(4).hex()}"
    return {
        "DATABASE_URL": f"sqlite+aiosqlite:///{scratch / (name + '.db')}",
        "SURREALDB_URL": "mem://",
        "ARCHIVE_DIR": str(scratch / name / "archive"),
        "HEARTBEAT_SECONDS": "15",
        **extra,
    }


def _service(**extra: str) -> Callable[[Path], AbstractAsyncContextManager[Started]]:
    """Starts the service with ``extra`` in its environment."""

    def start(scratch: Path) -> AbstractAsyncContextManager[Started]:
        return _python_server(
            [sys.executable, "-m", "app", "serve", "--log-level", "warning"],
            service_env(scratch, **extra),
        )

    return start


def _start_naive(_: Path) -> AbstractAsyncContextManager[Started]:
    return _python_server([sys.executable, "-m", "bench.peers.naive"], {})


@asynccontextmanager
async def _start_nchan(_: Path) -> AsyncIterator[Started]:
    with nchan_process(connections=12_288) as (base_url, pgid):
        yield Started(base_url, pgid)


def contenders(
    only: list[str] | None = None, *, sse_connections: int | None = None
) -> list[Contender]:
    """Every contender, or those named in ``only`` (``service``, ``plain``, ``naive``,
    ``nchan``), in that order; the service allowing ``sse_connections`` streams."""
    extra = {} if sse_connections is None else {"SSE_MAX_CONNECTIONS": str(sse_connections)}
    # A fresh nchan server per measurement, so one channel name serves.
    every = [
        Contender(
            SERVICE,
            _service(**extra),
            "/events/stream",
            "0",
            "/agents/fanout-bench/events",
            _agent_body,
            (b"201",),
        ),
        # The service with every subscriber written by its own task: what the fan-out is worth.
        Contender(
            PLAIN,
            _service(SSE_FANOUT="0", **extra),
            "/events/stream",
            "0",
            "/agents/fanout-bench/events",
            _agent_body,
            (b"201",),
        ),
        Contender(
            NAIVE,
            _start_naive,
            "/events/stream",
            "0",
            "/agents/fanout-bench/events",
            _agent_body,
            (b"201",),
        ),
        # "0:0": from the oldest buffered message, so nothing published between the
        # subscription and its first bytes can be missed.
        Contender(
            NCHAN,
            _start_nchan,
            "/sub/fanout",
            "0:0",
            "/pub?id=fanout",
            _envelope_body,
            (b"201", b"202"),
        ),
    ]
    if only is None:
        return every
    short = dict(zip(CONTENDERS, every, strict=True))
    return [short[name] for name in CONTENDERS if name in only]


#: The contenders' short names, for ``--only``.
CONTENDERS = ("service", "plain", "naive", "nchan")


class _Answers:
    """Reads the producer's pipelined responses, counting them as they come."""

    def __init__(self, reader: asyncio.StreamReader, accepted: tuple[bytes, ...]) -> None:
        self.reader = reader
        self.accepted = accepted
        self.count = 0

    async def read(self, expected: int) -> None:
        reader = self.reader
        while self.count < expected:
            status = await read_response(reader)
            if status[9:12] not in self.accepted:
                raise RuntimeError(f"publish {self.count + 1} answered {status!r}")
            self.count += 1


async def produce(
    base_url: str,
    contender: Contender,
    events: int,
    rate: float,
    budget: float,
    connections: int = PRODUCER_CONNECTIONS,
) -> tuple[float, float]:
    """Post ``events`` events at ``rate``/s, paced by the clock and never waiting for an
    answer, round-robin over ``connections`` pipelined keep-alive connections (one
    connection would serialise a durable server's commits: HTTP/1.1 answers in order);
    returns the first and last send times (``time.time()``) once every post is answered, at
    most ``budget`` seconds after the first."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    opened = [await asyncio.open_connection(host, port) for _ in range(connections)]
    head = (
        f"POST {contender.publish_path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
        "content-type: application/json\r\ncontent-length: "
    ).encode()
    loop = asyncio.get_running_loop()
    shares = [len(range(index, events, connections)) for index in range(connections)]
    answers = [_Answers(reader, contender.accepted) for reader, _ in opened]
    reading = [
        asyncio.create_task(answer.read(share))
        for answer, share in zip(answers, shares, strict=True)
    ]
    everything = asyncio.gather(*reading)
    first = last = 0.0
    try:
        started = loop.time()
        for seq in range(events):
            delay = started + seq / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if everything.done():
                everything.result()  # an early failure, raised here
            last = time.time()
            if seq == 0:
                first = last
            body = contender.body(seq, last)
            opened[seq % connections][1].write(head + b"%d\r\n\r\n%s" % (len(body), body))
        try:
            await asyncio.wait_for(asyncio.shield(everything), first + budget - time.time())
        except TimeoutError:
            answered = sum(answer.count for answer in answers)
            raise RuntimeError(
                f"only {answered} of {events} posts answered {budget:.0f} s after "
                f"the first ({answered / (time.time() - first):.0f}/s)"
            ) from None
    finally:
        everything.cancel()
        for _, writer in opened:
            writer.close()
    return first, last


async def fanout_once(
    contender: Contender,
    scratch: Path,
    subscribers: int,
    rate: float,
    seconds: float,
    processes: int,
) -> FanoutRun:
    """Start ``contender`` fresh, hold ``subscribers`` on it, produce, gather, stop."""
    events = round(rate * seconds)
    budget = GRACE_SECONDS + subscribers * events / SLOWEST_RATE
    async with contender.start(scratch) as started:
        base_url = started.base_url
        url = httpx.URL(base_url)
        spec = SubscriberSpec(
            url.host, url.port or 80, contender.subscribe_path, contender.last_event_id, events
        )
        pool = SubscriberPool(spec, subscribers, processes)
        try:
            await pool.start()
            cpu_before = group_cpu_seconds(started.pgid)
            first, last = await produce(base_url, contender, events, rate, budget)
            result = await pool.finish(max(5.0, first + budget - time.time()))
            cpu = group_cpu_seconds(started.pgid) - cpu_before
        finally:
            pool.close()
    return FanoutRun(subscribers, events, first, last, result, cpu)


def _figures(sizes: list[int]) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    for n in sizes:
        at_target = n == TARGET_N
        figures[f"fanout_{n}_rate"] = Figure(
            f"fanout_{n}_rate",
            f"fan-out to {n} SSE subscribers, one producer at {RATE}/s: delivered",
            "events/s",
            target=">= 0.5x nchan" if at_target else "",
        )
        if at_target:
            figures[SATURATED] = Figure(
                SATURATED,
                f"fan-out to {n} SSE subscribers, producer offering {SATURATED_RATE}/s "
                "(saturated): delivered",
                "events/s",
                target=">= 3x naive, >= 0.5x nchan",
            )
        figures[f"fanout_{n}_p50"] = Figure(
            f"fanout_{n}_p50",
            f"fan-out to {n} subscribers at {RATE}/s: append -> receive p50",
            "ms",
            higher_is_better=False,
            target="< 5 ms" if n == 100 else "",
        )
        figures[f"fanout_{n}_p99"] = Figure(
            f"fanout_{n}_p99",
            f"fan-out to {n} subscribers at {RATE}/s: append -> receive p99",
            "ms",
            higher_is_better=False,
            target="<= 2x nchan" + (", < 100 ms" if at_target else ""),
        )
        figures[f"fanout_{n}_cpu"] = Figure(
            f"fanout_{n}_cpu",
            f"fan-out to {n} subscribers at {RATE}/s: server CPU per delivered event",
            "us",
            higher_is_better=False,
            target="<= 1.5x nchan",
        )
    return figures


SATURATED = f"fanout_{TARGET_N}_saturated"


def _record(figures: dict[str, Figure], n: int, name: str, measured: FanoutRun) -> None:
    figures[f"fanout_{n}_rate"].add(name, measured.delivered_rate)
    figures[f"fanout_{n}_p50"].add(name, measured.latency_ms(0.50))
    figures[f"fanout_{n}_p99"].add(name, measured.latency_ms(0.99))
    figures[f"fanout_{n}_cpu"].add(name, measured.server_cpu_us_per_event)


def _capacity_figure(processes: int) -> Figure:
    return Figure(
        "fanout_client_capacity",
        f"subscriber client: {processes} processes / CPU time per event (saturated nchan run)",
        "events/s",
        reference=CLIENT,
    )


async def _measure(
    figures: dict[str, Figure],
    unavailable: dict[str, str],
    contender: Contender,
    scratch: Path,
    n: int,
    rate: float,
    seconds: float,
    processes: int,
) -> FanoutRun | None:
    """One measurement, checked; a contender that cannot start or fails is recorded as skipped
    (under every figure it would have filled) and None returned."""
    name = contender.name
    keys = (
        [SATURATED]
        if rate != RATE
        else [f"fanout_{n}_{suffix}" for suffix in ("rate", "p50", "p99", "cpu")]
    )
    if name in unavailable:
        for key in keys:
            figures[key].skip(name, unavailable[name])
        return None
    try:
        measured = await fanout_once(contender, scratch, n, rate, seconds, processes)
        measured.check()
    except NchanUnavailable as exc:
        unavailable[name] = str(exc)
        print(f"{name} skipped: {exc}", file=sys.stderr)
        for key in keys:
            figures[key].skip(name, str(exc))
        return None
    except (RuntimeError, TimeoutError, OSError) as exc:
        reason = f"failed: {type(exc).__name__}: {exc}"
        print(f"FAILED {name}, {n} subscribers at {rate:g}/s: {reason}", file=sys.stderr)
        for key in keys:
            figures[key].skip(name, reason[:300])
        return None
    print(f"  {measured.summary()}", file=sys.stderr)
    return measured


async def run(
    quick: bool,
    rounds: int,
    processes: int = 2,
    *,
    sizes: list[int] | None = None,
    saturated: bool = True,
    seconds: float | None = None,
    only: list[str] | None = None,
) -> list[Figure]:
    """Every contender at each size (and saturated at :data:`TARGET_N`), round by round, in
    the same order each round (service, then the peers: A B A B)."""
    sizes = sizes or ([100, 500] if quick else [100, 500, 1000])
    seconds = seconds or (3.0 if quick else 10.0)
    figures = _figures(sizes)
    capacity = _capacity_figure(processes)
    raise_open_files(max(sizes) * 4 + 4096)
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as directory:
        scratch = Path(directory)
        for round_number in range(rounds):
            for n in sizes:
                for contender in contenders(only):
                    print(f"round {round_number + 1}/{rounds}: {contender.name}, {n} subscribers",
                          file=sys.stderr)  # fmt: skip
                    measured = await _measure(
                        figures, unavailable, contender, scratch, n, RATE, seconds, processes
                    )
                    if measured is not None:
                        _record(figures, n, contender.name, measured)
                        if not saturated and contender.name == NCHAN and n == max(sizes):
                            capacity.add(CLIENT, measured.client_capacity)
            if not saturated:
                continue
            for contender in contenders(only):
                print(f"round {round_number + 1}/{rounds}: {contender.name}, {TARGET_N} "
                      f"subscribers, saturated", file=sys.stderr)  # fmt: skip
                measured = await _measure(
                    figures,
                    unavailable,
                    contender,
                    scratch,
                    TARGET_N,
                    SATURATED_RATE,
                    seconds,
                    processes,
                )
                if measured is None:
                    continue
                figures[SATURATED].add(contender.name, measured.delivered_rate)
                if contender.name == NCHAN:
                    capacity.add(CLIENT, measured.client_capacity)
    if not saturated:
        figures.pop(SATURATED, None)
        capacity.name = (
            f"subscriber client: {processes} processes / CPU time per event "
            f"(nchan at {max(sizes)} x {RATE}/s, not saturated: a lower bound)"
        )
    return [*figures.values(), capacity]


def failed(figures: list[Figure]) -> list[str]:
    """Contenders whose subscribers did not all get every event, once, in order."""
    return [
        f"{figure.key}: {name}: {reason}"
        for figure in figures
        for name, reason in figure.skipped.items()
        if reason.startswith("failed:")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 and 500 subscribers, 3 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 2)")
    parser.add_argument("--processes", type=int, default=2, help="subscriber client processes")
    parser.add_argument("--sizes", default=None, help="subscriber counts, e.g. 100,500,1000")
    parser.add_argument(
        "--no-saturated", action="store_true", help="skip the saturated run at 500 subscribers"
    )
    parser.add_argument("--seconds", type=float, default=None, help="producing time per run")
    parser.add_argument(
        "--only", default=None, help=f"contenders, comma-separated: {','.join(CONTENDERS)}"
    )
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else None
    figures = asyncio.run(
        run(
            args.quick,
            rounds,
            args.processes,
            sizes=sizes,
            saturated=not args.no_saturated,
            seconds=args.seconds,
            only=args.only.split(",") if args.only else None,
        )
    )
    print(render(figures))
    problems = failed(figures)
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
