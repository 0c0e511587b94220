"""Many SSE subscribers, spread over worker processes, each checking what it receives.

Used by the fan-out figure (:mod:`bench.fanout`). A subscriber is an ``asyncio.Protocol``
on a plain socket: it sends one ``GET``, reads the HTTP head, undoes chunked framing and
scans the complete SSE frames of each read with two bytes regexes, one for the ``id`` lines
and one for the producer's marker in ``data`` (``"message":"fanout <seq> <send time>"``).
For all the frames of a read at once (map, set and array operations, in C) it checks that
ids strictly increase (the log's order) and that no ``seq`` was seen before; with as many
events as were produced, none is missing or repeated. It keeps each event's send and
receive times (the latencies are worked out once reception is over); nothing else is
decoded, so that one process keeps up with hundreds of connections (about 1 us of CPU per
event).

Subscribers are spread over several processes (``spawn``ed, each with its own event loop,
uvloop when installed): one Python process tops out below what a fast server delivers to
a thousand subscribers. Clocks are ``time.time()``, shared by every process here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import operator
import os
import re
import time
from array import array
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, cast

from bench.load import raise_open_files

__all__ = ["MARKER", "FanoutResult", "SubscriberPool", "SubscriberSpec"]

#: How the producer marks an event: ``MARKER % (seq, time.time())`` inside ``data``.
MARKER = b'"message":"fanout %d %.6f"'
# Two plain scans instead of one pattern spanning the frame (which walked every data line
# byte by byte, lazily: 2.3 us per event against 0.5): each frame's id line, and the
# producer's marker inside its data. Frames carry one of each, in the same order.
_IDS = re.compile(rb"\nid: ?([^\r\n]+)")
_NCHAN_IDS = re.compile(rb"\nid: ?(\d+):(\d+)\r?\n")
_MARKS = re.compile(rb'"message": ?"fanout (\d+) ([0-9.]+)"')
_CONNECT_BATCH = 100


@dataclass(frozen=True)
class SubscriberSpec:
    """What each subscriber asks for, and how many marked events it must receive."""

    host: str
    port: int
    path: str
    last_event_id: str
    expected: int


class _Subscriber(asyncio.Protocol):
    def __init__(self, spec: SubscriberSpec, on_state: Callable[[], None]) -> None:
        self.spec = spec
        self.on_state = on_state
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.done = False
        self.error: str | None = None
        self.received = 0
        self.last_receive = 0.0
        self._sent = array("d")  # each event's send time, as the producer wrote it
        self._received_at = array("d")  # and when it arrived
        self._seen: set[int] = set()
        self._integer_ids: bool | None = None  # the service's ids, or nchan's "<time>:<n>"
        self._last_id: Any = -1
        self._head: bytes | None = b""  # None once the response head is read
        self._chunked = False
        self._raw = b""  # body bytes still chunk-framed
        self._text = b""  # SSE text not yet ending in a blank line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        spec = self.spec
        self.transport.write(
            f"GET {spec.path} HTTP/1.1\r\nhost: {spec.host}:{spec.port}\r\n"
            f"accept: text/event-stream\r\nlast-event-id: {spec.last_event_id}\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = None
            if not head.startswith(b"HTTP/1.1 200"):
                status = head.partition(b"\r\n")[0].decode(errors="replace")
                self._fail(f"answered {status}")
                return
            self._chunked = b"transfer-encoding: chunked" in head.lower()
            if not data:
                return
        if self._chunked:
            unchunked = self._unchunk(data)
            if unchunked is None:
                return
            data = unchunked
        if not self.ready and data:
            self.ready = True
            self.on_state()
        self._scan(data, now)

    def _unchunk(self, data: bytes) -> bytes | None:
        raw = self._raw + data if self._raw else data
        pieces: list[bytes] = []
        position = 0
        size_of_raw = len(raw)
        while True:
            line_end = raw.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(raw[position:line_end].split(b";", 1)[0], 16)
            if size == 0:
                self._fail("stream ended")
                return None
            start = line_end + 2
            if start + size + 2 > size_of_raw:
                break
            pieces.append(raw[start : start + size])
            position = start + size + 2
        self._raw = raw[position:]
        return b"".join(pieces)

    def _scan(self, data: bytes, now: float) -> None:
        text = self._text + data if self._text else data
        lf = text.rfind(b"\n\n")
        crlf = text.rfind(b"\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        self._text = text[end:]
        if end == 0:
            return
        frames = b"\n" + text[:end]  # every id line, the first one too, follows a newline
        marks = _MARKS.findall(frames)
        if self._integer_ids is None:
            first = _IDS.search(frames)
            if first is None:
                return
            self._integer_ids = b":" not in first.group(1)
            self._last_id = -1 if self._integer_ids else ()
        # Whole frames at once, in C where it can be (map, set and array operations): the
        # client's CPU per event is what bounds the saturated fan-out figure.
        keys: list[Any]
        if self._integer_ids:
            keys = list(map(int, _IDS.findall(frames)))
        else:
            parts = _NCHAN_IDS.findall(frames)
            keys = [(int(at), int(number)) for at, number in parts]
        if len(keys) != len(marks):
            self._fail(f"{len(keys)} frame ids of this server's form but {len(marks)} events")
            return
        if not marks:
            return
        raw_seqs, raw_sent = zip(*marks, strict=True)
        if keys[0] <= self._last_id or not all(map(operator.lt, keys, islice(keys, 1, None))):
            self._fail(f"ids not increasing after {self._last_id}: {keys[:5]}")
            return
        seqs = set(map(int, raw_seqs))
        if len(seqs) != len(raw_seqs) or not self._seen.isdisjoint(seqs):
            self._fail("an event repeated")
            return
        if max(seqs) >= self.spec.expected:
            self._fail(f"event {max(seqs)} never produced")
            return
        self._seen |= seqs
        self._last_id = keys[-1]
        self._sent.extend(map(float, raw_sent))
        self._received_at.extend(array("d", (now,)) * len(raw_sent))
        received = self.received = len(self._sent)
        self.last_receive = now
        if received >= self.spec.expected:
            self.done = True
            self.on_state()

    @property
    def latencies_ms(self) -> array[float]:
        """Receive time - send time of every event, in ms (computed once reception is over)."""
        return array(
            "d",
            (
                (got - sent) * 1000.0
                for got, sent in zip(self._received_at, self._sent, strict=True)
            ),
        )

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.done = True
        if self.transport is not None:
            self.transport.close()
        self.on_state()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._fail(f"connection lost after {self.received} events: {exc!r}")


@dataclass
class FanoutResult:
    """What every subscriber of a pool received."""

    subscribers: int
    received: int
    complete: int
    errors: list[str]
    last_receive: float
    latencies_ms: array[float] = field(repr=False)
    #: CPU time the subscriber processes used, from connecting to reporting.
    cpu_seconds: float = 0.0
    processes: int = 1


@dataclass
class _Report:
    """One worker process's subscribers, sent back to the parent."""

    received: int
    complete: int
    errors: list[str]
    last_receive: float
    latencies_ms: bytes
    cpu_seconds: float


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _factory(subscriber: _Subscriber) -> Callable[[], _Subscriber]:
    return lambda: subscriber


