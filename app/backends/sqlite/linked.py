"""The service's side of a SQLite writer served by :func:`app.backends.sqlite.serve.serve`:
what both appenders (on a thread, in a process) do alike, on the event loop.

A turn, a probe and a guarded write are each a message with a token, and the writer's answer
to it resolves the future waiting under that token; only :meth:`LinkedAppender._send` (and how
answers come back) differs between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.backends.base import AppendRequest, GuardedWrite, OnCommit
from app.backends.sqlite.serve import Answer, Ask
from app.events.errors import LogUnavailable

__all__ = ["LinkedAppender"]


class LinkedAppender(ABC):
    """An appender whose writer answers its messages (see the module's docstring)."""

    def __init__(self) -> None:
        self._on_commit: OnCommit | None = None
        self._tokens = 0
        self._holding: dict[int, asyncio.Future[None]] = {}
        self._probes: dict[int, asyncio.Future[str | None]] = {}
        self._writes: dict[int, asyncio.Future[bool | str]] = {}
        self._answers: dict[Answer, Callable[[Any], None]] = {
            Answer.HOLDING: self._held,
            Answer.PROBED: self._probed,
            Answer.WRITTEN: self._written,
        }

    # -- what a transport provides ----------------------------------------------------------

    @abstractmethod
    def _send(self, kind: Ask, body: Any) -> None:
        """Hand a message to the writer (on the event loop)."""

    @property
    @abstractmethod
    def _connected(self) -> bool:
        """Whether a writer is there to answer."""

    @abstractmethod
    async def _ensure_writer(self) -> None:
        """Start a writer if there is none and one can be started (a process that died)."""

    def _unavailable(self) -> str:
        return "the event log is closed"

    # -- the Appender interface -------------------------------------------------------------

    @abstractmethod
    async def start(self, on_commit: OnCommit) -> None: ...

    @abstractmethod
    def submit(self, requests: list[AppendRequest]) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold appends between two transactions while the caller writes to the database with
        a connection of its own (a projection step under the lock).

        The caller's ``BEGIN IMMEDIATE`` then finds SQLite's write lock free, and appends go
        on the moment it is done. Left to SQLite's busy handler, a writer retries with sleeps
        growing to 100 ms, and the appender, which takes the lock again as soon as it commits,
        wins nearly every retry. The turn orders the writers only; the lock stays SQLite's,
        so a turn held past the busy timeout lets appends go back to waiting for the lock.
        """
        if not self._connected:  # closed or between two writers: no appends to hold
            yield
            return
        turn = self._token()
        holding: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._holding[turn] = holding
        self._send(Ask.HOLD, turn)
        try:
            await holding
            yield
        finally:
            self._holding.pop(turn, None)
            # Also when the turn was given up before the writer reached it: it then skips it.
            if self._connected:
                self._send(Ask.RELEASE, turn)

    async def probe(self) -> str | None:
        if not self._connected:
            return self._unavailable()
        token = self._token()
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._probes[token] = answer
        self._send(Ask.PROBE, token)
        return await answer

    async def write_guarded(self, write: GuardedWrite) -> bool:
        """Make ``write`` on the writer's connection, between two of its transactions: False
        (nothing written) if its guard did not read what it expected."""
        await self._ensure_writer()
        if not self._connected:
            raise LogUnavailable(self._unavailable())
        token = self._token()
        done: asyncio.Future[bool | str] = asyncio.get_running_loop().create_future()
        self._writes[token] = done
        self._send(Ask.WRITE, (token, write))
        written = await done
        if isinstance(written, str):
            raise LogUnavailable(written)
        return written

    # -- answers, on the event loop ---------------------------------------------------------

    def _answered(self, kind: Answer, body: Any) -> None:
        self._answers[kind](body)

    def _held(self, turn: int) -> None:
        _resolve(self._holding, turn, None)

    def _probed(self, body: tuple[int, str | None]) -> None:
        _resolve(self._probes, *body)

    def _written(self, body: tuple[int, bool | str]) -> None:
        _resolve(self._writes, *body)

    def _answer_everyone(self, problem: str) -> None:
        """The writer is gone: whoever waits for it hears so."""
        for turn in list(self._holding):
            _resolve(self._holding, turn, None)
        for token in list(self._probes):
            _resolve(self._probes, token, problem)
        for token in list(self._writes):
            _resolve(self._writes, token, problem)

    def _refuse(self, requests: list[AppendRequest], failure: LogUnavailable) -> None:
        if requests and self._on_commit is not None:
            self._on_commit(requests, failure, 0.0)

    def _token(self) -> int:
        self._tokens += 1
        return self._tokens


def _resolve(pending: dict[int, asyncio.Future[Any]], token: int, value: Any) -> None:
    """Answer the caller waiting under ``token`` (gone if it stopped waiting)."""
    waiting = pending.pop(token, None)
    if waiting is not None and not waiting.done():
        waiting.set_result(value)
