"""SQLite appends in a process of their own, out of the event loop's way.

In one process, the appender's thread and the event loop share one GIL: each commit is a
chain of hand-overs between them (SQLite lets go of the GIL around its work, then has to win
it back from a busy loop), and under load both threads wait on each other while neither
core is full. Here the appender runs in a child process with its own interpreter, talking to
the service over a socket pair: batches go over as the JSON the events already are, and each
transaction's outcome comes back as a short msgpack frame of positions, versions and ids.

The child does exactly what :class:`~app.eventlog.appenders.SqliteAppender`'s thread does
(the same :class:`~app.eventlog.appenders.SqliteWriter`): it forms each transaction from every
request that arrived while the previous one was being written and synced, and answers in
commit order. A write turn (``turn``) holds it between two transactions, as there.

Frames, both ways: a 4-byte big-endian length, then a kind byte, then the body.

    service -> child   A appends (JSON: one list of events per request)
                       P pause / R release (JSON: turn id), Q probe (JSON: id)
                       W guarded write (msgpack: [id, GuardedWrite]), S stop
    child -> service   r ready, E could not start (UTF-8 message)
                       C commit (msgpack: requests, seconds, outcome)
                       H holding (turn id), q probe answer ([id, problem])
                       w guarded write done ([id, written or an error message]), s stopped

If the child dies, every request in flight is refused (whether its transaction committed is
unknown: a retry with the same ``event_id`` is safe), and the next append starts a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from app.eventlog.appenders import AppendRequest, GuardedWrite, OnCommit, SqliteWriter
from app.eventlog.envelope import Event, NewEvent
from app.eventlog.errors import AppendError, EventIdReused, LogUnavailable, VersionConflict
from app.eventlog.plan import AppendResult, Plan

__all__ = ["ProcessSqliteAppender", "serve"]

logger = logging.getLogger(__name__)

_HEADER = 4
#: Socket buffers large enough for a whole batch of 2,000 events in one write.
_BUFFER_BYTES = 4 * 1024 * 1024

_json = msgspec.json.Encoder()
_requests = msgspec.json.Decoder(list[list[NewEvent]])
_pack = msgspec.msgpack.Encoder()
_unpack = msgspec.msgpack.Decoder()

# An outcome that refuses one request, or a whole transaction, crosses as [kind, *args].
_CONFLICT = "conflict"
_REUSED = "reused"
_UNAVAILABLE = "unavailable"
_FAILED = "failed"


def _frame(kind: bytes, body: bytes = b"") -> bytes:
    return (len(body) + 1).to_bytes(_HEADER, "big") + kind + body


# -- the child --------------------------------------------------------------------------------


def _split(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    """The whole frames at the start of ``buffer``, as (kind, body), taken out of it: what
    is left is the start of a frame still arriving. Both ends cut their stream with this."""
    frames = []
    start = 0
    while len(buffer) - start >= _HEADER:
        end = start + _HEADER + int.from_bytes(buffer[start : start + _HEADER], "big")
        if len(buffer) < end:
            break
        frames.append(
            (
                bytes(buffer[start + _HEADER : start + _HEADER + 1]),
                bytes(buffer[start + _HEADER + 1 : end]),
            )
        )
        start = end
    del buffer[:start]
    return frames


class _Frames:
    """Frames read from a blocking socket, with an optional wait for the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._ready: deque[tuple[bytes, bytes]] = deque()

    def next(self, timeout: float | None) -> tuple[bytes, bytes] | None:
        """The next frame; None if none arrived within ``timeout`` (None: wait for one).
        Raises EOFError when the service has closed its end."""
        while not self._ready:
            if timeout is not None and not select.select([self._sock], [], [], timeout)[0]:
                return None
            chunk = self._sock.recv(_BUFFER_BYTES)
            if not chunk:
                raise EOFError
            self._buffer += chunk
            self._ready.extend(_split(self._buffer))
        return self._ready.popleft()