async def _hold(spec: SubscriberSpec, count: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    subscribers: list[_Subscriber] = []
    cpu_started = time.process_time()
    for first in range(0, count, _CONNECT_BATCH):
        batch = [_Subscriber(spec, changed.set) for _ in range(min(_CONNECT_BATCH, count - first))]
        results = await asyncio.gather(
            *(loop.create_connection(_factory(sub), spec.host, spec.port) for sub in batch),
            return_exceptions=True,
        )
        for sub, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                sub.error = f"connect: {result!r}"
                sub.done = True
        subscribers.extend(batch)
    deadline = loop.time() + 30.0
    while not all(s.ready or s.done for s in subscribers) and loop.time() < deadline:
        changed.clear()
        with suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 0.5)
    for sub in subscribers:
        if not (sub.ready or sub.done):
            sub.error, sub.done = "no response within 30 s", True
    conn.send(sum(1 for s in subscribers if s.ready and not s.error))

    # Until the parent has sent how long to wait after its last send (the producer has
    # stopped) and every subscriber is done or that time is up. The report goes only after
    # that message has been read: a socket closed with unread data resets the connection,
    # and the report with it.
    stop_at: float | None = None
    parent_gone = False
    fileno = conn.fileno()
    loop.add_reader(fileno, changed.set)
    try:
        while True:
            if stop_at is None and conn.poll():
                loop.remove_reader(fileno)
                os.set_blocking(fileno, True)
                try:
                    stop_at = loop.time() + float(conn.recv())
                except EOFError:  # the parent gave up on this measurement
                    parent_gone = True
                    stop_at = loop.time()
            if stop_at is not None and (loop.time() >= stop_at or all(s.done for s in subscribers)):
                break
            changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.2)
    finally:
        loop.remove_reader(fileno)
        os.set_blocking(fileno, True)  # the event loop made it non-blocking
    # The CPU it took to receive and check: the latencies are worked out after it.
    cpu_seconds = time.process_time() - cpu_started
    latencies = array("d")
    errors: list[str] = []
    for sub in subscribers:
        latencies.extend(sub.latencies_ms)
        if sub.error:
            errors.append(sub.error)
        elif sub.received < spec.expected:
            errors.append(f"{sub.received} of {spec.expected} events by the deadline")
        if sub.transport is not None:
            sub.transport.close()
    if parent_gone:
        return
    conn.send(
        _Report(
            received=sum(s.received for s in subscribers),
            complete=sum(1 for s in subscribers if s.received == spec.expected and not s.error),
            errors=errors,
            last_receive=max((s.last_receive for s in subscribers), default=0.0),
            latencies_ms=latencies.tobytes(),
            cpu_seconds=cpu_seconds,
        )
    )


