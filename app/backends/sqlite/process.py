"""SQLite appends in a process of their own, out of the event loop's way.

In one process, the appender's thread and the event loop share one GIL: each commit is a
chain of hand-overs between them (SQLite lets go of the GIL around its work, then has to win
it back from a busy loop), and under load both threads wait on each other while neither
core is full. Here the writer runs in a child process with its own interpreter, served by the
same loop as on a thread (:func:`~app.backends.sqlite.serve.serve`), over a socket pair:
batches go over as the JSON the events already are, and each transaction's outcome comes back
as a short msgpack frame of positions, versions and ids.

A frame is a 4-byte big-endian length, then the message's kind (one byte, :class:`Ask` or
:class:`Answer`), then its body, encoded as :data:`_ENCODE` says and decoded as :data:`_DECODE`
says, one entry per kind.

If the child dies, every request in flight is refused (whether its transaction committed is
unknown: a retry with the same ``event_id`` is safe), and the next append starts a new child.
A child whose service dies sees its socket close and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.backends.base import AppendRequest, GuardedWrite, OnCommit
from app.backends.sqlite.linked import LinkedAppender
from app.backends.sqlite.serve import Answer, Ask, serve
from app.backends.sqlite.writer import WriterOptions
from app.events.envelope import Event, NewEvent
from app.events.errors import AppendError, EventIdReused, LogUnavailable, VersionConflict
from app.events.plan import AppendResult, Plan

__all__ = ["ProcessAppender", "main"]

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


def _nothing(_body: Any) -> bytes:
    return b""


def _none(_body: bytes) -> None:
    return None


def _guarded(body: bytes) -> tuple[int, GuardedWrite]:
    token, fields = _unpack.decode(body)
    return token, GuardedWrite(*fields)


def _pair(body: bytes) -> tuple[Any, Any]:
    first, second = _unpack.decode(body)
    return first, second


#: How each kind's body crosses the socket, and how it is read on the other side. APPEND's
#: body is encoded by the service from its requests (ProcessAppender._send_requests), and
#: COMMITTED's by the child from its transaction (_ChildOutbox.committed).
_ENCODE: dict[int, Callable[[Any], bytes]] = {
    Ask.HOLD: _pack.encode,
    Ask.RELEASE: _pack.encode,
    Ask.PROBE: _pack.encode,
    Ask.WRITE: _pack.encode,
    Ask.STOP: _nothing,
    Answer.HOLDING: _pack.encode,
    Answer.PROBED: _pack.encode,
    Answer.WRITTEN: _pack.encode,
    Answer.STOPPED: _nothing,
    Answer.READY: _nothing,
    Answer.FAILED: lambda message: str(message).encode(),
}
_DECODE: dict[int, Callable[[bytes], Any]] = {
    Ask.APPEND: _requests.decode,
    Ask.HOLD: _unpack.decode,
    Ask.RELEASE: _unpack.decode,
    Ask.PROBE: _unpack.decode,
    Ask.WRITE: _guarded,
    Ask.STOP: _none,
    Answer.COMMITTED: _unpack.decode,
    Answer.HOLDING: _unpack.decode,
    Answer.PROBED: _pair,
    Answer.WRITTEN: _pair,
    Answer.STOPPED: _none,
    Answer.READY: _none,
    Answer.FAILED: lambda body: body.decode(errors="replace"),
}


def _frame(kind: int, body: bytes = b"") -> bytes:
    return (len(body) + 1).to_bytes(_HEADER, "big") + bytes((kind,)) + body


def _split(buffer: bytearray) -> list[tuple[int, bytes]]:
    """The whole frames at the start of ``buffer``, as (kind, body), taken out of it: what
    is left is the start of a frame still arriving. Both ends cut their stream with this."""
    frames = []
    start = 0
    while len(buffer) - start >= _HEADER:
        end = start + _HEADER + int.from_bytes(buffer[start : start + _HEADER], "big")
        if len(buffer) < end:
            break
        frames.append((buffer[start + _HEADER], bytes(buffer[start + _HEADER + 1 : end])))
        start = end
    del buffer[:start]
    return frames


# -- the child --------------------------------------------------------------------------------


class _ChildInbox:
    """Messages read from the service's end of the socket (blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._ready: deque[tuple[int, bytes]] = deque()

    def next(self, timeout: float | None) -> tuple[Ask, Any] | None:
        while not self._ready:
            if timeout is not None and not select.select([self._sock], [], [], timeout)[0]:
                return None
            chunk = self._sock.recv(_BUFFER_BYTES)
            if not chunk:
                raise EOFError
            self._buffer += chunk
            self._ready.extend(_split(self._buffer))
        kind, body = self._ready.popleft()
        return Ask(kind), _DECODE[kind](body)


class _ChildOutbox:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def committed(self, group: list[Any], outcome: Plan | Exception, seconds: float) -> None:
        self._sock.sendall(_encode_outcome(len(group), seconds, outcome))

    def answer(self, kind: Answer, body: Any) -> None:
        self._sock.sendall(_frame(kind, _ENCODE[kind](body)))


def _encode_outcome(count: int, seconds: float, outcome: Plan | Exception) -> bytes:
    body: list[Any]
    if isinstance(outcome, Exception):
        kind = _UNAVAILABLE if isinstance(outcome, LogUnavailable) else _FAILED
        body = [kind, str(outcome)]
    else:
        body = [_encode_result(result) for result in outcome.outcomes]
    try:
        return _frame(Answer.COMMITTED, _pack.encode([count, seconds, body]))
    except (OverflowError, TypeError, msgspec.EncodeError):
        # The transaction has committed: whatever one request's outcome holds that msgpack
        # cannot carry (an integer past 64 bits in a conflict), the others' outcomes must
        # still reach their callers, or their committed events would be reported as failed.
        safe = [count, seconds, [_encodable(item) for item in body]]
        return _frame(Answer.COMMITTED, _pack.encode(safe))


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


