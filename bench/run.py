"""Run the benchmark figures, service and baseline alternating (A B A B) in one run.

    python -m bench.run            # full sizes, 3 rounds per figure
    python -m bench.run --quick    # smaller sizes, 2 rounds: a few minutes

Prints medians, each figure's ratio to its baseline, and the load client's own ceiling, so
that no figure is just the client's limit. This machine is noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import (
    client_ceiling,
    free_port,
    post_events_raw,
    sse_replay,
    start_server,
    stop_server,
    wait_ready,
)
from bench.raw_sqlite import raw_sqlite_rate
from bench.service import fill_log, service_append_rate

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    name: str
    unit: str
    service: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.service) / statistics.median(self.baseline)


class Servers:
    """Start the service (on a fresh SQLite file) or the naive peer for one measurement."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0

    def _database(self) -> Path:
        self.count += 1
        return self.scratch / f"service-{self.count}.db"

    async def run_service(
        self, measure: Callable[[str], Awaitable[float]], prefill: int = 0
    ) -> float:
        database = self._database()
        if prefill:
            await fill_log(database, prefill)
        env = {"DATABASE_URL": f"sqlite+aiosqlite:///{database}", "HEARTBEAT_SECONDS": "15"}
        return await self._run(
            [sys.executable, "-m", "app", "serve", "--log-level", "warning"], env, measure
        )

    async def run_naive(
        self, measure: Callable[[str], Awaitable[float]], prefill: int = 0
    ) -> float:
        async def filled(base_url: str) -> float:
            if prefill:
                await post_events_raw(base_url, 4, prefill, 1000)
            return await measure(base_url)

        return await self._run([sys.executable, "-m", "bench.peers.naive"], {}, filled)

    @staticmethod
    async def _run(
        command: list[str], env: dict[str, str], measure: Callable[[str], Awaitable[float]]
    ) -> float:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        process = start_server(command, port, env)
        try:
            await asyncio.to_thread(wait_ready, base_url, 60.0, process)
            return await measure(base_url)
        finally:
            stop_server(process)


async def run(quick: bool, rounds: int) -> list[Figure]:
    sizes = {
        "append": 20_000 if quick else 100_000,
        "http_single": 5_000 if quick else 20_000,
        "http_batch": 50_000 if quick else 200_000,
        "replay": 100_000,
    }
    figures = {
        "append": Figure(
            "durable append, in-process, 100 producers",
            "events/s",
            baseline_name="raw sqlite3, batches of 1000, synchronous=FULL",
            target=">= 0.50",
        ),
        "append_100": Figure(
            "durable append, in-process, 100 producers (same runs)",
            "events/s",
            baseline_name="raw sqlite3, batches of 100 (the most 100 producers can form)",
        ),
        "http_single": Figure(
            "append over HTTP, single endpoint, 50 clients",
            "events/s",
            baseline_name="naive in-memory server",
        ),
        "http_batch": Figure(
            "append over HTTP, batch endpoint (100/request), 50 clients",
            "events/s",
            baseline_name="naive in-memory server",
        ),
        "replay": Figure(
            "SSE replay of 100k events to one client",
            "events/s",
            baseline_name="naive in-memory server",
        ),
    }
    with tempfile.TemporaryDirectory(prefix="activity-bench-") as directory:
        scratch = Path(directory)
        servers = Servers(scratch)
        for round_number in range(rounds):
            print(f"round {round_number + 1}/{rounds}", file=sys.stderr)
            figure = figures["append"]
            figure.service.append(
                await service_append_rate(scratch / f"append-{round_number}.db", sizes["append"])
            )
            figure.baseline.append(
                await asyncio.to_thread(
                    raw_sqlite_rate, scratch / f"raw-{round_number}.db", sizes["append"], 1000
                )
            )
            # With 100 producers each awaiting its event, no transaction can hold more than 100:
            # the same raw inserts at that batch size are the comparable ceiling.
            same = figures["append_100"]
            same.service.append(figure.service[-1])
            same.baseline.append(
                await asyncio.to_thread(
                    raw_sqlite_rate, scratch / f"raw100-{round_number}.db", sizes["append"], 100
                )
            )

            async def single(base_url: str) -> float:
                return await post_events_raw(base_url, 50, sizes["http_single"], None)

            async def batched(base_url: str) -> float:
                return await post_events_raw(base_url, 50, sizes["http_batch"], 100)

            async def replay(base_url: str) -> float:
                return await sse_replay(base_url, "/events/stream", sizes["replay"], 0)

            for key, measure, prefill in (
                ("http_single", single, 0),
                ("http_batch", batched, 0),
                ("replay", replay, sizes["replay"]),
            ):
                figures[key].service.append(await servers.run_service(measure, prefill))
                figures[key].baseline.append(await servers.run_naive(measure, prefill))
    return list(figures.values())


def report(figures: list[Figure], ceiling: dict[str, float]) -> str:
    lines = [
        f"{'figure':<58} {'service':>12} {'baseline':>12} {'ratio':>7}  baseline",
        "-" * 120,
    ]
    for figure in figures:
        lines.append(
            f"{figure.name:<58} {statistics.median(figure.service):>12,.0f} "
            f"{statistics.median(figure.baseline):>12,.0f} {figure.ratio:>7.2f}  "
            f"{figure.baseline_name}{'  target ' + figure.target if figure.target else ''}"
        )
    lines.append("")
    lines.append("load client ceiling (against a server that does no work), events/s:")
    lines.extend(f"  {name:<16} {rate:>12,.0f}" for name, rate in ceiling.items())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 3)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    figures = asyncio.run(run(args.quick, rounds))
    ceiling = asyncio.run(client_ceiling(clients=50, total=5_000))
    print(report(figures, ceiling))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {
                "figures": [
                    {
                        "name": f.name,
                        "service": f.service,
                        "baseline": f.baseline,
                        "baseline_name": f.baseline_name,
                        "ratio": f.ratio,
                    }
                    for f in figures
                ],
                "ceiling": ceiling,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
