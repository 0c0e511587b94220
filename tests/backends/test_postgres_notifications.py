"""PostgreSQL: a commit's rows travel in its notifications to other processes' feeds, which
serve them exactly as a read of the table would (NOTIFY_EVENTS), and a process's feed does
not hear its own appends twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.backends.postgres.notifications import MAX_PAYLOAD_BYTES, MAX_ROWS_BYTES, decode, encode
from app.config import DatabaseSettings
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.events.envelope import encode_event
from app.events.plan import Row
from tests.support import open_store

DEADLINE = 30.0

#: Payloads of every kind of text, one larger than a notification holds.
PAYLOADS: list[dict[str, Any]] = [
    {"text": "héllo wörld ñ 日本語", "quote": '"\\', "controls": "\x01\t\n\u2028\u2029"},
    {"emoji": "🚀👩\u200d💻", "numbers": [0, -1, 2.5e300, 1e-7], "nested": {"a": [None, True]}},
    {"empty": "", "": "empty key", "list": [], "object": {}},
    {"large": "x" * (MAX_PAYLOAD_BYTES + 10)},
]


def new(n: int, payload: dict[str, Any]) -> NewEvent:
    return NewEvent(
        stream="agents",
        source_id=f"s{n % 7}",
        event="progress",
        payload=canonical_payload({"agent_name": "probe", "n": n, **payload}),
    )


async def feed_reaches(store: EventStore, head: int) -> None:
    async with asyncio.timeout(DEADLINE):
        while store.feed.head < head:
            await store.feed.changed()


def envelopes(store: EventStore) -> list[bytes]:
    entries = store.feed.entries_after(0)
    assert entries is not None, "the feed does not hold the whole log"
    return [entry.envelope_json() for entry in entries]


@pytest.mark.parametrize("notify_events", [True, False], ids=["rows", "wake-up"])
async def test_another_store_s_feed_serves_its_commits_as_the_table_holds_them(
    postgres_url: str, notify_events: bool
) -> None:
    writing_settings = DatabaseSettings(url=postgres_url, notify_events=notify_events)
    # The tailing store never polls within the test: only notifications move its feed.
    async with (
        open_store(postgres_url, poll_seconds=3600) as tailing,
        open_store(writing_settings) as writing,
    ):
        listener: Any = tailing._listener
        async with asyncio.timeout(DEADLINE):
            await listener.connected.wait()
        n = 0
        for payload in PAYLOADS:
            n += 1
            await writing.append_one(new(n, payload))
        # One commit of many rows (several notifications), one of more than a commit sends
        # as rows (a wake-up: the feed reads the table).
        await writing.append([new(n + i, PAYLOADS[i % 3]) for i in range(1, 101)])
        await writing.append([new(n + 100 + i, {"pad": "y" * 900}) for i in range(1, 101)])
        head = n + 200
        await feed_reaches(tailing, head)

        page = await tailing.read_after(0, limit=head)
        from_table = [encode_event(event) for event in page.events]
        assert len(from_table) == head
        assert envelopes(tailing) == from_table
        if notify_events:
            # All but the event larger than a notification and the commit larger than a
            # commit sends as rows came in notifications.
            assert tailing.notified_events == head - 1 - 100
        else:
            assert tailing.notified_events == 0


async def test_a_store_s_own_commits_reach_its_feed_once_and_not_from_notifications(
    postgres_url: str,
) -> None:
    async with open_store(postgres_url, poll_seconds=3600) as store:
        listener: Any = store._listener
        async with asyncio.timeout(DEADLINE):
            await listener.connected.wait()
        for n in range(20):
            await store.append_one(new(n, {}))
        await feed_reaches(store, 20)
        # Any notification of these commits would have arrived by now: the appender's own
        # connection sent them, and the listener leaves them out.
        await asyncio.sleep(0.5)
        assert store.notified_events == 0
        assert [entry.position for entry in store.feed.entries_after(0) or []] == list(range(1, 21))


def row(position: int, payload: str) -> Row:
    return Row(position, "agents", "s", position, "progress", f"id-{position}", "t", payload, None)


def test_rows_are_split_under_the_payload_limit_and_a_large_commit_sends_its_head() -> None:
    rows = [row(p, '{"a":"' + "z" * 500 + '"}') for p in range(1, 41)]
    payloads = encode(rows, with_rows=True)
    assert len(payloads) > 1
    assert all(len(p.encode()) < MAX_PAYLOAD_BYTES for p in payloads)
    decoded = [event for p in payloads for event in decode(p)]  # type: ignore[union-attr]
    assert [encode_event(e) for e in decoded] == [encode_event(r.to_event()) for r in rows]

    large = [row(p, '{"a":"' + "z" * 1000 + '"}') for p in range(1, MAX_ROWS_BYTES // 1000 + 2)]
    assert encode(large, with_rows=True) == [str(large[-1].position)]
    assert encode(rows, with_rows=False) == ["40"]
    # What an instance that sends only positions says is read as a position.
    assert decode("40") == 40
    assert decode("") == 0