def _encode_outcome(count: int, seconds: float, outcome: Plan | Exception) -> bytes:
    body: list[Any]
    if isinstance(outcome, Exception):
        kind = _UNAVAILABLE if isinstance(outcome, LogUnavailable) else _FAILED
        body = [kind, str(outcome)]
    else:
        body = [_encode_result(result) for result in outcome.outcomes]
    try:
        return _frame(b"C", _pack.encode([count, seconds, body]))
    except (OverflowError, TypeError, msgspec.EncodeError):
        # The transaction has committed: whatever one request's outcome holds that msgpack
        # cannot carry (an integer past 64 bits in a conflict), the others' outcomes must
        # still reach their callers, or their committed events would be reported as failed.
        return _frame(b"C", _pack.encode([count, seconds, [_encodable(item) for item in body]]))


def _encodable(encoded: Any) -> Any:
    """``encoded`` if msgpack can carry it, else a failure that answers its request alone."""
    try:
        _pack.encode(encoded)
    except (OverflowError, TypeError, msgspec.EncodeError) as exc:
        logger.error("the outcome of an append could not be sent back: %s", exc)
        return [_FAILED, f"the outcome of this append could not be reported: {exc}"]
    return encoded


def _encode_result(result: list[AppendResult] | AppendError) -> Any:
    if isinstance(result, VersionConflict):
        return [_CONFLICT, result.stream, result.source_id, result.expected, result.actual]
    if isinstance(result, EventIdReused):
        return [_REUSED, result.event_id, result.position]
    if isinstance(result, AppendError):
        return [_FAILED, str(result)]
    return result


class _Child:
    def __init__(self, sock: socket.socket, writer: SqliteWriter, max_batch: int) -> None:
        self._sock = sock
        self._frames = _Frames(sock)
        self._writer = writer
        self._max_batch = max_batch
        self._waiting: deque[list[NewEvent]] = deque()
        self._released: set[int] = set()
        self._turns: deque[int] = deque()
        self._writes: deque[tuple[int, GuardedWrite]] = deque()
        self._stopping = False

    def run(self) -> None:
        while True:
            # Everything sent by now joins the line; wait only when there is nothing to
            # write, so a transaction never starts before the requests already sent are in it.
            timeout = None if not self._waiting and not self._stopping else 0.0
            while (found := self._frames.next(timeout)) is not None:
                timeout = 0.0
                self._handle(*found)
                while self._turns or self._writes:
                    if self._turns:
                        self._hold(self._turns.popleft())
                    else:
                        self._write_guarded(*self._writes.popleft())
            if self._waiting:
                self._commit()
            elif self._stopping:
                return

    def _handle(self, kind: bytes, body: bytes) -> None:
        if kind == b"A":
            self._waiting.extend(_requests.decode(body))
        elif kind == b"P":
            self._turns.append(msgspec.json.decode(body))
        elif kind == b"R":
            self._released.add(msgspec.json.decode(body))
        elif kind == b"Q":
            answer = [msgspec.json.decode(body), self._writer.probe()]
            self._sock.sendall(_frame(b"q", _pack.encode(answer)))
        elif kind == b"W":
            write_id, fields = _unpack.decode(body)
            self._writes.append((write_id, GuardedWrite(*fields)))
        elif kind == b"S":
            self._stopping = True

    def _write_guarded(self, write_id: int, write: GuardedWrite) -> None:
        answer: bool | str
        try:
            answer = self._writer.write_guarded(write)
        except Exception as exc:
            answer = str(exc)
        self._sock.sendall(_frame(b"w", _pack.encode([write_id, answer])))

    def _hold(self, turn: int) -> None:
        """Stop between two transactions until the turn is released (or the busy timeout)."""
        if turn in self._released:  # given up before it was reached
            self._released.discard(turn)
            return
        self._sock.sendall(_frame(b"H", _pack.encode(turn)))
        limit = self._writer.busy_ms / 1000
        deadline = time.monotonic() + limit
        while turn not in self._released:
            found = self._frames.next(max(0.0, deadline - time.monotonic()))
            if found is None:
                # The lock itself is SQLite's; past this, appends wait for it there instead.
                logger.warning("a writer held its turn for more than %g s; appending again", limit)
                return
            self._handle(*found)
        self._released.discard(turn)

    def _commit(self) -> None:
        waiting = self._waiting
        group = [waiting.popleft()]
        size = len(group[0])
        while waiting and size < self._max_batch:
            request = waiting.popleft()
            group.append(request)
            size += len(request)
        started = time.perf_counter()
        outcome = self._writer.commit(group)
        seconds = time.perf_counter() - started
        self._sock.sendall(_encode_outcome(len(group), seconds, outcome))


