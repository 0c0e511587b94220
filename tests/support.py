"""Shared helpers for tests: real servers (in-process and as subprocesses) and SSE reading."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
import uvicorn
from sqlalchemy import MetaData

from app.asgi import create_app
from app.audit.history import read_chained
from app.audit.verify import Verified, verify_history
from app.config import DatabaseSettings, Settings, load_settings
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.projections.agents import AGENT_STREAM
from app.runtime.services import Services
from app.server.connections import uvicorn_options

__all__ = [
    "InProcessServer",
    "ServerProcess",
    "SseFrame",
    "agent_event",
    "alive",
    "busy_log",
    "free_port",
    "make_settings",
    "new_agent_event",
    "open_store",
    "read_frames",
    "running_server",
    "sqlite_settings",
]

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose here.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ", 1)[1][0] != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sqlite_settings(path: Path, appender: str = "process", **fields: Any) -> DatabaseSettings:
    """A SQLite log's settings, its file ``events.db`` in ``path``, written by ``appender``
    (``process`` or ``thread``)."""
    url = f"sqlite+aiosqlite:///{path / 'events.db'}"
    return DatabaseSettings(url=url, sqlite_appender=appender, **fields)


@contextlib.asynccontextmanager
async def open_store(
    settings: DatabaseSettings | str,
    *,
    tables: MetaData | None = None,
    poll_seconds: float = 0.2,
    feed_capacity: int = 50_000,
    pool_size: int = 10,
) -> AsyncIterator[EventStore]:
    """The way a test gets an event store: on a migrated database of its own engine (as a
    separate service process would have), ``tables`` created beside the log's."""
    if isinstance(settings, str):
        settings = DatabaseSettings(url=settings)
    await upgrade_database(settings.url)
    engine = create_engine(settings.url, pool_size=pool_size)
    try:
        if tables is not None:
            async with engine.begin() as connection:
                await connection.run_sync(tables.create_all)
        store = await EventStore.open(
            engine, settings, poll_seconds=poll_seconds, feed_capacity=feed_capacity
        )
        try:
            yield store
        finally:
            await store.close()
    finally:
        await engine.dispose()


async def verified_chain(url: str) -> int:
    """The whole log at ``url`` with its chain recomputed, asserted unbroken from the first
    position to the head; the number of events."""
    engine = create_engine(url, pool_size=1)
    try:
        rows = await read_chained(engine, 0, 100_000)
    finally:
        await engine.dispose()
    found = verify_history(rows)
    assert isinstance(found, Verified), found
    assert found.verified == len(rows) == rows[-1].event.position
    return found.verified


def make_settings(database_url: str, **env: str) -> Settings:
    """Settings for a test: the given database, fast heartbeats and polls, plus ``env``."""
    values = {
        "DATABASE_URL": database_url,
        "HEARTBEAT_SECONDS": "1",
        "TAIL_POLL_SECONDS": "0.2",
        "SURREALDB_URL": "mem://",
        "ARCHIVE_DIR": tempfile.mkdtemp(prefix="activity-archive-"),
        **env,
    }
    return load_settings(values)


def agent_event(
    event: str = "progress", agent_name: str = "tagger", **payload: Any
) -> dict[str, Any]:
    return {"event": event, "payload": {"agent_name": agent_name, **payload}}


def new_agent_event(source_id: str, message: str) -> NewEvent:
    payload = canonical_payload({"agent_name": "a", "message": message})
    return NewEvent(stream=AGENT_STREAM, source_id=source_id, event="progress", payload=payload)


@contextlib.asynccontextmanager
async def busy_log(store: EventStore, producers: int = 8) -> AsyncIterator[list[int]]:
    """Producers append 200 events at a time back to back while the block runs, so that the
    log's writer is never idle; yields the list the events they appended are counted into."""
    stop = asyncio.Event()
    appended: list[int] = []

    async def produce(producer: int) -> None:
        while not stop.is_set():
            batch = [new_agent_event(f"busy-{producer}-{n % 10}", "busy") for n in range(200)]
            appended.append(len(await store.append(batch)))

    tasks = [asyncio.create_task(produce(n)) for n in range(producers)]
    try:
        yield appended
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@dataclass
class InProcessServer:
    """A real uvicorn server on a loopback socket, in the test's event loop."""

    base_url: str
    server: uvicorn.Server
    app: Any

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services


