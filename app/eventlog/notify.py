"""Wake-ups for tailers, and the in-process window of the log's newest events.

A :class:`LogFeed` knows the highest committed position this process has seen and keeps the
events just below it in a bounded ring, so that a thousand tailers that are caught up share one
read of the table (and one encoding of each event) instead of each querying it. The table stays
the data: the ring is only ever filled in position order from committed rows, and a tailer that
falls behind the ring reads the table itself. A wake-up carries no data; after one, readers
re-read ``position > last``.

Sources of wake-ups: this process's appender (which hands over its committed batch), the
backend's listener for other processes' appends (:meth:`~app.backends.base.Backend.listener`),
and a slow fallback poll, since a notification can be lost (across reconnects, behind
transaction-pooling proxies) and some databases have none at all.

A caught-up tail with a :class:`Sink` is not woken at all: it is *parked*, and after each
advance one pass over the parked tails hands every one of them the new entries through its
sink (for SSE, a write straight to its connection: :mod:`app.api.sse.fanout`), its task left
asleep. A sink that cannot take them at once refuses, and its tail is woken to take them
itself, as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from itertools import islice
from typing import Any, Protocol

import msgspec

from app.events.envelope import Event, encode_event
from app.runtime.background import Background

__all__ = ["FanoutBatch", "LogEntry", "LogFeed", "Sink", "Subscription"]

logger = logging.getLogger(__name__)

#: Seconds of spacing between two rounds of waking idle tails, per idle tail (about what
#: waking one and writing its frame costs), and the most it grows to. Parked tails (served
#: by the fan-out pass) are not woken, and do not count.
WAKE_COST = 20e-6
MAX_WAKE_SPACING = 0.025


class LogEntry(msgspec.Struct, gc=False):
    """An event with its encodings, computed once and shared by every subscriber.

    An entry read from the table for one replay (``shared=False``) has one reader: its frames
    are built when asked for and not kept, which spares a cache per event. A struct, not a
    class with ``__slots__``: one is made per event appended and per event replayed, and a
    struct is made in C, for a fraction of what a Python ``__init__`` costs.
    """

    event: Event
    shared: bool = True
    _envelope: bytes | None = None
    _payload: dict[str, Any] | None = None
    _frames: dict[str, bytes] | None = None

    @property
    def position(self) -> int:
        return self.event.position

    def envelope_json(self) -> bytes:
        if self._envelope is None:
            self._envelope = encode_event(self.event)
        return self._envelope

    def payload(self) -> dict[str, Any]:
        if self._payload is None:
            self._payload = self.event.payload_dict()
        return self._payload

    def frame(self, kind: str, build: Callable[[LogEntry], bytes]) -> bytes:
        if not self.shared:
            return build(self)
        frames = self._frames
        if frames is None:
            frames = self._frames = {}
        found = frames.get(kind)
        if found is None:
            found = frames[kind] = build(self)
        return found


ReadAfter = Callable[[int, int], Awaitable[list[Event]]]


def _cost(event: Event) -> int:
    # An entry holds the payload, and in time its envelope and a frame or two built from it.
    return 3 * len(event.payload) + 256


class FanoutBatch:
    """What one fan-out pass hands the sinks of the tails parked at one position: the entries
    after it, and a place where sinks share what they derive from them (a frame encoded once
    for every sink that wants the same)."""

    __slots__ = ("entries", "shared")

    def __init__(self, entries: list[LogEntry]) -> None:
        self.entries = entries
        self.shared: dict[Any, Any] = {}


class Sink(Protocol):
    """How a parked tail takes entries without its task (see :meth:`LogFeed.wait`)."""

    def deliver(self, batch: FanoutBatch) -> bool:
        """Hand over ``batch.entries`` at once; False (nothing handed over) when it cannot,
        and the tail's task takes them itself."""
        ...


