"""Cost growth with the log's size: does the service stay as fast on 10 million events as on
ten thousand?

    python -m bench.growth                  # 10k, 1M and 10M events, 3 rounds
    python -m bench.growth --quick          # 10k, 100k and 1M events, 2 rounds
    python -m bench.growth --data-dir DIR   # keep the filled logs in DIR for the next run

Each size gets a SQLite log filled in bulk with rows exactly as the store writes them (raw
sqlite3 inserts into the migrated schema): 1,000 agent activities whose versions grow with the
log, each a run of ``started``, ``progress`` … ``complete``, and one position in a hundred for a
video ingest's whole life. Every activity and ingest ends finished, so the service starts no job
and its stalled-agent watchdog has nothing to mark.

Each round rebuilds every projection of each log from position 0 (timed in this process:
events/s), then starts ``python -m app serve`` on every log (startup: until ``/health`` answers
200) and takes each measurement on all of them in turn, request by request (A B C A B C …), so
the machine's noise falls on every size alike. One request at a time over a keep-alive
connection: ``GET /events`` pages after a random position, unfiltered, for one source and for
the rare ``ingest`` stream; opening ``GET /events/stream`` with a random ``Last-Event-ID``
until 100 events have arrived; single appends to ``POST /agents/{source_id}/events``, half to
existing sources with high versions, half to new ones (each answer checked against the
versions the log holds); and two reads that look one source up within a stream:
``GET /ingests/{id}/events``, and opening ``/agents/stream?source_id=`` for a new activity
until its first event.

Latencies should stay flat (b-tree depth only): a ratio well above 1 against the smallest log
points at a scan. After a fill, the query plans of the log's reads are checked and any that
scans is named on stderr. A rebuild slower than :data:`REBUILD_BUDGET_S` is measured in the
first round only (it is needed there anyway: the service must start with its projections
caught up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy.dialects import sqlite as sqlite_dialect

from app.database import create_engine, upgrade_database
from app.eventlog.filters import EventFilter
from app.eventlog.store import page_query
from app.events.envelope import format_timestamp, new_event_ids
from app.projections import ProjectionRunner, all_projections
from bench.load import SseIdScanner, free_port, start_server, stop_server
from bench.report import Figure, quantile, render

__all__ = ["fill_log", "log_label", "main", "run"]

SIZES = (10_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 100_000, 1_000_000)
#: Agent activities in the log: each source's version grows as the log does.
SOURCES = 1000
AGENTS = ("tagger", "summarizer", "transcriber", "classifier")
#: Events in one agent run: ``started``, progress steps, ``complete``.
RUN_LENGTH = 20
#: One position in this many belongs to an ingest.
INGEST_EVERY = 100
VIDEO_STEPS = (
    ("extracting_id", "Extracting video ID..."),
    ("extracted_id", "Video ID: {video}"),
    ("checking_cache", "Checking if already processed..."),
    ("fetching_transcript", "Fetching transcript..."),
    ("transcript_fetched", "Transcript fetched"),
    ("archiving", "Archiving transcript..."),
    ("archived", "Transcript archived"),
    ("storing", "Storing in database..."),
    ("stored", "Stored in database"),
)
#: ``requested``, ``started``, the steps, ``complete``.
INGEST_LENGTH = len(VIDEO_STEPS) + 3
#: Rows that share one timestamp (one group commit) and how far apart such groups are.
COMMIT_ROWS = 100
COMMIT_MS = 10

APPENDS = 300
READS = 300
SSE_OPENS = 100
SSE_EVENTS = 100
PAGE = 100
#: A page of one source's events: about what each source holds on the 10k log.
SOURCE_PAGE = 10
#: Reads that grow with the log: at most this many, within this many seconds.
SCAN_READS = 30
SCAN_BUDGET_S = 90.0
WARMUP = 20
#: A keep-alive connection idle for longer than this is replaced before the next request.
IDLE_REOPEN_S = 2.0
#: A rebuild slower than this is measured in the first round only.
REBUILD_BUDGET_S = 180.0
STARTUP_TIMEOUT_S = 600.0

_INSERT = (
    "INSERT INTO events (position, stream, source_id, version, event, event_id, timestamp,"
    " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_encode = msgspec.json.Encoder().encode
Row = tuple[int, str, str, int, str, str, str, str]


def log_label(count: int) -> str:
    """``10k events``, ``1M events``: the contender name of a log size."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if count >= size and count % size == 0:
            return f"{count // size:,}{unit} events"
    return f"{count:,} events"


