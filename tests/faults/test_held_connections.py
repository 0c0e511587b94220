"""Many SSE connections held open on `python -m app serve`: each receives every event once, in
order, with heartbeats in between, costs the server little memory, and gets the shutdown frame
when the server stops."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, agent_event

CONNECTIONS = 200
EVENTS = 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Subscriber:
    """One raw SSE connection: the ids, heartbeats and shutdown frames it received."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.heartbeats = 0
        self.shutdowns = 0
        self.started = asyncio.Event()
        self.received_all = asyncio.Event()

    async def hold(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /agents/stream HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            self.started.set()
            while line := await reader.readline():
                if line.startswith(b"id: "):
                    self.ids.append(int(line[4:]))
                    if len(self.ids) == EVENTS:
                        self.received_all.set()
                elif line == b"event: heartbeat\n":
                    self.heartbeats += 1
                elif line == b"event: shutdown\n":
                    self.shutdowns += 1
        finally:
            writer.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_many_held_connections_each_receive_every_event(tmp_path: Path) -> None:
    server = ServerProcess(
        env={
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
            "HEARTBEAT_SECONDS": "0.5",
        }
    )
    server.start()
    try:
        await server.wait_ready()
        assert server.process is not None
        before = rss_kib(server.process.pid)
        subscribers = [Subscriber() for _ in range(CONNECTIONS)]
        held = [asyncio.create_task(s.hold(server.port)) for s in subscribers]
        async with asyncio.timeout(30):
            await asyncio.gather(*(s.started.wait() for s in subscribers))
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            for n in range(EVENTS):
                response = await client.post("/agents/held/events", json=agent_event(n=n))
                assert response.status_code == 201, response.text
                await asyncio.sleep(0.1)
        async with asyncio.timeout(30):
            await asyncio.gather(*(s.received_all.wait() for s in subscribers))
        per_connection = (rss_kib(server.process.pid) - before) / CONNECTIONS
        await asyncio.sleep(1.5)  # idle: heartbeats every 0.5 s
        server.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await asyncio.gather(*held)
    finally:
        server.stop()
    for subscriber in subscribers:
        # Every event once, in order (the watchdog's "stalled" may follow the agent's own).
        assert subscriber.ids == list(range(1, len(subscriber.ids) + 1))
        assert len(subscriber.ids) >= EVENTS
        assert subscriber.heartbeats > 0
        assert subscriber.shutdowns == 1
    assert per_connection < 512
