"""SQLite appends on a thread of the service's process.

The thread runs :func:`~app.backends.sqlite.serve.serve` over a queue: it forms the batches,
starting the next transaction the moment one commits with every request handed over in the
meantime, without a round trip through the event loop. The loop hands requests over once per
burst and hears back once per transaction, so the two overlap: the loop acknowledges one batch
(and its callers append again) while the thread writes and syncs the next.

The thread shares the event loop's GIL (SQLite lets go of it around its work and wins it back
after), which the writer process (:mod:`app.backends.sqlite.process`) avoids. The thread costs
no process of its own, and each commit no round trip through a socket: it is the appender for
a command that only reads the log, and for many producers in one process each waiting for its
own small commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

from app.backends.base import AppendRequest, OnCommit
from app.backends.sqlite.linked import LinkedAppender
from app.backends.sqlite.serve import Answer, Ask, serve
from app.backends.sqlite.writer import WriterOptions
from app.events.envelope import NewEvent
from app.events.plan import Plan

__all__ = ["ThreadAppender"]


class ThreadAppender(LinkedAppender):
    """Runs each batch as one transaction on the appender's own thread."""

    def __init__(self, options: WriterOptions) -> None:
        super().__init__()
        self._writer = options.writer()
        self._max_batch = options.max_batch
        self._inbox: queue.SimpleQueue[tuple[Ask, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None

    async def start(self, on_commit: OnCommit) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._on_commit = on_commit
        connected: asyncio.Future[BaseException | None] = loop.create_future()
        self._stopped = loop.create_future()
        thread = threading.Thread(
            target=self._run, args=(connected,), name="sqlite-append", daemon=True
        )
        thread.start()
        failure = await connected
        if failure is not None:
            thread.join()
            raise failure
        self._thread = thread

    def _run(self, connected: asyncio.Future[BaseException | None]) -> None:
        """The thread: connect, then serve until told to stop."""
        try:
            self._writer.connect()
        except BaseException as exc:
            self._call(_settle, connected, exc)
            return
        self._call(_settle, connected, None)
        try:
            serve(self._writer, self, self, max_batch=self._max_batch, events_of=_events_of)
        finally:
            self._writer.close()

    # -- the thread's Inbox and Outbox ------------------------------------------------------

    def next(self, timeout: float | None) -> tuple[Ask, Any] | None:
        try:
            return self._inbox.get(block=timeout != 0.0, timeout=timeout or None)
        except queue.Empty:
            return None

    def committed(
        self, group: list[AppendRequest], outcome: Plan | Exception, seconds: float
    ) -> None:
        assert self._on_commit is not None
        self._call(self._on_commit, group, outcome, seconds)

    def answer(self, kind: Answer, body: Any) -> None:
        if kind is Answer.STOPPED:
            assert self._stopped is not None
            self._call(_settle, self._stopped, None)
        else:
            self._call(self._answered, kind, body)

    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the event loop is gone, and nobody waits for an answer any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    # -- the service's side -----------------------------------------------------------------

    def _send(self, kind: Ask, body: Any) -> None:
        self._inbox.put((kind, body))

    @property
    def _connected(self) -> bool:
        return self._thread is not None

    async def _ensure_writer(self) -> None:
        """Nothing to start: the thread runs from start() to close()."""

    def submit(self, requests: list[AppendRequest]) -> None:
        self._inbox.put((Ask.APPEND, requests))

    async def close(self) -> None:
        """Commit every request submitted so far, then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._inbox.put((Ask.STOP, None))
        assert self._stopped is not None
        await self._stopped
        self._answer_everyone(self._unavailable())
        thread.join()  # it has nothing left to do but return


def _events_of(request: AppendRequest) -> Sequence[NewEvent]:
    return request.events


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