# -- the log ---------------------------------------------------------------------------------


class LogShape:
    """Where each position of a log of ``count`` events goes, in closed form, so that the log
    can be filled chunk by chunk and the bench knows every source's version afterwards."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.ingests = (count // INGEST_EVERY) // INGEST_LENGTH
        self.ingest_slots = self.ingests * INGEST_LENGTH
        self.agent_events = count - self.ingest_slots
        #: (agent, run, step, last) -> event name and payload: a few thousand distinct ones.
        self.payloads: dict[tuple[int, int, int, bool], tuple[str, str]] = {}

    def agent_index(self, position: int) -> int | None:
        """The position's number among agent events, or None for an ingest's event."""
        if position % INGEST_EVERY == 0 and position // INGEST_EVERY <= self.ingest_slots:
            return None
        return position - 1 - min((position - 1) // INGEST_EVERY, self.ingest_slots)

    def versions(self) -> dict[str, int]:
        """Every agent source's version once the log is filled."""
        return {
            agent_source(source): len(range(source, self.agent_events, SOURCES))
            for source in range(min(SOURCES, self.agent_events))
        }


def agent_source(source: int) -> str:
    return f"{AGENTS[source % len(AGENTS)]}_{source:06d}"


def ingest_id(number: int) -> str:
    return "ing_" + hashlib.sha256(b"growth-%d" % number).hexdigest()[:24]


def _agent_event(name: str, run: int, step: int, last: bool) -> tuple[str, str]:
    """The event name and payload of one step of an agent's run."""
    payload: dict[str, Any]
    # A source's last event finishes its run, so no activity is left running (or stalled).
    if last or step == RUN_LENGTH - 1:
        event = "complete"
        payload = {
            "agent_name": name,
            "status": "completed",
            "message": f"Run {run + 1} done",
            "progress": 1.0,
            "result": {"items": step + 1},
        }
    elif step == 0:
        event = "started"
        payload = {
            "agent_name": name,
            "status": "running",
            "message": f"Run {run + 1} started",
            "progress": 0.0,
        }
    else:
        event = "progress"
        payload = {
            "agent_name": name,
            "status": "running",
            "message": f"Processing video {step}/{RUN_LENGTH - 2}",
            "progress": round(step / (RUN_LENGTH - 1), 3),
        }
    return event, _encode(payload).decode()


_SOURCE_NAMES = [agent_source(source) for source in range(SOURCES)]


def _agent_row(shape: LogShape, index: int) -> tuple[str, str, int, str, str]:
    source = index % SOURCES
    version = index // SOURCES + 1
    kind = source % len(AGENTS)
    run, step = divmod(version - 1, RUN_LENGTH)
    key = (kind, run, step, index >= shape.agent_events - SOURCES)
    found = shape.payloads.get(key)
    if found is None:
        found = shape.payloads[key] = _agent_event(AGENTS[kind], run, step, key[3])
    return "agent", _SOURCE_NAMES[source], version, found[0], found[1]


def _ingest_row(slot: int) -> tuple[str, str, int, str, str]:
    number, step = divmod(slot, INGEST_LENGTH)
    video = hashlib.sha256(b"video-%d" % number).hexdigest()[:11]
    payload: dict[str, Any]
    if step == 0:
        event = "requested"
        payload = {
            "url": f"https://www.youtube.com/watch?v={video}",
            "url_key": f"video:{video}",
            "type": "video",
            "video_id": video,
        }
    elif step == 1:
        event, payload = "started", {"message": "Started"}
    elif step < INGEST_LENGTH - 1:
        name, message = VIDEO_STEPS[step - 2]
        event, payload = "progress", {"step": name, "message": message.format(video=video)}
    else:
        event = "complete"
        payload = {
            "type": "video",
            "status": "success",
            "message": "Transcript stored",
            "details": {"video_id": video, "record": f"video:{video}"},
        }
    return "ingest", ingest_id(number), step + 1, event, _encode(payload).decode()