class Subscription:
    """One tail's place in the log: every position up to ``delivered`` was handed over.

    While its tail is idle, ``waiter`` is the future it sleeps on (see :meth:`LogFeed.wait`)
    and ``expiry`` the tick of its idle timeout. A tail with a ``sink`` is parked while idle:
    the fan-out pass hands it what is new and moves ``delivered``; ``active`` is the loop
    time of the last such hand-over, which puts its idle timeout (``idle`` seconds) off.
    """

    __slots__ = ("active", "delivered", "expiry", "idle", "sink", "waiter")

    def __init__(self, delivered: int, sink: Sink | None = None) -> None:
        self.delivered = delivered
        self.waiter: asyncio.Future[bool] | None = None
        self.expiry: int | None = None
        self.sink = sink
        self.idle: float | None = None
        self.active = -math.inf


#: The idle timeouts' granularity, in seconds: a timeout ends up to this much late, and every
#: timeout due in the same tick is handled by one timer callback.
TICK_SECONDS = 0.02


class _IdleTimers:
    """The idle timeouts of every waiting subscription, on one loop timer: a subscription is
    filed under the tick its timeout falls in, and a timeout cut short by an advance is taken
    out of its tick's set (no timer handle per subscription, none left behind)."""

    __slots__ = ("_due", "_expire", "_scheduled", "_ticks", "_timer")

    def __init__(self, expire: Callable[[Subscription], None]) -> None:
        self._expire = expire
        self._due: dict[int, set[Subscription]] = {}
        self._ticks: list[int] = []  # a heap of the keys of _due
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = 0

    def add(self, subscription: Subscription, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        tick = math.ceil((loop.time() + seconds) / TICK_SECONDS)
        subscription.expiry = tick
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = set()
            heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._scheduled:
                self._schedule(loop, tick)
        due.add(subscription)

    def remove(self, subscription: Subscription) -> None:
        tick, subscription.expiry = subscription.expiry, None
        if tick is not None:
            due = self._due.get(tick)
            if due is not None:
                due.discard(subscription)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, loop: asyncio.AbstractEventLoop, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._scheduled = tick
        self._timer = loop.call_at(tick * TICK_SECONDS, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        # A timer may fire a little early (the loop's clock resolution): a tick counts as due
        # within a tenth of a tick.
        now = loop.time() / TICK_SECONDS + 0.1
        ticks = self._ticks
        while ticks and ticks[0] <= now:
            for subscription in self._due.pop(heapq.heappop(ticks)):
                subscription.expiry = None
                self._expire(subscription)
        if ticks:
            self._schedule(loop, ticks[0])


class LogFeed:
    """The newest committed events of the log, as seen by this process."""

    def __init__(
        self,
        read_after: ReadAfter,
        *,
        head: int,
        capacity: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        poll_seconds: float = 1.0,
    ) -> None:
        self._read_after = read_after
        self._capacity = capacity
        # Large payloads shorten the window instead of growing the process without bound.
        self._max_bytes = max_bytes
        self._bytes = 0
        self._poll_seconds = poll_seconds
        self._ring: deque[LogEntry] = deque()
        self._head = head
        self._changed = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()
        self._follower = Background("log-feed-follower")
        self.subscribers = 0
        self._subscriptions: set[Subscription] = set()
        # The idle ones: an advance resolves each one's waiter (an idle tail costs a future,
        # not a task, a timer or a queue of its own).
        self._waiting: set[Subscription] = set()
        # The idle ones with a sink: served by the fan-out pass, their waiters left pending.
        self._parked: set[Subscription] = set()
        self._timers = _IdleTimers(self._expire)
        self._round: asyncio.TimerHandle | None = None
        self._last_round = -float("inf")
        self._pass: asyncio.Handle | None = None
        #: Hand-overs made by sinks in fan-out passes, and those refused (the tail woken).
        self.fanout_delivered = 0
        self.fanout_refused = 0

    @property
    def head(self) -> int:
        """Every position up to this one is committed and visible to readers."""
        return self._head

    def start(self) -> None:
        self._follower.start(self._follow())

    async def close(self) -> None:
        self._timers.close()
        if self._round is not None:
            self._round.cancel()
            self._round = None
        if self._pass is not None:
            self._pass.cancel()
            self._pass = None
        await self._follower.stop()

    def subscribe(self, after: int, sink: Sink | None = None) -> Subscription:
        """A tail's place, after ``after``; with a ``sink``, the tail is parked while idle
        (see :meth:`wait`)."""
        subscription = Subscription(after, sink)
        self._subscriptions.add(subscription)
        self.subscribers += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        self._stop_waiting(subscription)
        self.subscribers -= 1

    def wait(
        self, subscription: Subscription, position: int, idle_timeout: float | None
    ) -> asyncio.Future[bool]:
        """A future resolved at the next advance of the head (True) or after ``idle_timeout``
        seconds (False); resolved already if the head is past ``position``, the last one the
        caller saw, so that an advance while it was not waiting is never missed.

        Nothing but the future is allocated for the wait (no task, no timer handle): idle
        tails cost little however many there are. A cancelled wait is cleared at the next
        wait, advance, timeout or :meth:`unsubscribe`.

        A subscription with a sink, at ``position`` = its ``delivered``, is parked instead of
        woken: each advance is handed to its sink by the fan-out pass, and ``delivered``
        moves on while the future stays pending. The future resolves only when the sink
        refuses (True: the caller takes the entries after ``delivered`` itself) or after
        ``idle_timeout`` seconds without a hand-over (False). A caller resumed either way
        carries on from ``delivered``, not from ``position``.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._stop_waiting(subscription)
        if self._head > position:
            waiter.set_result(True)
            return waiter
        subscription.waiter = waiter
        if subscription.sink is not None and subscription.delivered == position:
            subscription.idle = idle_timeout
            self._parked.add(subscription)
        else:
            self._waiting.add(subscription)
        if idle_timeout is not None:
            self._timers.add(subscription, idle_timeout)
        return waiter

    def _stop_waiting(self, subscription: Subscription) -> None:
        subscription.waiter = None
        self._waiting.discard(subscription)
        self._parked.discard(subscription)
        self._timers.remove(subscription)

    def _expire(self, subscription: Subscription) -> None:
        if subscription in self._parked and subscription.idle is not None:
            # Handed entries since its timeout was set: idle only from the last hand-over.
            # (Within a tick of it, it is due now: filed again, it could fall in the tick
            # being fired, and be fired again and again.)
            left = subscription.active + subscription.idle - asyncio.get_running_loop().time()
            if left > TICK_SECONDS:
                self._timers.add(subscription, left)
                return
        waiter, subscription.waiter = subscription.waiter, None
        self._waiting.discard(subscription)
        self._parked.discard(subscription)
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def max_lag(self) -> int:
        """How many positions the furthest-behind tail has yet to be handed (0: none)."""
        if not self._subscriptions:
            return 0
        return max(0, self._head - min(s.delivered for s in self._subscriptions))

    @property
    def window_bytes(self) -> int:
        return self._bytes

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next advance of the head. Take it *before* reading, then
        compare with :attr:`head`: an advance in between is never missed."""
        return self._changed

    def entries_after(self, position: int) -> list[LogEntry] | None:
        """The entries after ``position`` up to the head, or None if the ring no longer (or
        not yet) holds them all and the caller must read the table."""
        if position >= self._head:
            return []
        ring = self._ring
        if not ring or ring[0].position > position + 1:
            return None
        start = position + 1 - ring[0].position
        if start == 0:
            return list(ring)
        # Taken from the right-hand end, where the wanted entries are: indexing a deque walks
        # it from an end for each entry, which grows with the ring.
        found = list(islice(reversed(ring), len(ring) - start))
        found.reverse()
        return found

    def publish(self, events: Sequence[Event]) -> None:
        """Hand over committed events (this process's appender's, or another process's from
        its notification); contiguous ones go straight into the ring, anything else (another
        writer's rows in between) is read from the table."""
        if not events:
            return
        if events[0].position == self._head + 1:
            self._extend(events)
        elif events[-1].position > self._head:
            self.wake()

    def advance_to(self, position: int) -> None:
        """Another process committed up to ``position`` (a NOTIFY; 0 when unknown, as after a
        reconnect): fetch what is new."""
        if position <= 0 or position > self._head:
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def forget_through(self, position: int) -> None:
        """Drop the entries up to ``position`` (retention removed events among them from the
        table): readers that far back read the table, and hear what it no longer holds."""
        ring = self._ring
        while ring and ring[0].position <= position:
            self._bytes -= _cost(ring.popleft().event)

    def _extend(self, events: Sequence[Event]) -> None:
        ring = self._ring
        for event in events:
            if ring and event.position != ring[-1].position + 1:
                # The ring's positions are contiguous (entries_after counts on it): after a
                # gap retention left in the table, it starts again.
                ring.clear()
                self._bytes = 0
            ring.append(LogEntry(event))
            self._bytes += _cost(event)
        while len(ring) > 1 and (len(ring) > self._capacity or self._bytes > self._max_bytes):
            self._bytes -= _cost(ring.popleft().event)
        self._head = events[-1].position
        loop = asyncio.get_running_loop()
        changed, self._changed = self._changed, loop.create_future()
        changed.set_result(None)
        self._wake_waiters()
        if self._parked and self._pass is None:
            # On the next turn of the loop: advances that land before it (commits read
            # together, a busy loop) go out in one pass, one write per tail.
            self._pass = loop.call_soon(self._fan_out)

    def _wake_waiters(self) -> None:
        """Resolve the idle tails' waiters: at once, unless the last round was less than
        :meth:`_spacing` ago, in which case one round is due at the end of that spacing.

        Under a stream of small commits, waking every tail for every commit costs a task
        wake-up per tail per commit; spaced rounds hand each tail all the commits since the
        last one in one write (the tails that are not idle read the ring as they go). The
        spacing grows with the number of idle tails and stays at a few milliseconds, so it
        bounds the fan-out's CPU without being seen in its latency."""
        if self._round is not None:
            return  # a round is due already
        loop = asyncio.get_running_loop()
        due = self._last_round + self._spacing()
        if loop.time() >= due:
            self._wake_round()
        else:
            self._round = loop.call_at(due, self._wake_round)

    def _spacing(self) -> float:
        return min(MAX_WAKE_SPACING, WAKE_COST * len(self._waiting))

    def _fan_out(self) -> None:
        """One pass over the parked tails: each sink is handed the entries after its tail's
        position up to the head, the tails at one position sharing one
        :class:`FanoutBatch`; a tail whose sink refuses is woken to take them itself.

        Only committed entries are in the ring, so nothing is handed over before its commit
        is durable; a position the ring no longer holds wakes the tail, which reads the
        table (and hears what retention removed)."""
        self._pass = None
        head = self._head
        now = asyncio.get_running_loop().time()
        batches: dict[int, FanoutBatch | None] = {}
        refused: list[Subscription] = []
        delivered = 0
        for subscription in tuple(self._parked):
            position = subscription.delivered
            if position >= head:
                continue
            if position in batches:
                batch = batches[position]
            else:
                entries = self.entries_after(position)
                batch = batches[position] = None if entries is None else FanoutBatch(entries)
            sink = subscription.sink
            try:
                taken = batch is not None and sink is not None and sink.deliver(batch)
            except Exception:
                logger.exception("a fan-out sink failed; its tail takes the entries itself")
                taken = False
            if taken:
                subscription.delivered = head
                subscription.active = now
                delivered += 1
            else:
                refused.append(subscription)
        self.fanout_delivered += delivered
        self.fanout_refused += len(refused)
        for subscription in refused:
            waiter = subscription.waiter
            self._stop_waiting(subscription)
            if waiter is not None and not waiter.done():
                waiter.set_result(True)

    def _wake_round(self) -> None:
        self._round = None
        self._last_round = asyncio.get_running_loop().time()
        waiting, self._waiting = self._waiting, set()
        for subscription in waiting:
            waiter, subscription.waiter = subscription.waiter, None
            self._timers.remove(subscription)
            if waiter is not None and not waiter.done():
                waiter.set_result(True)

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            self._wake.clear()
            try:
                await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("log feed could not read the table; retrying", exc_info=True)

    async def _catch_up(self) -> None:
        while True:
            events = await self._read_after(self._head, 1000)
            # The appender may have advanced the head while this read was in flight.
            events = [event for event in events if event.position > self._head]
            if not events:
                return
            if events[0].position != self._head + 1:
                # Positions are gapless except where a log was imported from an offset.
                self._ring.clear()
                self._bytes = 0
            self._extend(events)
            if len(events) < 1000:
                return
