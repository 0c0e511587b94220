"""The feed's wake-ups of idle tails: every advance reaches every waiting tail, and under a
stream of commits the rounds of waking many tails are spaced, not one per commit; parked tails
are handed each advance by the fan-out pass, unwoken."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from app.eventlog.notify import MAX_WAKE_SPACING, WAKE_COST, FanoutBatch, LogFeed
from app.events.envelope import Event


def _event(position: int) -> Event:
    return Event(
        position=position,
        stream="agent",
        source_id="a",
        version=position,
        event="progress",
        event_id=f"00000000-0000-7000-8000-{position:012d}",
        timestamp="2026-01-01T00:00:00.000Z",
        payload=msgspec.Raw(b"{}"),
    )


async def _nothing(after: int, limit: int) -> list[Event]:
    return []


async def test_many_idle_tails_are_woken_in_spaced_rounds_and_none_is_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feed = LogFeed(_nothing, head=0)
    tails = [feed.subscribe(0) for _ in range(600)]
    spacing = min(MAX_WAKE_SPACING, WAKE_COST * len(tails))
    loop = asyncio.get_running_loop()
    try:
        first = [feed.wait(tail, 0, None) for tail in tails]
        feed.publish([_event(1)])
        first_round_at = loop.time()
        # The first round after a quiet spell is at once.
        assert all(waiter.done() and waiter.result() for waiter in first)

        second = [feed.wait(tail, 1, None) for tail in tails]
        # The next commits come within the spacing of that round, however long a busy machine
        # took to make the waiters above: the loop's clock reads as it did at the round.
        with monkeypatch.context() as frozen:
            frozen.setattr(loop, "time", lambda: first_round_at)
            feed.publish([_event(2)])
            feed.publish([_event(3)])
        assert not any(waiter.done() for waiter in second)  # within the spacing: one round due
        # A tail that looks again meanwhile sees the new head at once (nothing is held back).
        assert feed.wait(feed.subscribe(1), 1, None).done()
        await asyncio.wait_for(asyncio.gather(*second), timeout=spacing + 1.0)
        assert all(waiter.result() for waiter in second)
        assert feed.entries_after(1) is not None
        assert [entry.position for entry in feed.entries_after(1) or []] == [2, 3]
    finally:
        await feed.close()


async def test_a_lone_tail_is_woken_by_every_commit_without_delay() -> None:
    feed = LogFeed(_nothing, head=0)
    tail = feed.subscribe(0)
    try:
        for position in range(1, 6):
            waiter = feed.wait(tail, position - 1, None)
            await asyncio.sleep(0.001)  # more than one tail's spacing
            feed.publish([_event(position)])
            assert waiter.done()
            assert waiter.result()
    finally:
        await feed.close()


# --- parked tails: the fan-out pass ----------------------------------------------------------


class _Sink:
    """Takes what it is handed, up to ``takes`` hand-overs (then refuses)."""

    def __init__(self, takes: int = 1_000_000) -> None:
        self.takes = takes
        self.batches: list[FanoutBatch] = []

    def deliver(self, batch: FanoutBatch) -> bool:
        if len(self.batches) >= self.takes:
            return False
        self.batches.append(batch)
        return True

    @property
    def positions(self) -> list[list[int]]:
        return [[entry.position for entry in batch.entries] for batch in self.batches]


async def _next_pass() -> None:
    await asyncio.sleep(0)  # the pass runs on the loop's next turn after an advance


async def test_parked_tails_are_handed_each_advance_without_being_woken() -> None:
    feed = LogFeed(_nothing, head=0)
    sinks = [_Sink() for _ in range(50)]
    tails = [feed.subscribe(0, sink) for sink in sinks]
    try:
        waiters = [feed.wait(tail, 0, None) for tail in tails]
        feed.publish([_event(1)])
        await _next_pass()
        # Two commits before the pass runs: handed over together, in order.
        feed.publish([_event(2)])
        feed.publish([_event(3), _event(4)])
        await _next_pass()
        assert all(sink.positions == [[1], [2, 3, 4]] for sink in sinks)
        assert not any(waiter.done() for waiter in waiters), "a parked tail was woken"
        assert [tail.delivered for tail in tails] == [4] * len(tails)
        # The tails at one position share one batch (what a sink derives from it, once).
        assert len({id(sink.batches[1]) for sink in sinks}) == 1
        assert feed.fanout_delivered == 2 * len(tails)
        assert feed.max_lag() == 0
    finally:
        await feed.close()


async def test_a_tail_whose_sink_refuses_is_woken_and_goes_on_from_what_was_handed_over() -> None:
    feed = LogFeed(_nothing, head=0)
    taking, refusing = _Sink(), _Sink(takes=1)
    tails = [feed.subscribe(0, taking), feed.subscribe(0, refusing)]
    try:
        waiters = [feed.wait(tail, 0, None) for tail in tails]
        feed.publish([_event(1)])
        await _next_pass()
        feed.publish([_event(2)])
        await _next_pass()
        assert taking.positions == [[1], [2]]
        assert refusing.positions == [[1]]
        assert not waiters[0].done()
        assert waiters[1].done()
        assert waiters[1].result() is True
        # Woken at 1: it takes what follows from the ring itself.
        assert tails[1].delivered == 1
        assert [entry.position for entry in feed.entries_after(1) or []] == [2]
        assert feed.fanout_refused == 1
        # Having taken it, parked again, it is served again.
        tails[1].delivered = 2
        feed.wait(tails[1], 2, None)
        refusing.takes = 10
        feed.publish([_event(3)])
        await _next_pass()
        assert refusing.positions == [[1], [3]]
    finally:
        await feed.close()


async def test_a_position_the_ring_does_not_hold_is_never_handed_over() -> None:
    """After a gap (an imported log, retention), the ring starts again above the parked tail:
    the tail is woken to read the table, which says what is missing."""
    feed = LogFeed(_nothing, head=3)
    sink = _Sink()
    tail = feed.subscribe(3, sink)
    try:
        waiter = feed.wait(tail, 3, None)
        feed.publish([_event(10), _event(11)])  # not contiguous: read from the table
        events = [_event(7), _event(8)]

        async def after_the_gap(after: int, limit: int) -> list[Event]:
            return [event for event in events if event.position > after]

        feed._read_after = after_the_gap
        feed.start()
        await asyncio.wait_for(waiter, 10)
        assert waiter.result() is True
        assert sink.batches == []
        assert tail.delivered == 3
        assert feed.entries_after(3) is None  # the ring holds 7 and 8 only
    finally:
        await feed.close()


@pytest.mark.slow
async def test_a_parked_tail_is_idle_only_from_its_last_hand_over() -> None:
    """Its idle timeout (the heartbeat) comes a whole timeout after the last hand-over, not
    after it parked: a stream that gets events gets no heartbeats, as a woken one would."""
    feed = LogFeed(_nothing, head=0)
    sink = _Sink()
    tail = feed.subscribe(0, sink)
    idle = 1.0
    loop = asyncio.get_running_loop()
    try:
        waiter = feed.wait(tail, 0, idle)
        for position in range(1, 31):  # 1.5 s of hand-overs, 50 ms apart
            await asyncio.sleep(0.05)
            feed.publish([_event(position)])
            await _next_pass()
            assert not waiter.done(), f"timed out {position * 0.05:.2f} s in, handed over"
        last = loop.time()
        assert await asyncio.wait_for(waiter, 10) is False
        assert loop.time() - last >= idle - 0.05
        assert len(sink.batches) == 30
    finally:
        await feed.close()