def _worker(spec: SubscriberSpec, count: int, conn: Connection, open_files: int) -> None:
    raise_open_files(open_files)
    loop = _new_loop()
    try:
        loop.run_until_complete(_hold(spec, count, conn))
    finally:
        loop.close()
        conn.close()


class SubscriberPool:
    """``subscribers`` SSE subscribers over ``processes`` worker processes.

    ``await pool.start()`` returns once every subscriber has its first response bytes
    (the ``retry`` frame or a comment); ``await pool.finish(grace)`` waits until each has
    received ``spec.expected`` marked events, or ``grace`` seconds, and gathers results.
    """

    def __init__(self, spec: SubscriberSpec, subscribers: int, processes: int = 2) -> None:
        self.spec = spec
        self.subscribers = subscribers
        self.processes = max(1, min(processes, subscribers))
        self._workers: list[tuple[BaseProcess, Connection]] = []

    async def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        share = [self.subscribers // self.processes] * self.processes
        for index in range(self.subscribers % self.processes):
            share[index] += 1
        open_files = max(share) * 2 + 1024
        for count in share:
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker, args=(self.spec, count, theirs, open_files), daemon=True
            )
            process.start()
            theirs.close()
            self._workers.append((process, ours))
        ready = 0
        for _, conn in self._workers:
            connected = await asyncio.to_thread(self._receive, conn, 120.0)
            assert isinstance(connected, int)
            ready += connected
        if ready != self.subscribers:
            raise RuntimeError(f"only {ready} of {self.subscribers} subscribers connected")

    @staticmethod
    def _receive(conn: Connection, timeout: float) -> object:
        if not conn.poll(timeout):
            raise TimeoutError(f"a subscriber process did not answer in {timeout} s")
        try:
            return conn.recv()
        except EOFError:
            raise RuntimeError("a subscriber process exited without reporting") from None

    async def finish(self, grace: float) -> FanoutResult:
        for _, conn in self._workers:
            conn.send(grace)
        received = complete = 0
        errors: list[str] = []
        last = cpu = 0.0
        latencies = array("d")
        for _, conn in self._workers:
            report = await asyncio.to_thread(self._receive, conn, grace + 120.0)
            assert isinstance(report, _Report)
            received += report.received
            complete += report.complete
            errors.extend(report.errors)
            last = max(last, report.last_receive)
            latencies.frombytes(report.latencies_ms)
            cpu += report.cpu_seconds
        return FanoutResult(
            self.subscribers, received, complete, errors, last, latencies, cpu, self.processes
        )

    def close(self) -> None:
        for process, conn in self._workers:
            conn.close()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._workers.clear()
