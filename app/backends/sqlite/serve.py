"""The one loop that serves a SQLite writer, whatever carries its messages.

The writer runs on a thread of the service's process (:mod:`app.backends.sqlite.thread`) or in a
process of its own (:mod:`app.backends.sqlite.process`). Either way it is driven by
:func:`serve`: messages arrive in an :class:`Inbox`, answers leave through an :class:`Outbox`,
and only the carrying differs (a queue of Python objects; frames on a socket).

The loop forms the batches: every append request that arrived while the previous transaction
was being written and synced joins the next one, so a transaction never starts before the
requests already sent are in it, and it waits only when there is nothing to write. Between
two transactions it answers probes, makes guarded writes, and holds still for another writer's
turn. A guarded write that ``yields`` (a purge's deletes) waits until no append is waiting and
the WAL is not about to start over (app/backends/sqlite/checkpoints.py), or
:data:`YIELD_SECONDS` at most, so background work fills the gaps between appends instead of
holding them up, and still moves on under appends that never pause.

Messages, by kind (:data:`ASKS`, answered with :data:`ANSWERS`):

    APPEND   requests to append (all or nothing each)     -> COMMITTED, once per transaction
    HOLD     stop between two transactions until RELEASE  -> HOLDING, when stopped
    RELEASE  the end of a turn (also of one given up before it was reached)
    PROBE    what stops writes now                        -> PROBED
    WRITE    a guarded write                              -> WRITTEN
    STOP     commit what is waiting, then stop            -> STOPPED
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, Protocol

from app.backends.base import GuardedWrite, take_group
from app.backends.sqlite.writer import SqliteWriter
from app.events.envelope import NewEvent
from app.events.plan import Plan

__all__ = ["YIELD_SECONDS", "Answer", "Ask", "Inbox", "Outbox", "serve"]

logger = logging.getLogger(__name__)

#: The longest a yielding guarded write waits for a moment with no append waiting (and the
#: WAL not about to start over).
YIELD_SECONDS = 0.1
_RESTART_POLL_SECONDS = 0.002


class Ask(IntEnum):
    """What the service asks of the writer."""

    APPEND = 1
    HOLD = 2
    RELEASE = 3
    PROBE = 4
    WRITE = 5
    STOP = 6


class Answer(IntEnum):
    """What the writer answers (READY and FAILED only once, when it starts apart)."""

    COMMITTED = 11
    HOLDING = 12
    PROBED = 13
    WRITTEN = 14
    STOPPED = 15
    READY = 16
    FAILED = 17


class Inbox(Protocol):
    def next(self, timeout: float | None) -> tuple[Ask, Any] | None:
        """The next message; None if none came within ``timeout`` seconds (None: wait for
        one). Raises EOFError when nobody can send any more."""
        ...


class Outbox(Protocol):
    def committed(self, group: list[Any], outcome: Plan | Exception, seconds: float) -> None:
        """One transaction's outcome: the requests it held, in commit order."""
        ...

    def answer(self, kind: Answer, body: Any) -> None: ...


def serve(
    writer: SqliteWriter,
    inbox: Inbox,
    outbox: Outbox,
    *,
    max_batch: int,
    events_of: Callable[[Any], Sequence[NewEvent]],
) -> None:
    """Serve ``writer`` until asked to stop (see the module's docstring). ``events_of`` gives
    the events of one append request as the inbox carries it."""
    _Loop(writer, inbox, outbox, max_batch, events_of).run()


class _Loop:
    def __init__(
        self,
        writer: SqliteWriter,
        inbox: Inbox,
        outbox: Outbox,
        max_batch: int,
        events_of: Callable[[Any], Sequence[NewEvent]],
    ) -> None:
        self._writer = writer
        self._inbox = inbox
        self._outbox = outbox
        self._max_batch = max_batch
        self._events_of = events_of
        self._waiting: deque[Any] = deque()
        #: Yielding guarded writes, with the time each arrived, in arrival order.
        self._yielding: deque[tuple[int, GuardedWrite, float]] = deque()
        #: Turns released before they were reached (given up by their caller).
        self._released: set[int] = set()
        #: Turns asked for while one is held: each is taken once the held one ends.
        self._turns: deque[int] = deque()
        self._stopping = False
        self._handlers: dict[Ask, Callable[[Any], None]] = {
            Ask.APPEND: self._waiting.extend,
            Ask.HOLD: self._turns.append,
            Ask.RELEASE: self._released.add,
            Ask.PROBE: self._probe,
            Ask.WRITE: self._write,
            Ask.STOP: self._stop,
        }

    def run(self) -> None:
        while True:
            idle = not self._waiting and not self._yielding and not self._stopping
            timeout = None if idle else 0.0
            if self._yielding and not self._waiting and self._writer.restarting():
                # Held back until the WAL starts over; look again shortly.
                timeout = _RESTART_POLL_SECONDS
            while (message := self._inbox.next(timeout)) is not None:
                timeout = 0.0
                self._handle(message)
                while self._turns:
                    self._hold(self._turns.popleft())
            if self._yielding and (
                not (self._waiting or self._writer.restarting())
                or time.monotonic() - self._yielding[0][2] >= YIELD_SECONDS
            ):
                token, write, _ = self._yielding.popleft()
                self._make(token, write)
            elif self._waiting:
                self._commit()
            elif self._stopping:
                self._outbox.answer(Answer.STOPPED, None)
                return

    def _handle(self, message: tuple[Ask, Any]) -> None:
        kind, body = message
        self._handlers[kind](body)

    def _commit(self) -> None:
        events_of = self._events_of
        group = take_group(self._waiting, self._max_batch, lambda request: len(events_of(request)))
        started = time.perf_counter()
        outcome = self._writer.commit([events_of(request) for request in group])
        self._outbox.committed(group, outcome, time.perf_counter() - started)

    def _probe(self, token: int) -> None:
        self._outbox.answer(Answer.PROBED, (token, self._writer.probe()))

    def _write(self, body: tuple[int, GuardedWrite]) -> None:
        token, write = body
        if write.yields:
            self._yielding.append((token, write, time.monotonic()))
        else:
            self._make(token, write)

    def _make(self, token: int, write: GuardedWrite) -> None:
        answer: bool | str
        try:
            answer = self._writer.write_guarded(write)
        except Exception as exc:
            answer = str(exc)
        self._outbox.answer(Answer.WRITTEN, (token, answer))

    def _stop(self, _body: None) -> None:
        self._stopping = True

    def _hold(self, turn: int) -> None:
        """Stop between two transactions until the turn is released (or the busy timeout)."""
        if turn in self._released:  # given up before it was reached
            self._released.discard(turn)
            return
        self._outbox.answer(Answer.HOLDING, turn)
        limit = self._writer.busy_ms / 1000
        deadline = time.monotonic() + limit
        while turn not in self._released:
            message = self._inbox.next(max(0.0, deadline - time.monotonic()))
            if message is None:
                # The lock itself is SQLite's; past this, appends wait for it there instead.
                logger.warning("a writer held its turn for more than %g s; appending again", limit)
                return
            self._handle(message)
        self._released.discard(turn)
