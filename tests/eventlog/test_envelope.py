"""Event ids the log assigns: version 7 UUIDs, unique, ascending within a draw and over time."""

from __future__ import annotations

import time
import uuid

from app.events.envelope import new_event_id, new_event_ids, parse_event_id


def test_new_event_ids_are_canonical_version_7_uuids() -> None:
    for event_id in new_event_ids(200):
        parsed = uuid.UUID(event_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert parse_event_id(event_id) == event_id


def test_new_event_ids_carry_the_clock_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    event_id = new_event_id()
    after = time.time_ns() // 1_000_000

    assert before <= uuid.UUID(event_id).int >> 80 <= after


def test_new_event_ids_ascend_within_a_draw_and_from_one_draw_to_the_next() -> None:
    first = new_event_ids(1000)
    time.sleep(0.002)
    second = new_event_ids(1000)

    assert first == sorted(first)
    assert second == sorted(second)
    assert first[-1] < second[0]
    assert len(set(first + second)) == 2000


def test_new_event_ids_of_the_same_instant_still_differ() -> None:
    drawn = [event_id for _ in range(200) for event_id in new_event_ids(50)]

    assert len(set(drawn)) == len(drawn)