def _rows(shape: LogShape, first: int, last: int, base_ms: int) -> Iterator[Row]:
    """The rows for positions ``first`` to ``last`` (inclusive), as the appender writes them:
    one timestamp per group commit, event ids from the store's own generator, compact JSON
    payloads (msgspec, as ``canonical_payload`` encodes them)."""
    ids = new_event_ids(last - first + 1)
    stamps: dict[int, str] = {}
    for offset, position in enumerate(range(first, last + 1)):
        commit = (position - 1) // COMMIT_ROWS
        stamp = stamps.get(commit)
        if stamp is None:
            moment = datetime.fromtimestamp((base_ms + commit * COMMIT_MS) / 1000, UTC)
            stamp = stamps[commit] = format_timestamp(moment)
        index = shape.agent_index(position)
        if index is None:
            stream, source, version, event, payload = _ingest_row(position // INGEST_EVERY - 1)
        else:
            stream, source, version, event, payload = _agent_row(shape, index)
        yield (position, stream, source, version, event, ids[offset], stamp, payload)


def fill_log(path: Path, count: int, chunk: int = 100_000) -> float:
    """A migrated SQLite log at ``path`` holding ``count`` events; returns seconds taken.

    The secondary indexes are dropped for the inserts and created again from their own SQL
    (a sorted build is far quicker than ten million random b-tree inserts); the schema ends
    exactly as the migrations left it. No ANALYZE: the service never runs one either.
    """
    started = time.perf_counter()
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{path}"))
    shape = LogShape(count)
    # The newest events a few seconds old, the oldest further back by one commit per group.
    base_ms = int(time.time() * 1000) - (count // COMMIT_ROWS + 1) * COMMIT_MS - 5000
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        # A bench fixture, not the service's write path: no journal, no fsync.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-1000000")
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
            " AND sql IS NOT NULL"
        ).fetchall()
        connection.execute("BEGIN")
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        for first in range(1, count + 1, chunk):
            connection.executemany(
                _INSERT, _rows(shape, first, min(first + chunk - 1, count), base_ms)
            )
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode=WAL")
        stored = connection.execute("SELECT max(position) FROM events").fetchone()[0]
    finally:
        connection.close()
    if stored != count:
        raise RuntimeError(f"expected {count} events in {path}, found {stored}")
    return time.perf_counter() - started


# -- query plans -----------------------------------------------------------------------------

_COLUMNS = "position, stream, source_id, version, event, event_id, timestamp, payload"
_PAGE = f"SELECT {_COLUMNS} FROM events WHERE position > ? AND position <= ?"
#: The log's reads as the service issues them (app/eventlog/store.py, appenders.py), with the
#: filters that EventFilter.clauses adds (app/eventlog/filters.py), and who issues each.
PLANS: tuple[tuple[str, str, tuple[object, ...]], ...] = (
    ("head (store._head, appender)", "SELECT coalesce(max(position), 0) FROM events", ()),
    (
        "feed catch-up (store._read_for_feed)",
        f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
        (0, 1000),
    ),
    (
        "source version (appender, store.source_version)",
        "SELECT max(version) FROM events WHERE stream = ? AND source_id = ?",
        ("agent", "x"),
    ),
    (
        "read_source / last_event",
        f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND source_id = ? ORDER BY version DESC"
        " LIMIT 1",
        ("agent", "x"),
    ),
    (
        "event ids (appender, idempotent retries)",
        f"SELECT {_COLUMNS} FROM events WHERE event_id IN (?, ?)",
        ("a", "b"),
    ),
)


#: read_page's filters, compiled by the store's own query builder (app/eventlog/store.py).
PAGE_FILTERS: tuple[tuple[str, EventFilter], ...] = (
    ("read_page, no filter (GET /events, SSE replay, stats projection)", EventFilter()),
    ("read_page, source_id (GET /events?source_id=)", EventFilter(source_ids=("x",))),
    (
        "read_page, stream (projections, GET /events?stream=)",
        EventFilter(streams=("ingest",)),
    ),
    (
        "read_page, stream + source_id (GET /agents/stream?source_id=, /ingests/{id}/events,"
        " /ingests/{id}/stream, IngestService.wait_complete)",
        EventFilter(streams=("agent",), source_ids=("x",)),
    ),
    ("read_page, event (GET /events?event=)", EventFilter(events=("complete",))),
)


def _page_plans() -> list[tuple[str, str, tuple[object, ...]]]:
    found: list[tuple[str, str, tuple[object, ...]]] = []
    for name, event_filter in PAGE_FILTERS:
        compiled = page_query(0, 1, event_filter, 100).compile(
            dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}
        )
        found.append((name, str(compiled), ()))
    return found


