"""A subscriber that stops reading does not make the server's memory grow with what is
appended meanwhile: its stream waits on the socket holding one page and one write at most,
while ~200 MB of events go into the log and to a reader that keeps up. (The write timeout is
set far beyond the test, so the stalled stream stays open the whole time: only the bound is
under test; the drop after the timeout is tested in tests/api/test_sse.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, agent_event, read_frames

BLOB = "x" * 50_000
BATCH = [{"source_id": "big", **agent_event("progress", blob=BLOB)} for _ in range(10)]
WARM_UP = 200  # 100 MB: the window of newest events fills to its cap
SETTLE = 20
POSTS = 400  # 200 MB while the reader is stalled
MAX_GROWTH = 48 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def metric(client: httpx.AsyncClient, name: str) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def post_batches(client: httpx.AsyncClient, count: int) -> int:
    last = 0
    for _ in range(count):
        response = await client.post("/agents/events", json={"events": BATCH})
        assert response.status_code == 201, response.text
        last = response.json()["positions"][-1]
    return last


@pytest.mark.slow
async def test_a_stalled_reader_holds_memory_bounded_while_appends_continue(
    tmp_path: Path,
) -> None:
    server = ServerProcess(
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
            "SSE_WRITE_TIMEOUT_SECONDS": "600",
            "HEARTBEAT_SECONDS": "1",
        }
    )
    server.start()
    stalled: socket.socket | None = None
    try:
        await server.wait_ready()
        assert server.process is not None
        pid = server.process.pid
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            received: list[int] = []

            async def keep_up() -> None:
                async with client.stream("GET", "/events/stream") as response:
                    async for frame in read_frames(response):
                        if frame.id is not None:
                            received.append(int(frame.id))

            reader = asyncio.create_task(keep_up())
            try:
                # The steady state first: the same load with a reader that keeps up.
                await post_batches(client, WARM_UP)
                stalled = socket.create_connection(("127.0.0.1", server.port))
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.sendall(
                    b"GET /events/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0\r\n\r\n"
                )
                await post_batches(client, SETTLE)
                assert await metric(client, "activity_sse_connections") == 2
                before = peak = rss_bytes(pid)
                for _ in range(POSTS // 20):
                    last = await post_batches(client, 20)
                    peak = max(peak, rss_bytes(pid))
                for _ in range(600):
                    if received and received[-1] >= last:
                        break
                    await asyncio.sleep(0.05)
                # The stalled stream is still open and far behind; the other got everything.
                assert await metric(client, "activity_sse_connections") == 2
                assert await metric(client, "activity_log_subscriber_lag_max") > last / 2
                assert received == list(range(received[0], last + 1))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await reader
    finally:
        if stalled is not None:
            stalled.close()
        server.stop()
    appended = POSTS * len(BATCH) * len(BLOB)
    growth = peak - before
    assert growth < MAX_GROWTH, (
        f"RSS grew {growth / 2**20:.0f} MiB (from {before / 2**20:.0f} MiB) "
        f"while {appended / 2**20:.0f} MiB were appended past a stalled reader"
    )
