"""What the chunk writer (app/server/chunks.py) relies on in uvicorn beyond the ASGI interface,
checked on a real uvicorn server with the service's protocol. If one of these fails after an
upgrade of uvicorn, the SSE fan-out writes wrong bytes or ignores a full buffer: run with
``SSE_FANOUT=0`` until app/server/chunks.py is mended."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn

from app.server import CONNECTION_EXTENSION
from app.server.chunks import ChunkWriter, chunked
from app.server.connections import ConnectionGuard, GuardedHttpToolsProtocol

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """``handler`` as the application of a uvicorn server with the service's protocol; its
    port."""

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await handler(scope, receive, send)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    guard = ConnectionGuard(100, 10.0)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        ws="none",
        http=functools.partial(GuardedHttpToolsProtocol, guard=guard),  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert not task.done(), "the server exited during start-up"
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def writer_of(scope: dict[str, Any]) -> ChunkWriter | None:
    chunks = scope["extensions"][CONNECTION_EXTENSION]["chunks"]
    found: ChunkWriter | None = chunks(scope)
    return found


START = {"type": "http.response.start", "status": 200, "headers": [(b"x-test", b"1")]}


async def request(port: int, method: str = "GET", path: str = "/") -> bytes:
    """The whole raw response (the server closes the connection after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode())
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    return raw


async def test_a_chunk_written_straight_is_exactly_what_send_writes() -> None:
    async def handler(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        direct = scope["path"] == "/direct"
        assert writer_of(scope) is None, "a writer before the response started"
        await send(START)
        writer = writer_of(scope)
        assert writer is not None
        for body in (b"one", b"id: 2\ndata: {}\n\n", b"x" * 70_000):
            if direct:
                assert writer.write(chunked(body))
            else:
                await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        assert not writer.write(chunked(b"late")), "wrote after the response completed"

    async with serving(handler) as port:
        direct, sent = await request(port, path="/direct"), await request(port, path="/sent")
    head, _, body = direct.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.startswith(b"3\r\none\r\n")
    assert body.endswith(b"\r\n0\r\n\r\n")
    assert b"late" not in body
    assert body == sent.partition(b"\r\n\r\n")[2]


async def test_no_writer_for_a_head_request_or_a_response_with_a_length() -> None:
    found: list[ChunkWriter | None] = []

    async def handler(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["path"] == "/sized":
            await send({**START, "headers": [(b"content-length", b"2")]})
            found.append(writer_of(scope))
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send(START)
        found.append(writer_of(scope))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(handler) as port:
        await request(port, method="HEAD")
        await request(port, path="/sized")
    assert found == [None, None]


async def test_a_writer_refuses_while_send_would_wait_for_the_peer_and_after_it_left() -> None:
    """Over the transport's high-water mark, ``send`` waits for the peer to read: the writer
    refuses then, and writes again once the peer has read; after a disconnect it refuses."""
    outcome: dict[str, Any] = {}
    filled = asyncio.Event()
    drained = asyncio.Event()
    finished = asyncio.Event()

    async def handler(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await send(START)
        writer = writer_of(scope)
        assert writer is not None
        piece = chunked(b"y" * 65_536)
        written = 0
        while writer.write(piece):
            written += 1
            assert written < 10_000, "the writer never refused: the peer reads nothing"
        outcome["written"] = written
        try:
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": b"z", "more_body": True}), 0.5
            )
            outcome["send_waited"] = False
        except TimeoutError:
            outcome["send_waited"] = True
        filled.set()
        await drained.wait()
        # The peer has read everything: the buffer is below the mark again.
        deadline = time.monotonic() + 10
        while not writer.write(chunked(b"after")):
            assert time.monotonic() < deadline, "the writer never wrote again"
            await asyncio.sleep(0.01)
        outcome["wrote_again"] = True
        message = await receive()
        while message["type"] == "http.request":  # the request's (empty) body
            message = await receive()
        outcome["disconnect"] = message["type"]
        outcome["after_disconnect"] = writer.write(chunked(b"gone"))
        finished.set()

    async with serving(handler) as port:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        async with asyncio.timeout(20):
            await filled.wait()
            received = b""
            while b"after\r\n" not in received:
                drained.set()
                received += await loop.sock_recv(sock, 1 << 20)
        sock.close()
        async with asyncio.timeout(10):
            await finished.wait()
    assert outcome["written"] >= 1
    assert outcome["send_waited"], "send did not wait where the writer refused"
    assert outcome["wrote_again"]
    assert outcome["disconnect"] == "http.disconnect"
    assert outcome["after_disconnect"] is False
    # Every piece arrived whole and in order, then the later chunk (the send that waited
    # was given up, and wrote nothing).
    body = received.partition(b"\r\n\r\n")[2]
    assert body == chunked(b"y" * 65_536) * outcome["written"] + chunked(b"after")