def serve(sock: socket.socket, path: str, busy_ms: int, max_batch: int, cache_kib: int) -> None:
    """The child's work: connect, then append until told to stop or the service is gone."""
    # Ctrl-C reaches the whole process group; the service stops this process itself, after
    # the appends it has already handed over are committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer = SqliteWriter(Path(path), busy_timeout_ms=busy_ms, cache_kib=cache_kib)
    try:
        writer.connect()
    except Exception as exc:
        sock.sendall(_frame(b"E", f"the event log could not be opened: {exc}".encode()))
        return
    sock.sendall(_frame(b"r"))
    try:
        _Child(sock, writer, max_batch).run()
    except (EOFError, ConnectionError):
        return  # the service is gone: nobody waits for an outcome any more
    finally:
        writer.close()
    sock.sendall(_frame(b"s"))


# -- the service's side -----------------------------------------------------------------------


def _command(fd: int, path: str, busy_ms: int, max_batch: int, cache_kib: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        __name__,
        str(fd),
        path,
        str(busy_ms),
        str(max_batch),
        str(cache_kib),
    ]


def _environment() -> dict[str, str]:
    # The same app as this process's, wherever it was imported from.
    paths = [entry for entry in sys.path if entry]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class ProcessSqliteAppender:
    """Runs each batch as one transaction in a child process (see the module's docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_seconds: float = 10.0,
        max_batch_events: int = 2000,
        cache_kib: int = 64 * 1024,
    ) -> None:
        self._args = (str(path), int(busy_timeout_seconds * 1000), max_batch_events, cache_kib)
        self._on_commit: OnCommit | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.WriteTransport | None = None
        # Requests sent and not yet answered, in the order the child answers them.
        self._in_flight: deque[AppendRequest] = deque()
        self._ids = 0
        self._holding: dict[int, asyncio.Future[None]] = {}
        self._probes: dict[int, asyncio.Future[str | None]] = {}
        self._writes: dict[int, asyncio.Future[bool | str]] = {}
        self._stopped: asyncio.Future[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._queued: list[AppendRequest] = []
        self._closed = False

    async def start(self, on_commit: OnCommit) -> None:
        self._on_commit = on_commit
        await self._spawn()

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER_BYTES)
        # A fresh interpreter running this module (it imports no more than the writer needs,
        # ~0.1 s): a fork of the service would copy its threads' locks mid-use, and
        # multiprocessing's own start methods run the service's main script again in the
        # child, which a script without a ``__main__`` guard does not survive.
        try:
            process = await asyncio.to_thread(
                subprocess.Popen,
                _command(theirs.fileno(), *self._args),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_environment(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        replies = _Replies(ready)
        transport, _ = await loop.create_unix_connection(lambda: replies, sock=ours)
        try:
            kind, body = await ready
        except ConnectionError as exc:
            transport.close()
            code = await asyncio.to_thread(process.wait)
            raise LogUnavailable(
                f"the event log's writer process exited on start (exit code {code})"
            ) from exc
        if kind != b"r":
            transport.close()
            await asyncio.to_thread(process.wait)
            raise LogUnavailable(body.decode(errors="replace"))
        self._process = process
        self._transport = transport
        self._stopped = loop.create_future()
        replies.follow(
            lambda kind, body: self._reply(transport, kind, body), lambda: self._gone(transport)
        )

    def submit(self, requests: list[AppendRequest]) -> None:
        if self._transport is None:
            # Between a child that died and its successor: sent once the new one is ready.
            self._queued.extend(requests)
            self._restart()
            return
        self._send(requests)

    def _send(self, requests: list[AppendRequest]) -> None:
        assert self._transport is not None
        self._in_flight.extend(requests)
        self._transport.write(_frame(b"A", _json.encode([request.events for request in requests])))

    def _restart(self) -> None:
        if self._starting is None and not self._closed:
            self._starting = asyncio.create_task(self._respawn(), name="sqlite-append-restart")

    async def _respawn(self) -> None:
        try:
            if self._process is not None:
                await asyncio.to_thread(self._process.wait)  # gone: collect its exit status
            await self._spawn()
        except Exception as exc:
            failure = exc if isinstance(exc, LogUnavailable) else LogUnavailable(str(exc))
            logger.error("the event log's writer process could not be restarted: %s", failure)
            queued, self._queued = self._queued, []
            self._refuse(queued, failure)
        else:
            queued, self._queued = self._queued, []
            if queued:
                self._send(queued)
        finally:
            self._starting = None

    def _reply(self, transport: asyncio.BaseTransport, kind: bytes, body: bytes) -> None:
        """One frame from the child (on the event loop, in the order it was sent)."""
        if kind == b"C":
            self._committed(body)
        elif kind == b"H":
            _answer(self._holding, _unpack.decode(body), None)
        elif kind == b"q":
            _answer(self._probes, *_unpack.decode(body))
        elif kind == b"w":
            _answer(self._writes, *_unpack.decode(body))
        elif kind == b"s":
            self._gone(transport)

    def _gone(self, transport: asyncio.BaseTransport) -> None:
        """The child has stopped (as asked, or not): refuse whatever it left unanswered."""
        if transport is not self._transport:
            return  # an earlier child, already let go
        self._transport = None
        transport.close()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        if in_flight or not self._closed:
            code = None if self._process is None else self._process.poll()
            logger.error(
                "the event log's writer process stopped (exit code %s) with %d append(s) "
                "unanswered; the next append starts a new one",
                "unknown" if code is None else code,
                len(in_flight),
            )
            self._refuse(
                in_flight,
                LogUnavailable(
                    "the event log's writer process stopped before answering: the append may "
                    "or may not have been written (a retry with the same event_id is safe)"
                ),
            )
        _answer_all(self._holding, None)
        _answer_all(self._probes, "the event log's writer process is not running")
        _answer_all(self._writes, "the event log's writer process stopped before answering")

    def _refuse(self, requests: Sequence[AppendRequest], failure: LogUnavailable) -> None:
        if requests and self._on_commit is not None:
            self._on_commit(list(requests), failure, 0.0)

    def _committed(self, body: bytes) -> None:
        count, seconds, encoded = _unpack.decode(body)
        in_flight = self._in_flight
        group = [in_flight.popleft() for _ in range(count)]
        outcome: Plan | Exception
        if encoded and isinstance(encoded[0], str):
            kind, message = encoded
            outcome = LogUnavailable(message) if kind == _UNAVAILABLE else RuntimeError(message)
        else:
            outcome = _decode_plan(group, encoded)
        assert self._on_commit is not None
        self._on_commit(group, outcome, seconds)

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold appends between two transactions while the caller writes (as
        :meth:`SqliteAppender.turn`): the child stops until the turn is released."""
        writer = self._transport
        if writer is None:  # closed or between two children: no appends to hold
            yield
            return
        turn = self._next_id()
        holding: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._holding[turn] = holding
        writer.write(_frame(b"P", _json.encode(turn)))
        try:
            await holding
            yield
        finally:
            self._holding.pop(turn, None)
            # Also when the turn was given up before the child reached it: it then skips it.
            if self._transport is writer:
                writer.write(_frame(b"R", _json.encode(turn)))

    async def probe(self) -> str | None:
        if self._transport is None:
            if self._closed:
                return "the event log is closed"
            return "the event log's writer process is not running (the next append starts it)"
        probe_id = self._next_id()
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._probes[probe_id] = answer
        self._transport.write(_frame(b"Q", _json.encode(probe_id)))
        return await answer

    async def write_guarded(self, write: GuardedWrite) -> bool:
        """Run ``write`` in the child, between two of its transactions: False (nothing
        written) if its guard did not read what it expected. Starts a new child if the last
        one died (as an append does): projection steps must not wait for the next append."""
        if self._transport is None and not self._closed:
            self._restart()
            if self._starting is not None:
                await asyncio.shield(self._starting)
        transport = self._transport
        if transport is None:
            raise LogUnavailable("the event log's writer process is not running")
        write_id = self._next_id()
        done: asyncio.Future[bool | str] = asyncio.get_running_loop().create_future()
        self._writes[write_id] = done
        transport.write(_frame(b"W", _pack.encode([write_id, write])))
        written = await done
        if isinstance(written, str):
            raise LogUnavailable(written)
        return written

    async def close(self) -> None:
        """Commit every request sent so far, then stop the child."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None:
            await self._starting
        if self._transport is not None:
            self._transport.write(_frame(b"S"))
        if self._stopped is not None:
            await self._stopped
        if self._process is not None:
            await asyncio.to_thread(self._process.wait)


class _Replies(asyncio.Protocol):
    """The child's frames, cut from the socket's stream as they arrive: the first one answers
    ``ready``, every later one goes to ``on_frame``, and ``on_lost`` hears of the end."""

    def __init__(self, ready: asyncio.Future[tuple[bytes, bytes]]) -> None:
        self._ready = ready
        self._buffer = bytearray()
        self._on_frame: Callable[[bytes, bytes], None] | None = None
        self._on_lost: Callable[[], None] | None = None

    def follow(self, on_frame: Callable[[bytes, bytes], None], on_lost: Callable[[], None]) -> None:
        self._on_frame, self._on_lost = on_frame, on_lost

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for kind, body in _split(self._buffer):
            if not self._ready.done():
                self._ready.set_result((kind, body))
            elif self._on_frame is not None:
                self._on_frame(kind, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ready.done():
            self._ready.set_exception(ConnectionError("the writer process closed its socket"))
        elif self._on_lost is not None:
            self._on_lost()


def _answer(pending: dict[int, asyncio.Future[Any]], key: int, value: Any) -> None:
    """Answer the caller waiting under ``key`` (gone if it stopped waiting)."""
    waiting = pending.pop(key, None)
    if waiting is not None and not waiting.done():
        waiting.set_result(value)


def _answer_all(pending: dict[int, asyncio.Future[Any]], value: Any) -> None:
    for key in list(pending):
        _answer(pending, key, value)


_make = tuple.__new__


def _decode_plan(group: list[AppendRequest], encoded: list[Any]) -> Plan:
    """The plan the child committed, rebuilt from the requests it answers and its results:
    the events it wrote straight from the requests' own (no rows, no payloads copied)."""
    written: list[Event] = []
    outcomes: list[list[AppendResult] | AppendError] = []
    for request, result in zip(group, encoded, strict=True):
        if result and isinstance(result[0], str):
            outcomes.append(_decode_error(result))
            continue
        results = [_make(AppendResult, item) for item in result]
        outcomes.append(results)
        for new, appended in zip(request.events, results, strict=True):
            if appended[4]:  # a retry of an event already in the log: nothing written
                continue
            written.append(
                Event(
                    appended[0],
                    new.stream,
                    new.source_id,
                    appended[1],
                    new.event,
                    appended[2],
                    appended[3],
                    new.payload,
                )
            )
    return Plan([], outcomes, {}, written)


def _decode_error(encoded: list[Any]) -> AppendError:
    kind, *args = encoded
    if kind == _CONFLICT:
        return VersionConflict(*args)
    if kind == _REUSED:
        return EventIdReused(*args)
    return AppendError(*args)


def main(arguments: Sequence[str]) -> None:
    """``python -m app.eventlog.writer_process FD PATH BUSY_MS MAX_BATCH CACHE_KIB``, as the
    service starts it, FD being its end of the socket pair."""
    fd, path, busy_ms, max_batch, cache_kib = arguments
    with socket.socket(fileno=int(fd)) as sock:
        serve(sock, path, int(busy_ms), int(max_batch), int(cache_kib))


if __name__ == "__main__":
    main(sys.argv[1:])
