"""Idle sockets cannot exhaust the server: a connection that does not send a whole request head
in time is closed, an idle keep-alive connection is closed, and at the connection ceiling the
longest-waiting idle connection makes room, so ``/health`` answers while an attacker holds the
maximum; with every connection being answered, a new one gets 503."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, ServerProcess, make_settings, running_server

pytestmark = pytest.mark.timeout(120)


async def connect(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base_url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection within ``seconds`` (whatever it sends first)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/health"
) -> bytes:
    """One GET on a raw keep-alive connection: the response's head and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def metric(client: httpx.AsyncClient, line: str) -> int:
    text = (await client.get("/metrics")).text
    for row in text.splitlines():
        if row.startswith(line + " "):
            return int(float(row.rsplit(" ", 1)[1]))
    raise AssertionError(f"no {line} in /metrics")


@contextlib.asynccontextmanager
async def server_with(tmp_path: Path, **env: str) -> AsyncIterator[str]:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", **env)
    async with running_server(settings) as server:
        yield server.base_url


async def test_a_connection_without_a_whole_request_head_is_closed_in_time(
    tmp_path: Path,
) -> None:
    async with server_with(tmp_path, REQUEST_HEADER_TIMEOUT_SECONDS="0.5") as base_url:
        silent = [await connect(base_url) for _ in range(10)]
        partial = [await connect(base_url) for _ in range(5)]
        for _, writer in partial:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: unfinished
            await writer.drain()
        started = time.monotonic()
        closed = await asyncio.gather(
            *(closed_within(reader, 10) for reader, _ in silent + partial)
        )
        assert all(closed)
        assert time.monotonic() - started < 5
        # A client that sends its request is answered as ever, and a slow one in time too.
        reader, writer = await connect(base_url)
        writer.write(b"GET /health HTTP/1.1\r\n")
        await asyncio.sleep(0.2)
        writer.write(b"Host: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        async with httpx.AsyncClient(base_url=base_url) as client:
            closed_count = await metric(
                client, 'activity_http_connections_closed_total{reason="header_timeout"}'
            )
        assert closed_count == 15
        for _, writer in silent + partial:
            writer.close()


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async with server_with(
        tmp_path, KEEPALIVE_TIMEOUT_SECONDS="0.5", REQUEST_HEADER_TIMEOUT_SECONDS="30"
    ) as base_url:
        reader, writer = await connect(base_url)
        for _ in range(2):  # kept alive between requests in quick succession
            assert (await request(reader, writer)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.1)
        assert await closed_within(reader, 5)
        writer.close()


async def test_at_the_ceiling_the_longest_idle_connection_makes_room_for_health(
    tmp_path: Path,
) -> None:
    async with server_with(
        tmp_path, MAX_CONNECTIONS="40", REQUEST_HEADER_TIMEOUT_SECONDS="60"
    ) as base_url:
        held = []
        for _ in range(40):  # an attacker holds the maximum, sending nothing
            held.append(await connect(base_url))
            await asyncio.sleep(0.005)
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            for _ in range(3):
                assert (await client.get("/health")).status_code == 200
            evicted = await metric(
                client, 'activity_http_connections_closed_total{reason="evicted"}'
            )
        # The oldest of the attacker's connections went, one for each new connection.
        assert evicted >= 1
        closed = [await closed_within(reader, 0.2) for reader, _ in held]
        assert closed[:evicted] == [True] * evicted
        assert not any(closed[evicted + 1 :])
        for _, writer in held:
            writer.close()


async def test_at_the_ceiling_with_every_connection_answered_a_new_one_gets_503(
    tmp_path: Path,
) -> None:
    async with server_with(tmp_path, MAX_CONNECTIONS="20") as base_url:
        streams = []
        for _ in range(20):
            reader, writer = await connect(base_url)
            writer.write(b"GET /events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            streams.append((reader, writer))
        reader, writer = await connect(base_url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in answer.lower()
        assert b"MAX_CONNECTIONS" in answer
        writer.close()
        # One stream ends: a request gets in again.
        streams.pop()[1].close()
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            for _ in range(50):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("/health never answered after a stream ended")
        for _, writer in streams:
            writer.close()


@pytest.mark.slow
async def test_serve_holds_its_bounds_against_many_idle_sockets(tmp_path: Path) -> None:
    server = ServerProcess(
        env={
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
            "MAX_CONNECTIONS": "300",
            "REQUEST_HEADER_TIMEOUT_SECONDS": "2",
        }
    )
    server.start()
    try:
        await server.wait_ready()
        held = [await connect(server.base_url) for _ in range(600)]  # twice the ceiling
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            assert (await client.get("/health")).status_code == 200
        closed = await asyncio.gather(*(closed_within(reader, 10) for reader, _ in held))
        assert all(closed)
        for _, writer in held:
            writer.close()
    finally:
        server.stop()


def test_serve_refuses_a_ceiling_the_descriptor_limit_cannot_hold(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "0"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
            "SURREALDB_URL": "mem://",
            "MAX_CONNECTIONS": str(10**9),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "MAX_CONNECTIONS is 1000000000" in lines[0]
    assert "ulimit -n" in lines[0]
