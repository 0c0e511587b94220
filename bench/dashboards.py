"""Many quiet dashboards: 10,000 SSE subscribers on one instance, one event a second each.

    python -m bench.dashboards [--subscribers N] [--seconds S] [--rounds N] [--processes P]
                               [--only service,plain,naive,nchan]

A fleet of open dashboards is many connections that each get little: what matters is that
every one gets every event, soon, and what each connection costs the server in memory. Each
contender (:func:`bench.fanout.contenders`: the service, the service with ``SSE_FANOUT=0``,
the naive peer, nginx + nchan), started fresh, holds ``N`` subscribers (10,000) spread over
``P`` client processes (4), each checking that it gets every event once, in order
(:mod:`bench.subscribers`); then one producer posts one event a second for ``S`` seconds
(30). Reported per contender, as medians of the rounds (A B A B):

- append -> receive p50 and p99 (target for the service: p99 under 250 ms);
- the server's memory per connection: the resident memory of all of its processes (its
  process group) once every subscriber has its first bytes, less what it was before they
  connected, over ``N`` (KiB);
- the server's CPU per delivered event, as :mod:`bench.fanout` measures it.

The open-file limit is raised for the bench, the servers it starts and the client
processes; the service runs with ``SSE_MAX_CONNECTIONS`` above ``N``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import fanout
from bench.fanout import Contender, FanoutRun, contenders, produce
from bench.load import raise_open_files
from bench.peers.nchan import NchanUnavailable
from bench.procs import group_cpu_seconds, group_rss_mib
from bench.report import Figure, render
from bench.subscribers import SubscriberPool, SubscriberSpec

__all__ = ["main", "run"]

SUBSCRIBERS = 10_000
RATE = 1.0
P99_TARGET_MS = 250.0


async def dashboards_once(
    contender: Contender, scratch: Path, subscribers: int, seconds: float, processes: int
) -> tuple[FanoutRun, float]:
    """One measurement: the run, and the server's memory per connection (KiB)."""
    events = round(RATE * seconds)
    budget = fanout.GRACE_SECONDS + seconds
    async with contender.start(scratch) as started:
        url = httpx.URL(started.base_url)
        spec = SubscriberSpec(
            url.host, url.port or 80, contender.subscribe_path, contender.last_event_id, events
        )
        pool = SubscriberPool(spec, subscribers, processes)
        try:
            before = group_rss_mib(started.pgid)
            await pool.start()
            held = group_rss_mib(started.pgid)
            cpu_before = group_cpu_seconds(started.pgid)
            # One connection: at one post a second it never idles past a server's keep-alive
            # timeout (the service's is 5 s), as eight taking turns would.
            first, last = await produce(
                started.base_url, contender, events, RATE, budget, connections=1
            )
            result = await pool.finish(max(5.0, first + budget - time.time()))
            cpu = group_cpu_seconds(started.pgid) - cpu_before
        finally:
            pool.close()
    per_connection = (held - before) * 1024 / subscribers
    return FanoutRun(subscribers, events, first, last, result, cpu), per_connection


def _figures(subscribers: int) -> dict[str, Figure]:
    what = f"{subscribers:,} SSE subscribers at {RATE:g} event/s"
    return {
        "p50": Figure("dashboards_p50", f"{what}: append -> receive p50", "ms", False),
        "p99": Figure(
            "dashboards_p99",
            f"{what}: append -> receive p99",
            "ms",
            False,
            target=f"< {P99_TARGET_MS:g} ms",
        ),
        "memory": Figure(
            "dashboards_memory", f"{what}: server memory per connection", "KiB", False
        ),
        "cpu": Figure("dashboards_cpu", f"{what}: server CPU per delivered event", "us", False),
    }


async def run(
    subscribers: int, seconds: float, rounds: int, processes: int, only: list[str] | None
) -> list[Figure]:
    figures = _figures(subscribers)
    raise_open_files(2 * subscribers + 4096)
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dashboards-") as directory:
        scratch = Path(directory)
        for round_number in range(rounds):
            for contender in contenders(only, sse_connections=subscribers + 1000):
                name = contender.name
                if name in unavailable:
                    continue
                print(f"round {round_number + 1}/{rounds}: {name}, {subscribers:,} subscribers",
                      file=sys.stderr)  # fmt: skip
                try:
                    measured, memory = await dashboards_once(
                        contender, scratch, subscribers, seconds, processes
                    )
                    measured.check()
                except NchanUnavailable as exc:
                    unavailable[name] = str(exc)
                    for figure in figures.values():
                        figure.skip(name, str(exc))
                    continue
                except (RuntimeError, TimeoutError, OSError) as exc:
                    reason = f"failed: {type(exc).__name__}: {exc}"
                    print(f"FAILED {name}: {reason}", file=sys.stderr)
                    for figure in figures.values():
                        figure.skip(name, reason[:300])
                    continue
                print(f"  {measured.summary()}; {memory:.1f} KiB/connection", file=sys.stderr)
                figures["p50"].add(name, measured.latency_ms(0.50))
                figures["p99"].add(name, measured.latency_ms(0.99))
                figures["memory"].add(name, memory)
                figures["cpu"].add(name, measured.server_cpu_us_per_event)
    return list(figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS)
    parser.add_argument("--seconds", type=float, default=30.0, help="producing time")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--processes", type=int, default=4, help="subscriber client processes")
    parser.add_argument(
        "--only", default=None, help=f"contenders, comma-separated: {','.join(fanout.CONTENDERS)}"
    )
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    figures = asyncio.run(run(args.subscribers, args.seconds, args.rounds, args.processes, only))
    print(render(figures))
    problems = fanout.failed(figures)
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
