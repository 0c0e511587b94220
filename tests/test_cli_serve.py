"""``python -m app serve --http-server uvicorn|granian``: the same contract under either server.

Each check runs the real command line (``HTTP_SERVER`` picks the server, as ``--http-server``
does): start-up log and health, resume by ``Last-Event-ID``, disconnected and stalled
subscribers released, refusals of large bodies and of SSE connections past the cap, the
shutdown frame on SIGTERM, and ``kill -9`` leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ROOT, ServerProcess, SseFrame, agent_event, alive, free_port, read_frames
from tests.test_cli import run_cli

SERVERS = ["uvicorn", "granian"]


@pytest.fixture(params=SERVERS)
def server_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "granian":
        pytest.importorskip("granian")
    return name


def children(pid: int) -> list[int]:
    found = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(line) for line in found.stdout.split()]


# The SQLite log's writer process is the service's child too; it does not serve HTTP.
WRITER = "app.backends.sqlite.process"


def http_workers(pid: int) -> list[int]:
    """The children of ``pid`` that serve requests."""
    found = []
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError):
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if WRITER not in command:
                found.append(child)
    return found


@contextlib.asynccontextmanager
async def serving(server_name: str, tmp_path: Path, **env: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
            "ARCHIVE_DIR": str(tmp_path / "archive"),
            "HEARTBEAT_SECONDS": "1",
            "TAIL_POLL_SECONDS": "0.2",
            "HTTP_SERVER": server_name,
            **env,
        }
    )
    server.start()
    try:
        await server.wait_ready()
        assert server.process is not None
        # Granian serves from worker processes under a supervisor; uvicorn, with one worker,
        # from the process itself.
        assert bool(http_workers(server.process.pid)) == (server_name == "granian")
        if server_name == "uvicorn":  # the log's writer, started with the log
            assert len(children(server.process.pid)) == 1
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def subscribers(client: httpx.AsyncClient) -> int:
    count: int = (await client.get("/health")).json()["subscribers"]
    return count


async def wait_for(check: Callable[[], Any], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {within} s")


async def test_start_up_is_logged_and_requests_are_logged_once_in_our_format(
    server_name: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        "SURREALDB_URL": "mem://",
        "ARCHIVE_DIR": str(tmp_path / "archive"),
    }
    process = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "app", "serve", "--http-server", server_name, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready = ServerProcess({}, port=port, process=process)
        await ready.wait_ready()
        async with httpx.AsyncClient(base_url=ready.base_url, timeout=10) as client:
            answer = await client.get("/health", headers={"x-request-id": "probe-1"})
        assert answer.status_code == 200
        assert answer.headers["x-request-id"] == "probe-1"
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    lines = stderr.decode().splitlines()
    assert f"http://127.0.0.1:{port}" in stderr.decode()
    probes = [line for line in lines if "probe-1" in line]
    # One request line, from app.access, with its request id; the server writes none itself.
    assert len(probes) == 1, probes
    assert " INFO app.access: GET /health 200 " in probes[0]
    assert stdout == b""
    assert "Traceback" not in stderr.decode()
    assert process.returncode in (0, -signal.SIGTERM)


async def test_a_stream_resumes_after_its_last_event_id_then_follows_the_log(
    server_name: str, tmp_path: Path
) -> None:
    async with (
        serving(server_name, tmp_path) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        batch = [{"source_id": f"s{n % 3}", **agent_event(n=n)} for n in range(30)]
        assert (await client.post("/agents/events", json={"events": batch})).status_code == 201
        seen: list[int] = []
        async with client.stream(
            "GET", "/events/stream", headers={"last-event-id": "10"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            async for frame in read_frames(response):
                if frame.id is None:
                    continue
                seen.append(int(frame.id))
                if seen[-1] == 30:
                    posted = await client.post("/agents/s0/events", json=agent_event(n=30))
                    assert posted.status_code == 201
                if seen[-1] == 31:
                    break
        assert seen == list(range(11, 32))


async def test_subscribers_that_leave_or_stop_reading_are_released(
    server_name: str, tmp_path: Path
) -> None:
    async with (
        # No heartbeat during the test: a closed peer is noticed by its disconnect, not by a
        # failed write.
        serving(
            server_name, tmp_path, SSE_WRITE_TIMEOUT_SECONDS="1", HEARTBEAT_SECONDS="30"
        ) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        # Peers that close their connection.
        leaving = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /events/stream HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await reader.readuntil(b"retry: ")).startswith(b"HTTP/1.1 200")
            leaving.append(writer)
        assert await subscribers(client) == 5
        for writer in leaving:
            writer.close()

        async def none_left() -> bool:
            return await subscribers(client) == 0

        await wait_for(none_left, 3, "closed connections released")

        # A peer that stays connected but reads nothing: its writes time out.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, b"GET /events/stream HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await loop.sock_recv(sock, 64)).startswith(b"HTTP/1.1 200")
            assert await subscribers(client) == 1
            batch = [{"source_id": "big", **agent_event(blob="x" * 50_000)} for _ in range(10)]
            started = time.monotonic()
            for _ in range(400):  # at most 200 MB, far more than any socket buffers
                answer = await client.post("/agents/events", json={"events": batch})
                assert answer.status_code == 201
                if await none_left():
                    break
            await wait_for(none_left, 10, "the stalled subscriber dropped")
            assert time.monotonic() - started < 30
        finally:
            sock.close()


async def test_large_bodies_and_streams_past_the_cap_are_refused(
    server_name: str, tmp_path: Path
) -> None:
    limit = 64 * 1024
    async with (
        serving(
            server_name, tmp_path, REQUEST_MAX_BODY_BYTES=str(limit), SSE_MAX_CONNECTIONS="2"
        ) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        body = b'{"event": "progress", "payload": {"agent_name": "t", "pad": "' + b"y" * limit
        body += b'"}}'

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 8192):
                yield body[start : start + 8192]

        headers = {"content-type": "application/json"}
        for content in (body, chunked()):
            answer = await client.post("/agents/a/events", content=content, headers=headers)
            assert answer.status_code == 413, answer.text
            assert "REQUEST_MAX_BODY_BYTES" in answer.json()["detail"]
        assert (await client.post("/agents/a/events", json=agent_event())).status_code == 201
        assert (await client.get("/events")).json()["head"] == 1

        async with contextlib.AsyncExitStack() as streams:
            for _ in range(2):
                opened = await streams.enter_async_context(
                    httpx.AsyncClient(base_url=server.base_url, timeout=30)
                )
                response = await streams.enter_async_context(opened.stream("GET", "/events/stream"))
                assert response.status_code == 200
            refused = await client.get("/events/stream")
            assert refused.status_code == 503
            assert refused.headers["retry-after"]


async def test_sigterm_ends_streams_with_the_shutdown_frame_at_once(
    server_name: str, tmp_path: Path
) -> None:
    server = ServerProcess(
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
            "HEARTBEAT_SECONDS": "30",  # nothing else would end a stream during the test
            "HTTP_SERVER": server_name,
        }
    )
    server.start()
    try:
        await server.wait_ready()
        assert server.process is not None
        workers = children(server.process.pid)
        frames: list[SseFrame] = []
        opened = asyncio.Event()

        async def follow() -> None:
            async with (
                httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
                client.stream("GET", "/events/stream") as response,
            ):
                async for frame in read_frames(response):
                    frames.append(frame)
                    opened.set()

        reader = asyncio.create_task(follow())
        await asyncio.wait_for(opened.wait(), 10)
        server.process.send_signal(signal.SIGTERM)  # the main process only, as a supervisor would
        signalled = time.monotonic()
        await asyncio.wait_for(reader, 10)
        ended = time.monotonic() - signalled
        code = await asyncio.to_thread(server.process.wait, 30)
        exited = time.monotonic() - signalled
    finally:
        server.kill()
    assert ended < 3.0, ended
    assert exited < 5.0 + 3.0, exited
    assert code in (0, -signal.SIGTERM)
    assert (frames[-1].event, frames[-1].id) == ("shutdown", None)
    assert frames[-1].retry is not None

    async def all_gone() -> bool:
        return not [pid for pid in workers if alive(pid)]

    # Every child, the log's writer included, is gone with the server.
    await wait_for(all_gone, 5, "every child gone with the server")


async def test_kill_9_leaves_no_process_serving(server_name: str, tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    server = ServerProcess({"DATABASE_URL": database, "HTTP_SERVER": server_name})
    server.start()
    try:
        await server.wait_ready()
        assert server.process is not None
        workers = children(server.process.pid)
    finally:
        await asyncio.to_thread(server.kill)

    async def all_gone() -> bool:
        return not [pid for pid in workers if alive(pid)]

    await wait_for(all_gone, 5, "every worker gone with the server")
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as client:
            await client.get("/health")


async def test_an_unknown_server_is_refused_naming_the_choice(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"}
    by_option, by_setting = await asyncio.gather(
        run_cli("serve", "--http-server", "gunicorn", "--port", "0", env=env),
        run_cli("serve", "--port", "0", env={**env, "HTTP_SERVER": "gunicorn"}),
    )
    assert by_option.code == 2
    assert "granian" in by_option.stderr
    assert by_setting.code == 2
    assert by_setting.stderr.startswith("error: ")
    assert "HTTP_SERVER" in by_setting.stderr
    assert "Traceback" not in by_option.stderr + by_setting.stderr


async def test_a_second_server_on_the_same_data_directory_is_refused_in_one_line(
    server_name: str, tmp_path: Path
) -> None:
    # The embedded defaults, under a data directory of the test's own.
    env = {
        "DATABASE_URL": "sqlite+aiosqlite:///./data/events.db",
        "SURREALDB_URL": "surrealkv://./data/content",
        "ARCHIVE_DIR": "./data/archive",
        "HTTP_SERVER": server_name,
        # Started in that directory, the command still runs this checkout's app.
        "PYTHONPATH": str(ROOT),
    }
    first = ServerProcess(env, cwd=tmp_path)
    first.start()
    try:
        await first.wait_ready()
        assert first.process is not None
        # Granian's worker opens the store; uvicorn's single process does.
        holder = (http_workers(first.process.pid) or [first.process.pid])[0]
        second = await run_cli("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
        async with httpx.AsyncClient(base_url=first.base_url, timeout=5) as client:
            still_serving = (await client.get("/health")).status_code
    finally:
        await asyncio.to_thread(first.stop)

    assert second.code == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"error: content store ./data/content is in use by another process (pid {holder}); "
        "stop it or set SURREALDB_URL to another path"
    ]
    assert second.stdout == ""
    assert still_serving == 200
