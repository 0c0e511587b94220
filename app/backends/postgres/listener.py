"""LISTEN for other processes' appends: their committed rows, or a wake-up, for this process's
feed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.backends.postgres.notifications import decode
from app.events.envelope import Event
from app.runtime.background import Background

__all__ = ["PostgresListener"]

logger = logging.getLogger(__name__)


def _on_termination(lost: asyncio.Event) -> Callable[[Any], None]:
    def terminated(_connection: Any) -> None:
        lost.set()

    return terminated


class PostgresListener:
    """LISTEN on the append channel; wakes the feed, re-LISTENs after the connection drops."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_notify: Callable[[int], None],
        own: Callable[[], int | None] | None = None,
        on_events: Callable[[Sequence[Event]], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_notify = on_notify
        # The server process of this process's appender: its commits reach the feed from the
        # appender itself, and a wake-up for them would only read them again.
        self._own = own
        self._on_events = on_events
        self.events_received = 0
        self._task = Background("postgres-listener")
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    def _notified(self, _connection: Any, pid: int, _channel: str, payload: str) -> None:
        if self._own is not None and pid == self._own():
            return
        try:
            said = decode(payload)
        except msgspec.DecodeError:
            logger.warning("a notification on %s could not be read; reading the table", pid)
            said = 0
        if isinstance(said, int):
            self._on_notify(said)
        elif self._on_events is None:
            self._on_notify(said[-1].position)
        else:
            self.events_received += len(said)
            self._on_events(said)

    async def _run(self) -> None:
        import asyncpg

        delay = 0.1
        while True:
            lost = asyncio.Event()
            connection: Any = None
            try:
                connection = await asyncpg.connect(self._dsn)
                connection.add_termination_listener(_on_termination(lost))
                await connection.add_listener(self._channel, self._notified)
                self.connected.set()
                delay = 0.1
                # Whatever was appended while we were not listening is fetched now.
                self._on_notify(0)
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 5.0)
                    except TimeoutError:
                        # A half-open connection never reports its loss; a query does.
                        await asyncio.wait_for(connection.fetchval("SELECT 1"), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            # Wake the feed: the fallback poll covers the gap, but sooner is better.
            self._on_notify(0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
