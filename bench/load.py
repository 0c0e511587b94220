"""Load-client helpers that speak only the contract, so they drive any server alike."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import AsyncExitStack
from itertools import pairwise
from pathlib import Path

import httpx
import msgspec

from bench.peers.trivial import render_frames

__all__ = [
    "SseIdScanner",
    "client_ceiling",
    "free_port",
    "post_events",
    "post_events_raw",
    "raise_open_files",
    "read_response",
    "read_your_writes",
    "sse_replay",
    "start_server",
    "stop_server",
    "wait_projected",
    "wait_ready",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = 100
_TIMEOUT = httpx.Timeout(30.0)
_JSON_HEADERS = {"content-type": "application/json"}
_ID_LINE = re.compile(rb"^id:[ ]?(\d+)\r?$", re.MULTILINE)


def _payload(n: int) -> dict[str, object]:
    return {"agent_name": "bench", "status": "running", "message": f"step {n}", "progress": 0.5}


def _build_requests(base_url: str, total: int, batch: int | None) -> deque[httpx.Request]:
    prefix = f"bench-{os.urandom(4).hex()}"
    bodies: list[tuple[str, bytes]] = []
    if batch is None:
        for n in range(total):
            body = msgspec.json.encode({"event": "progress", "payload": _payload(n)})
            bodies.append((f"/agents/{prefix}-{n % SOURCES}/events", body))
    else:
        for first in range(0, total, batch):
            events = [
                {
                    "source_id": f"{prefix}-{n % SOURCES}",
                    "event": "progress",
                    "payload": _payload(n),
                }
                for n in range(first, min(first + batch, total))
            ]
            bodies.append(("/agents/events", msgspec.json.encode({"events": events})))
    return deque(
        httpx.Request("POST", f"{base_url}{path}", content=body, headers=_JSON_HEADERS)
        for path, body in bodies
    )


async def _post_until_empty(client: httpx.AsyncClient, requests: deque[httpx.Request]) -> None:
    while requests:
        request = requests.popleft()
        response = await client.send(request)
        if response.status_code != 201:
            raise RuntimeError(
                f"POST {request.url} -> {response.status_code}: {response.text[:200]}"
            )


async def post_events(base_url: str, clients: int, total: int, batch: int | None) -> float:
    """Post ``total`` agent events from ``clients`` concurrent workers; return events/s.

    ``batch=None`` posts one event per ``POST /agents/{source_id}/events``; otherwise
    ``POST /agents/events`` carries ``batch`` events each. Requests are built before timing:
    httpx spends a sizeable share of each request on URL and header handling.

    Each worker owns a one-connection client: a shared client funnels every request
    through one httpcore pool, whose lock and connection scan cost grows with the worker
    count (32 workers against the trivial peer: about 400 requests/s shared, 1,600 apart).
    """
    requests = _build_requests(base_url, total, batch)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with AsyncExitStack() as stack:
        pool = [
            await stack.enter_async_context(httpx.AsyncClient(timeout=_TIMEOUT, limits=limits))
            for _ in range(clients)
        ]
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for client in pool:
                group.create_task(_post_until_empty(client, requests))
        elapsed = time.perf_counter() - started
    return total / elapsed


async def read_your_writes(base_url: str, stop: asyncio.Event) -> tuple[list[float], int]:
    """Until ``stop``: post one event to a source of its own, then read that source's
    activity (``GET /agents/{source_id}``, which waits up to 2 s for the projection to
    reach the log's head) and check that it shows the event. Returns each read's seconds
    and how many answered without the event (stale). A client watching its own work."""
    waits: list[float] = []
    stale = 0
    prefix = f"ryw-{os.urandom(4).hex()}"
    async with httpx.AsyncClient(base_url=base_url, timeout=_TIMEOUT) as client:
        attempt = 0
        while not stop.is_set():
            attempt += 1
            source_id, message = f"{prefix}-{attempt % 5}", f"write {attempt}"
            posted = await client.post(
                f"/agents/{source_id}/events",
                json={"event": "progress", "payload": {"agent_name": "probe", "message": message}},
            )
            if posted.status_code != 201:
                raise RuntimeError(f"POST -> {posted.status_code}: {posted.text[:200]}")
            started = time.perf_counter()
            read = await client.get(f"/agents/{source_id}")
            waits.append(time.perf_counter() - started)
            if read.status_code != 200 or read.json().get("message") != message:
                stale += 1
            await asyncio.sleep(0.02)
    return waits, stale


def _raw_request(host: str, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length body off ``reader``; its status line."""
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _raw_worker(host: str, port: int, requests: deque[bytes]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while requests:
            writer.write(requests.popleft())
            status = await read_response(reader)
            if b" 201 " not in status:
                raise RuntimeError(f"POST answered {status!r}")
    finally:
        writer.close()


async def post_events_raw(base_url: str, clients: int, total: int, batch: int | None) -> float:
    """As :func:`post_events`, over plain keep-alive sockets: httpx tops out near 2,000
    requests/s on this machine, below what either server can answer."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    built = _build_requests(base_url, total, batch)
    requests = deque(
        _raw_request(f"{host}:{port}", r.url.raw_path.decode(), r.content) for r in built
    )
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(_raw_worker(host, port, requests))
    return total / (time.perf_counter() - started)


class SseIdScanner:
    """Counts SSE event ids in raw bytes and checks their order, without decoding frames.

    Only complete frames (up to the last blank line) are scanned; the rest waits for the
    next chunk. LF and CRLF line endings are both accepted.
    """

    def __init__(self, last_event_id: int = 0, *, contiguous: bool = True) -> None:
        self.last_id = last_event_id
        self.count = 0
        self.contiguous = contiguous
        self._pending = b""

    def feed(self, chunk: bytes) -> int:
        buffer = self._pending + chunk
        lf = buffer.rfind(b"\n\n")
        crlf = buffer.rfind(b"\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        self._pending = buffer[end:]
        if end == 0:
            return 0
        ids = [int(found) for found in _ID_LINE.findall(buffer, 0, end)]
        if not ids:
            return 0
        if self.contiguous:
            if ids != list(range(self.last_id + 1, self.last_id + 1 + len(ids))):
                raise AssertionError(f"ids after {self.last_id} not contiguous: {ids[:5]}...")
        elif ids[0] <= self.last_id or any(a >= b for a, b in pairwise(ids)):
            raise AssertionError(f"ids after {self.last_id} not increasing: {ids[:5]}...")
        self.last_id = ids[-1]
        self.count += len(ids)
        return len(ids)


async def sse_replay(
    base_url: str, path: str, expected: int, last_event_id: int = 0, *, contiguous: bool = True
) -> float:
    """Read ``expected`` events with ids from the SSE stream at ``path``; return events/s.

    The stream is resumed with ``Last-Event-ID: last_event_id``; ids must then run
    ``last_event_id + 1, + 2, ...`` with no gap or repeat (only increasing when
    ``contiguous`` is false, for filtered streams). The clock includes connecting.
    """
    scanner = SseIdScanner(last_event_id, contiguous=contiguous)
    headers = {"accept": "text/event-stream", "last-event-id": str(last_event_id)}
    limit_s = 30.0 + expected / 1000
    async with httpx.AsyncClient(base_url=base_url, timeout=_TIMEOUT) as client:
        started = time.perf_counter()
        async with asyncio.timeout(limit_s), client.stream("GET", path, headers=headers) as stream:
            if stream.status_code != 200:
                await stream.aread()
                raise RuntimeError(f"GET {path} -> {stream.status_code}: {stream.text[:200]}")
            async for chunk in stream.aiter_raw():
                scanner.feed(chunk)
                if scanner.count >= expected:
                    break
        elapsed = time.perf_counter() - started
    if scanner.count < expected:
        raise RuntimeError(f"stream ended after {scanner.count} of {expected} events")
    return expected / elapsed


def _parse_rate(frames: int, chunk_size: int = 65536) -> float:
    stream = render_frames(1, frames)
    chunks = [stream[offset : offset + chunk_size] for offset in range(0, len(stream), chunk_size)]
    scanner = SseIdScanner(0)
    started = time.perf_counter()
    for chunk in chunks:
        scanner.feed(chunk)
    elapsed = time.perf_counter() - started
    if scanner.count != frames:
        raise RuntimeError(f"parser saw {scanner.count} of {frames} frames")
    return frames / elapsed


async def client_ceiling(
    clients: int = 32, total: int = 10_000, batch: int = 100, frames: int = 100_000
) -> dict[str, float]:
    """The load client's own limits, in events/s, against a server that does no work.

    ``sse_parse``: the id scanner over in-memory frames; ``sse_http``: ``sse_replay`` of
    ``frames`` pre-shaped frames from the trivial peer; ``post_single`` / ``post_batch``:
    ``post_events`` against the trivial peer's immediate 201. The peer runs in its own
    process so it does not share this event loop.
    """
    figures = {"sse_parse": _parse_rate(frames)}
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = start_server([sys.executable, "-m", "bench.peers.trivial"], port)
    try:
        await asyncio.to_thread(wait_ready, base_url, 15.0, process)
        figures["sse_http"] = await sse_replay(base_url, f"/events/stream?n={frames}", frames)
        figures["post_single"] = await post_events(base_url, clients, total, None)
        figures["post_batch"] = await post_events(base_url, clients, total * 10, batch)
        figures["post_single_raw"] = await post_events_raw(base_url, clients, total * 3, None)
    finally:
        stop_server(process)
    return figures


def raise_open_files(wanted: int) -> int:
    """Raise this process's open-file limit to ``wanted`` (or as far as the hard limit
    allows); returns the limit now in force. Servers started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    cmd: list[str], port: int, env: dict[str, str] | None = None, *, cwd: Path = REPO_ROOT
) -> subprocess.Popen[bytes]:
    """Start ``cmd --port <port>`` in its own process group; ``env`` adds to os.environ."""
    return subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_ready(
    base_url: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``GET /health`` until it answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before ready")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url}/health not ready after {timeout}s")


def wait_projected(base_url: str, timeout: float = 600.0) -> None:
    """Wait until the service's projections have folded the whole log (``GET /health``): so
    that a figure measured on a pre-filled log is not sharing the server with that fold, and
    to time a run until its events are projected. Polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checks = httpx.get(f"{base_url}/health", timeout=10.0).json()
        head = checks.get("database", {}).get("head")
        points = [entry.get("checkpoint") for entry in checks.get("projections", {}).values()]
        if head is not None and points and all(point >= head for point in points):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{base_url}: the projections did not reach the head in {timeout}s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it has not exited in 10 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        process.wait(10)


if __name__ == "__main__":
    for name, rate in asyncio.run(client_ceiling()).items():
        print(f"{name:>12}: {rate:,.0f} events/s")