def _run_child(sock: socket.socket, options: WriterOptions) -> None:
    """The child's work: connect, then append until told to stop or the service is gone."""
    # Ctrl-C reaches the whole process group; the service stops this process itself, after
    # the appends it has already handed over are committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer = options.writer()
    outbox = _ChildOutbox(sock)
    try:
        writer.connect()
    except Exception as exc:
        outbox.answer(Answer.FAILED, f"the event log could not be opened: {exc}")
        return
    outbox.answer(Answer.READY, None)
    try:
        serve(writer, _ChildInbox(sock), outbox, max_batch=options.max_batch, events_of=_same)
    except (EOFError, ConnectionError):
        return  # the service is gone: nobody waits for an outcome any more
    finally:
        writer.close()


def _same(events: Sequence[NewEvent]) -> Sequence[NewEvent]:
    return events


# -- the service's side -----------------------------------------------------------------------


def _command(fd: int, options: WriterOptions) -> list[str]:
    return [sys.executable, "-m", __name__, str(fd), *options.arguments()]


def _environment() -> dict[str, str]:
    # The same app as this process's, wherever it was imported from.
    paths = [entry for entry in sys.path if entry]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class ProcessAppender(LinkedAppender):
    """Runs each batch as one transaction in a child process (see the module's docstring)."""

    def __init__(self, options: WriterOptions) -> None:
        super().__init__()
        self._options = options
        self._process: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.WriteTransport | None = None
        # Requests sent and not yet answered, in the order the child answers them.
        self._in_flight: deque[AppendRequest] = deque()
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
        # A fresh interpreter running this module (it imports no more than the writer needs):
        # a fork of the service would copy its threads' locks mid-use, and multiprocessing's
        # own start methods run the service's main script again in the child, which a script
        # without a ``__main__`` guard does not survive.
        try:
            process = await asyncio.to_thread(
                subprocess.Popen,
                _command(theirs.fileno(), self._options),
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
        ready: asyncio.Future[tuple[int, bytes]] = loop.create_future()
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
        if kind != Answer.READY:
            transport.close()
            await asyncio.to_thread(process.wait)
            raise LogUnavailable(_DECODE[kind](body))
        self._process = process
        self._transport = transport
        self._stopped = loop.create_future()
        replies.follow(
            lambda kind, body: self._reply(transport, kind, body), lambda: self._gone(transport)
        )

    @property
    def _connected(self) -> bool:
        return self._transport is not None

    def _unavailable(self) -> str:
        if self._closed:
            return "the event log is closed"
        return "the event log's writer process is not running (the next append starts it)"

    def _send(self, kind: Ask, body: Any) -> None:
        assert self._transport is not None
        self._transport.write(_frame(kind, _ENCODE[kind](body)))

    def submit(self, requests: list[AppendRequest]) -> None:
        if self._transport is None:
            # Between a child that died and its successor: sent once the new one is ready.
            self._queued.extend(requests)
            self._restart()
            return
        self._send_requests(requests)

    def _send_requests(self, requests: list[AppendRequest]) -> None:
        assert self._transport is not None
        self._in_flight.extend(requests)
        body = _json.encode([request.events for request in requests])
        self._transport.write(_frame(Ask.APPEND, body))

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
                self._send_requests(queued)
        finally:
            self._starting = None

    async def _ensure_writer(self) -> None:
        """Start a new child if the last one died (as an append does): projection steps,
        which write through it, must not wait for the next append."""
        if self._transport is None and not self._closed:
            self._restart()
            if self._starting is not None:
                await asyncio.shield(self._starting)

    def _reply(self, transport: asyncio.BaseTransport, kind: int, body: bytes) -> None:
        """One frame from the child (on the event loop, in the order it was sent)."""
        if kind == Answer.COMMITTED:
            self._committed(body)
        elif kind == Answer.STOPPED:
            self._gone(transport)
        else:
            self._answered(Answer(kind), _DECODE[kind](body))

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
        self._answer_everyone(
            "the event log's writer process stopped before answering"
            if not self._closed
            else self._unavailable()
        )

    def _committed(self, body: bytes) -> None:
        count, seconds, encoded = _DECODE[Answer.COMMITTED](body)
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

    async def close(self) -> None:
        """Commit every request sent so far, then stop the child."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None:
            await self._starting
        if self._transport is not None:
            self._send(Ask.STOP, None)
        if self._stopped is not None:
            await self._stopped
        if self._process is not None:
            await asyncio.to_thread(self._process.wait)


class _Replies(asyncio.Protocol):
    """The child's frames, cut from the socket's stream as they arrive: the first one answers
    ``ready``, every later one goes to ``on_frame``, and ``on_lost`` hears of the end."""

    def __init__(self, ready: asyncio.Future[tuple[int, bytes]]) -> None:
        self._ready = ready
        self._buffer = bytearray()
        self._on_frame: Callable[[int, bytes], None] | None = None
        self._on_lost: Callable[[], None] | None = None

    def follow(self, on_frame: Callable[[int, bytes], None], on_lost: Callable[[], None]) -> None:
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
    """``python -m app.backends.sqlite.process FD PATH BUSY_MS MAX_BATCH CACHE_KIB CHAIN``, as
    the service starts it, FD being its end of the socket pair, CHAIN 1 or 0."""
    fd, *options = arguments
    with socket.socket(fileno=int(fd)) as sock:
        _run_child(sock, WriterOptions.from_arguments(options))


if __name__ == "__main__":
    main(sys.argv[1:])