@contextlib.asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[InProcessServer]:
    app = create_app(settings)
    # IPPROTO_TCP given explicitly: with protocol 0 asyncio does not set TCP_NODELAY on
    # accepted connections, and every keep-alive request waits ~40 ms on Nagle.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The connection bounds `serve` gives uvicorn (app/server/connections.py).
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=1,
        ws="none",
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start within 30 s")
            await asyncio.sleep(0.01)
        yield InProcessServer(base_url=f"http://127.0.0.1:{port}", server=server, app=app)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


@dataclass
class ServerProcess:
    """``python -m app serve`` as a child process (for kill -9 and restart tests).

    Its stderr goes to a file (:meth:`stderr`), not a pipe: a server that logs more than a
    pipe holds while nobody reads it would block on its next line.
    """

    env: Mapping[str, str]
    port: int = field(default_factory=free_port)
    cwd: Path = ROOT
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stderr(self) -> str:
        """What the server has written to stderr so far."""
        return self.log.read_text(errors="replace") if self.log is not None else ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # The embedded defaults would put content under the repository's ./data/.
        defaults = {
            "SURREALDB_URL": "mem://",
            "ARCHIVE_DIR": tempfile.mkdtemp(prefix="activity-archive-"),
        }
        env = {**os.environ, **defaults, **self.env}
        fd, name = tempfile.mkstemp(prefix="activity-serve-", suffix=".log")
        self.log = Path(name)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=self.cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=fd,
        )
        os.close(fd)

    async def wait_ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode}: {self.stderr()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise TimeoutError(f"server on port {self.port} not ready in {within} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._forget_log()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._forget_log()

    def _forget_log(self) -> None:
        if self.log is not None:
            self.log.unlink(missing_ok=True)
            self.log = None


class SseFrame(msgspec.Struct):
    event: str | None
    data: str
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return msgspec.json.decode(self.data)


async def read_frames(response: httpx.Response) -> AsyncIterator[SseFrame]:
    """Parse an SSE body strictly (what a browser would see), frame by frame."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            fields: dict[str, list[str]] = {}
            for line in raw.decode().split("\n"):
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
            yield SseFrame(
                event=fields.get("event", [None])[0],
                data="\n".join(fields.get("data", [])),
                id=fields.get("id", [None])[0],
                retry=int(fields["retry"][0]) if "retry" in fields else None,
            )


class LocalSite:
    """A small HTTP server on 127.0.0.1 in a thread, standing in for the web at its edge.

    ``routes`` maps a path to (status, content type, body); ``delays`` holds seconds to wait
    before answering a path (a slow site, to catch an ingest mid-step); ``troubles`` holds,
    per path, what its next requests meet, one entry each: ``"hang up"`` closes the connection
    unanswered (a network error to the client), a number of seconds stalls that request alone.
    Works for servers in other processes too, since it listens on a real socket.
    """

    def __init__(self, routes: dict[str, tuple[int, str, bytes]] | None = None) -> None:
        import http.server
        import threading

        self.routes: dict[str, tuple[int, str, bytes]] = dict(routes or {})
        self.delays: dict[str, float] = {}
        self.troubles: dict[str, list[Literal["hang up"] | float]] = {}
        self.hits: dict[str, int] = {}
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                site.hits[path] = site.hits.get(path, 0) + 1
                troubles = site.troubles.get(path)
                trouble = troubles.pop(0) if troubles else 0.0
                if isinstance(trouble, str):  # "hang up"
                    self.close_connection = True
                    return
                delay = site.delays.get(path, 0.0) + trouble
                if delay:
                    time.sleep(delay)
                status, content_type, body = site.routes.get(
                    path, (404, "text/plain", b"not found")
                )
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client (a killed server, say) went away: nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LocalSite:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


async def eventually(
    predicate: Callable[[], bool], within: float = 10.0, step: float = 0.05
) -> bool:
    """Poll ``predicate`` until it holds or ``within`` seconds pass; returns its last value."""
    for _ in range(max(1, int(within / step))):
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()