def check_plans(path: Path) -> list[str]:
    """The log's reads whose plan scans the events table, or walks an index by its leading
    column only where the query also fixes a column another index leads with."""
    connection = sqlite3.connect(path)
    found: list[str] = []
    try:
        for name, sql, parameters in [*_page_plans(), *PLANS]:
            details = [
                row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", parameters)
            ]
            plan = "; ".join(details)
            if any(detail.startswith("SCAN") for detail in details):
                found.append(f"{name}: {plan}")
            elif "source_id = " in sql and "source_id" not in plan:
                found.append(f"{name}: {plan} (the source_id condition is checked row by row)")
    finally:
        connection.close()
    return found


# -- the HTTP client -------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection: a request at a time, nothing between the clock and
    the socket but a few bytes of parsing (httpx adds about half a millisecond per request)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = 0.0

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._used = time.monotonic()

    async def ready(self) -> None:
        """Connect now, outside the clock, unless a connection is open and was used recently:
        the server closes one left idle for its keep-alive timeout (uvicorn: 5 s), which a
        connection waiting for the other logs' slow reads can reach."""
        if self._writer is None or time.monotonic() - self._used > IDLE_REOPEN_S:
            await self.close()
            await self.open()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None

    def _head(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method == "POST":
            lines += ["content-type: application/json", f"content-length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str]]:
        """Send a request and read the status and headers of its response."""
        if self._writer is None:
            await self.open()
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(self._head(method, path, headers or {}, body))
        status = await self._reader.readline()
        if not status:
            raise ConnectionError(f"{method} {path}: the server closed the connection")
        found: dict[str, str] = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            found[name.strip().lower()] = value.strip()
        return int(status.split()[1]), found

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        status, found = await self.send(method, path, body, headers)
        if "chunked" in found.get("transfer-encoding", ""):
            data = b"".join([chunk async for chunk in self.chunks()])
        else:
            assert self._reader is not None
            data = await self._reader.readexactly(int(found.get("content-length", "0")))
        self._used = time.monotonic()
        return status, data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces, for a chunked response, until its last chunk."""
        assert self._reader is not None
        while True:
            size = int((await self._reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self._reader.readline()
                return
            chunk = await self._reader.readexactly(size + 2)
            yield chunk[:-2]


# -- one log, one service --------------------------------------------------------------------


@dataclass
class Log:
    """A filled log and what the bench knows of it: head and every agent source's version."""

    count: int
    path: Path
    head: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    #: Sources this bench created, a few events each near the head, and their versions.
    sparse: dict[str, int] = field(default_factory=dict)
    ingests: int = 0
    rebuild_seconds: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return log_label(self.count)

    @property
    def url(self) -> str:
        return f"sqlite+aiosqlite:///{self.path}"

    def load(self) -> None:
        """Head, versions and sparse sources as the file holds them now."""
        connection = sqlite3.connect(self.path)
        try:
            self.head = connection.execute("SELECT max(position) FROM events").fetchone()[0]
            self.versions = {}
            for source in range(SOURCES):
                name = agent_source(source)
                (version,) = connection.execute(
                    "SELECT max(version) FROM events WHERE stream = 'agent' AND source_id = ?",
                    (name,),
                ).fetchone()
                if version:
                    self.versions[name] = version
            self.sparse = dict(
                connection.execute(
                    "SELECT source_id, max(version) FROM events WHERE position > ?"
                    " AND source_id LIKE 'growth-%' GROUP BY source_id",
                    (self.count,),
                ).fetchall()
            )
            self.ingests = LogShape(self.count).ingests
        finally:
            connection.close()

    def projections_caught_up(self) -> bool:
        connection = sqlite3.connect(self.path)
        try:
            positions = [
                position
                for (position,) in connection.execute("SELECT position FROM projection_checkpoints")
            ]
        finally:
            connection.close()
        return len(positions) == 3 and min(positions) >= self.head


def prepare_log(directory: Path, count: int) -> Log:
    """The log of ``count`` events in ``directory``: reused if a previous run filled it."""
    path = directory / f"growth-{count}.db"
    if path.exists():
        connection = sqlite3.connect(path)
        try:
            head = connection.execute("SELECT max(position) FROM events").fetchone()[0]
        except sqlite3.Error:
            head = None
        finally:
            connection.close()
        if head is not None and head >= count:
            print(f"{log_label(count)}: reusing {path} (head {head:,})", file=sys.stderr)
        else:
            path.unlink()
    if not path.exists():
        print(f"{log_label(count)}: filling {path} ...", file=sys.stderr)
        # Filled under another name: an interrupted fill is never mistaken for a whole log.
        partial = path.with_suffix(".filling")
        partial.unlink(missing_ok=True)
        seconds = fill_log(partial, count)
        partial.rename(path)
        print(f"{log_label(count)}: filled in {seconds:.1f} s", file=sys.stderr)
    for problem in check_plans(path):
        print(f"{log_label(count)}: query plan: {problem}", file=sys.stderr)
    log = Log(count, path)
    log.load()
    if log.head == count and log.versions != LogShape(count).versions():
        raise RuntimeError(f"{path}: the sources' versions are not the ones the fill wrote")
    return log


_decoder = msgspec.json.Decoder(dict[str, Any])


class Service:
    """The service running on one log, its keep-alive connection and its samples (ms)."""

    def __init__(self, log: Log, scratch: Path, seed: int) -> None:
        self.log = log
        self.scratch = scratch
        self.rng = random.Random(seed)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.connection = Connection(self.host, self.port)
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self.latencies: dict[str, list[float]] = {}

    async def start(self) -> None:
        """Start ``python -m app serve`` on the log; the startup is the time until
        ``/health`` answers 200."""
        env = {
            "DATABASE_URL": self.log.url,
            # The bench's appends leave activities running: a long heartbeat keeps the stalled
            # watchdog from appending in the middle of a measurement.
            "HEARTBEAT_SECONDS": "600",
            "SURREALDB_URL": "mem://",
            "ARCHIVE_DIR": str(self.scratch / "archive"),
        }
        started = time.perf_counter()
        self.process = start_server(
            [sys.executable, "-m", "app", "serve", "--log-level", "warning"], self.port, env
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.process.returncode}")
            probe = Connection(self.host, self.port)
            try:
                status, _ = await probe.request("GET", "/health")
                if status == 200:
                    self.startup_s = time.perf_counter() - started
                    return
            except OSError:
                pass
            finally:
                await probe.close()
            await asyncio.sleep(0.01)
        raise TimeoutError(f"the service was not ready after {STARTUP_TIMEOUT_S:.0f} s")

    async def stop(self) -> None:
        await self.connection.close()
        if self.process is None:
            return
        if self.process.poll() is not None:
            print(
                f"{self.log.label}: the service had exited with code {self.process.returncode}",
                file=sys.stderr,
            )
        await asyncio.to_thread(stop_server, self.process)

    def add(self, name: str, milliseconds: float) -> None:
        self.latencies.setdefault(name, []).append(milliseconds)

    async def get(self, name: str | None, path: str) -> dict[str, Any]:
        await self.connection.ready()
        started = time.perf_counter()
        status, body = await self.connection.request("GET", path)
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:200]!r}")
        if name is not None:
            self.add(name, elapsed)
        return _decoder.decode(body)

    async def page(self, name: str, path: str, after: int, wanted: int) -> None:
        page = await self.get(name, path)
        positions = [event["position"] for event in page["events"]]
        if len(positions) < wanted or any(position <= after for position in positions):
            raise RuntimeError(f"GET {path}: {len(positions)} events, wanted {wanted} > {after}")

    # -- the measurements, one sample each -------------------------------------------------

    async def read_page(self) -> None:
        after = self.rng.randint(0, max(0, self.log.head - PAGE))
        await self.page("page", f"/events?after={after}&limit={PAGE}", after, PAGE)

    async def read_source_page(self) -> None:
        source = self.rng.choice(sorted(self.log.versions))
        # A source's page starts far enough below the head that it holds SOURCE_PAGE events.
        after = self.rng.randint(0, max(0, self.log.head - 2 * SOURCE_PAGE * SOURCES))
        path = f"/events?source_id={source}&after={after}&limit={SOURCE_PAGE}"
        wanted = min(SOURCE_PAGE, self.log.versions[source])
        await self.page("source_page", path, after, wanted)

    async def read_stream_page(self) -> None:
        slots = self.log.ingests * INGEST_LENGTH
        after = self.rng.randint(0, max(0, (slots - 2 * PAGE) * INGEST_EVERY))
        path = f"/events?stream=ingest&after={after}&limit={PAGE}"
        await self.page("stream_page", path, after, min(PAGE, slots - after // INGEST_EVERY))

    async def open_stream(self) -> None:
        """From connecting to ``GET /events/stream`` (resuming at a random position) until the
        next :data:`SSE_EVENTS` events, in order, have arrived."""
        after = self.rng.randint(0, max(0, self.log.head - SSE_EVENTS))
        connection = Connection(self.host, self.port)
        scanner = SseIdScanner(after)
        started = time.perf_counter()
        try:
            status, headers = await connection.send(
                "GET", "/events/stream", headers={"last-event-id": str(after)}
            )
            if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
                raise RuntimeError(f"GET /events/stream -> {status} {headers}")
            async for chunk in connection.chunks():
                scanner.feed(chunk)
                if scanner.count >= SSE_EVENTS:
                    break
            self.add("sse", (time.perf_counter() - started) * 1000)
        finally:
            await connection.close()
        if scanner.count < SSE_EVENTS:
            raise RuntimeError(f"SSE after {after}: {scanner.count} of {SSE_EVENTS} events")

    async def append(self, n: int) -> None:
        """One append, alternately to an existing source (its version in the thousands on a
        big log) and to a new one; the answer must match the versions the log holds."""
        log = self.log
        if n % 2 == 0:
            source, event = self.rng.choice(sorted(log.versions)), "progress"
        else:
            source, event = f"growth-{os.urandom(6).hex()}", "started"
        known = log.versions if source in log.versions else log.sparse
        expected = (log.head + 1, known.get(source, 0) + 1)
        payload = {
            "agent_name": AGENTS[n % len(AGENTS)],
            "status": "running",
            "message": f"Processing video {n % 10 + 1}/10",
            "progress": round((n % 10) / 10, 1),
        }
        body = _encode({"event": event, "payload": payload})
        await self.connection.ready()
        started = time.perf_counter()
        status, answer = await self.connection.request("POST", f"/agents/{source}/events", body)
        self.add("append", (time.perf_counter() - started) * 1000)
        if status != 201:
            raise RuntimeError(
                f"{log.label}: POST /agents/{source}/events -> {status}: {answer[:200]!r}"
            )
        result = _decoder.decode(answer)
        if (result["position"], result["version"]) != expected:
            raise RuntimeError(
                f"POST /agents/{source}/events: position {result['position']}, version "
                f"{result['version']}; the log says {expected}"
            )
        log.head += 1
        known[source] = expected[1]

    async def read_ingest_events(self) -> None:
        if not self.log.ingests:
            return
        path = f"/ingests/{ingest_id(self.rng.randrange(self.log.ingests))}/events"
        page = await self.get("ingest_events", path)
        if len(page["events"]) != INGEST_LENGTH:
            raise RuntimeError(f"GET {path}: not the ingest's {INGEST_LENGTH} events")

    async def open_source_stream(self) -> None:
        """From connecting to ``GET /agents/stream?source_id=`` (no ``Last-Event-ID``, as a
        dashboard opens one activity) until its first event has arrived, for a source with a
        few events near the head. ``GET /events?stream=agent&source_id=`` makes the same read."""
        source = self.rng.choice(sorted(self.log.sparse))
        path = f"/agents/stream?source_id={source}"
        connection = Connection(self.host, self.port)
        scanner = SseIdScanner(0, contiguous=False)
        started = time.perf_counter()
        try:
            status, headers = await connection.send("GET", path)
            if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
                raise RuntimeError(f"GET {path} -> {status} {headers}")
            async for chunk in connection.chunks():
                if scanner.feed(chunk):
                    break
            self.add("source_stream", (time.perf_counter() - started) * 1000)
        finally:
            await connection.close()
        if not scanner.count:
            raise RuntimeError(f"GET {path}: the stream ended before the source's first event")


async def measure_round(logs: list[Log], scratch: Path, seed: int) -> list[Service]:
    """Start the service on every log, then take each measurement on all of them in turn
    (A B C A B C …, request by request), so that the machine's noise falls on every size
    alike; stop them all."""
    services = [Service(log, scratch, seed + n) for n, log in enumerate(logs)]
    try:
        for service in services:
            await service.start()
        for _ in range(WARMUP):
            for service in services:
                after = service.rng.randint(0, service.log.head)
                await service.get(None, f"/events?after={after}&limit={PAGE}")
        steps = (
            (READS, Service.read_page),
            (READS, Service.read_source_page),
            (READS, Service.read_stream_page),
            (SSE_OPENS, Service.open_stream),
        )
        for count, step in steps:
            for _ in range(count):
                for service in services:
                    await step(service)
        for n in range(APPENDS):
            for service in services:
                await service.append(n)
        # Let the projections fold the appends before the next reads.
        await asyncio.sleep(1.0)
        # These grow with the log; a time budget keeps the biggest log's share bounded.
        deadline = time.perf_counter() + SCAN_BUDGET_S
        for n in range(SCAN_READS):
            if n >= 5 and time.perf_counter() > deadline:
                break
            for service in services:
                await service.read_ingest_events()
                await service.open_source_stream()
    finally:
        for service in services:
            await service.stop()
    return services


async def rebuild_rate(log: Log) -> float:
    """Rebuild every projection from position 0, as ``python -m app projections rebuild``
    does (without its interpreter start and migration check); events/s."""
    engine = create_engine(log.url, pool_size=2)
    try:
        runner = ProjectionRunner(engine, all_projections())
        started = time.perf_counter()
        positions = list((await runner.rebuild_together(sorted(runner.projections))).values())
        seconds = time.perf_counter() - started
    finally:
        await engine.dispose()
    log.rebuild_seconds.append(seconds)
    if any(position != log.head for position in positions):
        raise RuntimeError(f"rebuild ended at {positions}, the head is {log.head}")
    return log.head / seconds


# -- the figures -----------------------------------------------------------------------------

#: Latency measurements: (name, what, percentiles reported).
LATENCIES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("append", "single append, POST /agents/{id}/events (half new sources)", (50, 99)),
    ("page", f"GET /events?after=<random>&limit={PAGE}", (50, 99)),
    (
        "source_page",
        f"GET /events?source_id=<one of {SOURCES}>&after=<random>&limit={SOURCE_PAGE}",
        (50, 99),
    ),
    ("stream_page", "GET /events?stream=ingest&after=<random> (1% of the log)", (50, 99)),
    ("sse", f"open /events/stream, Last-Event-ID=<random>, until {SSE_EVENTS} events", (50, 99)),
    ("ingest_events", "GET /ingests/{id}/events (one ingest's 12 events)", (50,)),
    (
        "source_stream",
        "open /agents/stream?source_id=<a new source> until its first event",
        (50,),
    ),
)


def _figures(reference: str) -> dict[str, Figure]:
    figures = {
        "startup": Figure(
            "growth.startup",
            "service start until /health answers 200",
            "s",
            higher_is_better=False,
            reference=reference,
        ),
        "rebuild": Figure(
            "growth.rebuild",
            "projection rebuild, all projections, from position 0",
            "events/s",
            reference=reference,
        ),
    }
    for name, what, percentiles in LATENCIES:
        for percentile in percentiles:
            figures[f"{name}_p{percentile}"] = Figure(
                f"growth.{name}_p{percentile}",
                f"{what}, p{percentile}",
                "ms",
                higher_is_better=False,
                target="flat (ratio near 1)",
                reference=reference,
            )
    return figures


def _record(figures: dict[str, Figure], service: Service) -> None:
    label = service.log.label
    figures["startup"].add(label, service.startup_s)
    for name, _, percentiles in LATENCIES:
        values = service.latencies.get(name)
        for percentile in percentiles:
            figure = figures[f"{name}_p{percentile}"]
            if values:
                figure.add(label, quantile(values, percentile / 100))
            else:
                figure.skip(label, "not measured on this log")


async def _rebuild(figure: Figure, log: Log, logs: list[Log]) -> None:
    """Time a rebuild of ``log``'s projections, unless it would take longer than the budget
    and the projections are already caught up (the service must start with them caught up,
    so a first rebuild is always done)."""
    rates = {
        other.count: figure.median(other.label)
        for other in logs
        if other.count <= log.count and figure.median(other.label)
    }
    if rates and log.projections_caught_up():
        nearest = max(rates)
        estimate = log.count / (rates[nearest] or 1.0)
        if estimate > REBUILD_BUDGET_S:
            if log.rebuild_seconds:
                reason = (
                    f"rebuilt in the first round only ({log.rebuild_seconds[0]:.0f} s, above "
                    f"the {REBUILD_BUDGET_S:.0f} s budget)"
                )
            else:
                reason = (
                    f"not rebuilt: about {estimate:.0f} s at the {log_label(nearest)} rate, "
                    f"above the {REBUILD_BUDGET_S:.0f} s budget"
                )
            figure.skip(log.label, reason)
            return
    print(f"{log.label}: rebuilding the projections ...", file=sys.stderr)
    rate = await rebuild_rate(log)
    print(f"{log.label}: rebuilt in {log.rebuild_seconds[-1]:.1f} s", file=sys.stderr)
    figure.add(log.label, rate)


async def run(quick: bool, rounds: int, data_dir: Path | None = None) -> list[Figure]:
    """Every figure for each log size, sizes alternating within each round. ``data_dir``
    keeps the filled logs for the next run (each is filled once either way)."""
    sizes = QUICK_SIZES if quick else SIZES
    figures = _figures(log_label(sizes[0]))
    with tempfile.TemporaryDirectory(prefix="growth-") as directory:
        scratch = Path(directory)
        store = data_dir or scratch
        store.mkdir(parents=True, exist_ok=True)
        logs = [await asyncio.to_thread(prepare_log, store, count) for count in sizes]
        for round_number in range(rounds):
            print(f"round {round_number + 1}/{rounds}", file=sys.stderr)
            for log in logs:
                await _rebuild(figures["rebuild"], log, logs)
            for service in await measure_round(logs, scratch, seed=round_number * 1000):
                _record(figures, service)
                print(
                    f"{service.log.label}: startup {service.startup_s:.2f} s, append p50 "
                    f"{quantile(service.latencies['append'], 0.5):.2f} ms",
                    file=sys.stderr,
                )
    return list(figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.growth", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="10k, 100k and 1M events")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 2)")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="keep the filled logs here, reuse them"
    )
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    figures = asyncio.run(run(args.quick, rounds, args.data_dir))
    print(render(figures))


if __name__ == "__main__":
    main()
