"""The feed's wake-ups of idle tails: every advance reaches every waiting tail, and under a
stream of commits the rounds of waking many tails are spaced, not one per commit."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from app.eventlog.notify import MAX_WAKE_SPACING, WAKE_COST, LogFeed
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
