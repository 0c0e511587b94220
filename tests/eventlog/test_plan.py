"""plan_batch: how a group of append requests becomes rows (pure; no database)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.eventlog import Event, EventIdReused, NewEvent, VersionConflict, canonical_payload
from app.events.chain import chain_rows
from app.events.plan import AppendResult, Plan, SourceKey, plan_batch

NOW = "2025-01-24T12:34:56.789Z"
EARLIER = "2025-01-01T00:00:00.000Z"
#: The chain value of the head the plans follow.
HEAD_CHAIN = bytes(range(32))


def new(
    source_id: str = "a1",
    event: str = "progress",
    *,
    stream: str = "agents",
    event_id: str | None = None,
    expected_version: int | None = None,
    **payload: Any,
) -> NewEvent:
    return NewEvent(
        stream=stream,
        source_id=source_id,
        event=event,
        payload=canonical_payload(payload),
        event_id=event_id,
        expected_version=expected_version,
    )


def stored(new_event: NewEvent, position: int, version: int) -> Event:
    """What the log holds for ``new_event`` once it was written at ``position``."""
    assert new_event.event_id is not None
    return Event(
        position=position,
        stream=new_event.stream,
        source_id=new_event.source_id,
        version=version,
        event=new_event.event,
        event_id=new_event.event_id,
        timestamp=EARLIER,
        payload=new_event.payload,
    )


def plan(
    batch: list[list[NewEvent]],
    *,
    head: int = 0,
    versions: dict[SourceKey, int] | None = None,
    existing: dict[str, Event] | None = None,
    chain: bytes | None = HEAD_CHAIN,
) -> Plan:
    return plan_batch(
        batch,
        head=head,
        versions=versions or {},
        existing=existing or {},
        timestamp=NOW,
        chain=chain,
    )


def results(outcome: object) -> list[AppendResult]:
    assert isinstance(outcome, list), f"expected results, got {outcome!r}"
    return outcome


def test_positions_follow_the_head_without_gaps_across_requests() -> None:
    found = plan([[new("a1"), new("a2")], [new("a1")], [new("a3"), new("a3"), new("a1")]], head=41)

    assert [row.position for row in found.rows] == [42, 43, 44, 45, 46, 47]
    assert [[r.position for r in results(o)] for o in found.outcomes] == [
        [42, 43],
        [44],
        [45, 46, 47],
    ]
    assert all(row.timestamp == NOW for row in found.rows)
    assert not any(r.duplicate for o in found.outcomes for r in results(o))


def test_versions_continue_from_the_current_version_of_each_source() -> None:
    found = plan(
        [[new("a1"), new("a2")], [new("a1"), new("a1", stream="jobs")]],
        head=10,
        versions={("agents", "a1"): 4, ("agents", "a2"): 0},
    )

    assert [(row.stream, row.source_id, row.version) for row in found.rows] == [
        ("agents", "a1", 5),
        ("agents", "a2", 1),
        ("agents", "a1", 6),
        # The same source_id in another stream is another source.
        ("jobs", "a1", 1),
    ]
    assert [r.version for o in found.outcomes for r in results(o)] == [5, 1, 6, 1]


def test_rows_carry_the_request_content_and_fresh_unique_event_ids() -> None:
    found = plan([[new("a1", "started", n=1), new("a1", "progress", n=2)]])

    assert [(row.event, row.payload) for row in found.rows] == [
        ("started", '{"n":1}'),
        ("progress", '{"n":2}'),
    ]
    ids = [row.event_id for row in found.rows]
    assert len(set(ids)) == 2
    assert all(str(uuid.UUID(event_id)) == event_id for event_id in ids)
    assert [r.event_id for r in results(found.outcomes[0])] == ids


def test_event_ids_ascend_with_positions_across_the_requests_of_a_batch() -> None:
    # Time-ordered ids keep each commit's inserts at the end of the event_id index.
    found = plan([[new("a1"), new("a2")], [new("a1", expected_version=1)], [new("a3")]])

    ids = [row.event_id for row in found.rows]
    assert ids == sorted(ids)
    assert {uuid.UUID(event_id).version for event_id in ids} == {7}


def test_expected_version_mismatch_refuses_only_that_request() -> None:
    found = plan(
        [
            [new("a1")],
            # a1 is at version 3 after the first request: this whole request is refused.
            [new("a2"), new("a1", expected_version=7), new("a3")],
            [new("a2"), new("a1")],
        ],
        head=5,
        versions={("agents", "a1"): 2},
    )

    conflict = found.outcomes[1]
    assert isinstance(conflict, VersionConflict)
    assert (conflict.source_id, conflict.expected, conflict.actual) == ("a1", 7, 3)
    # The refused request's events take no position and no version from later requests.
    assert [(row.position, row.source_id, row.version) for row in found.rows] == [
        (6, "a1", 3),
        (7, "a2", 1),
        (8, "a1", 4),
    ]
    assert [r.position for r in results(found.outcomes[2])] == [7, 8]
    # What the appender remembers as each source's version after commit: no trace of a3.
    assert found.versions == {("agents", "a1"): 4, ("agents", "a2"): 1}


def test_expected_version_sees_earlier_requests_and_earlier_events_of_the_same_request() -> None:
    found = plan(
        [
            [new("a1", expected_version=0), new("a1", expected_version=1)],
            [new("a1", expected_version=2)],
            [new("a1", expected_version=2)],
        ]
    )

    assert [r.version for r in results(found.outcomes[0])] == [1, 2]
    assert [r.version for r in results(found.outcomes[1])] == [3]
    refused = found.outcomes[2]
    assert isinstance(refused, VersionConflict)
    assert (refused.expected, refused.actual) == (2, 3)
    assert len(found.rows) == 3


def test_a_request_refused_by_its_last_event_writes_none_of_its_events() -> None:
    found = plan([[new("a1"), new("a2"), new("a1", expected_version=0)]])

    assert isinstance(found.outcomes[0], VersionConflict)
    assert found.rows == []


def test_an_event_id_already_in_the_log_returns_the_original_and_writes_nothing() -> None:
    event_id = str(uuid.uuid4())
    original = new("a1", event_id=event_id, n=1)
    existing = {event_id: stored(original, position=3, version=2)}

    found = plan([[new("a1", event_id=event_id, n=1)]], head=9, existing=existing)

    assert found.rows == []
    assert results(found.outcomes[0]) == [
        AppendResult(position=3, version=2, event_id=event_id, timestamp=EARLIER, duplicate=True)
    ]


def test_a_retry_is_not_checked_against_expected_version_again() -> None:
    # The first attempt said expected_version=0 and was written; its retry must not conflict
    # with the version that attempt itself produced.
    event_id = str(uuid.uuid4())
    original = new("a1", event_id=event_id, expected_version=0)
    existing = {event_id: stored(original, position=1, version=1)}

    found = plan(
        [[new("a1", event_id=event_id, expected_version=0)]],
        head=1,
        versions={("agents", "a1"): 1},
        existing=existing,
    )

    assert found.rows == []
    assert results(found.outcomes[0])[0].duplicate


def test_a_partly_retried_request_writes_only_its_new_events() -> None:
    event_id = str(uuid.uuid4())
    original = new("a1", event_id=event_id)
    existing = {event_id: stored(original, position=4, version=4)}

    found = plan(
        [[new("a1", event_id=event_id), new("a1")]],
        head=4,
        versions={("agents", "a1"): 4},
        existing=existing,
    )

    assert [(row.position, row.version) for row in found.rows] == [(5, 5)]
    assert [(r.position, r.version, r.duplicate) for r in results(found.outcomes[0])] == [
        (4, 4, True),
        (5, 5, False),
    ]


@pytest.mark.parametrize(
    "reused",
    [
        {"payload": {"n": 2}},
        {"event": "finished"},
        {"source_id": "a2"},
        {"stream": "jobs"},
    ],
    ids=["payload", "event", "source", "stream"],
)
def test_an_event_id_reused_for_different_content_is_refused(reused: dict[str, Any]) -> None:
    event_id = str(uuid.uuid4())
    original = new("a1", event_id=event_id, n=1)
    fields: dict[str, Any] = {"source_id": "a1", "event": "progress", "payload": {"n": 1}}
    fields.update(reused)
    payload = fields.pop("payload")

    found = plan(
        [[new("a3")], [new(event_id=event_id, **fields, **payload)], [new("a3")]],
        head=8,
        existing={event_id: stored(original, position=8, version=1)},
    )

    refused = found.outcomes[1]
    assert isinstance(refused, EventIdReused)
    assert (refused.event_id, refused.position) == (event_id, 8)
    assert [row.position for row in found.rows] == [9, 10]


def test_an_event_id_written_earlier_in_the_same_batch_is_a_retry() -> None:
    event_id = str(uuid.uuid4())
    found = plan(
        [
            [new("a1", event_id=event_id, n=1)],
            [new("a2")],
            [new("a1", event_id=event_id, n=1), new("a1")],
        ],
        head=20,
    )

    assert [(row.position, row.event_id == event_id) for row in found.rows] == [
        (21, True),
        (22, False),
        (23, False),
    ]
    first = results(found.outcomes[0])[0]
    retried = results(found.outcomes[2])
    assert retried[0] == first._replace(duplicate=True)
    assert (retried[1].position, retried[1].version) == (23, 2)


def test_an_event_id_reused_within_the_batch_for_different_content_is_refused() -> None:
    event_id = str(uuid.uuid4())
    found = plan(
        [[new("a1", event_id=event_id, n=1)], [new("a1", event_id=event_id, n=2), new("a2")]]
    )

    refused = found.outcomes[1]
    assert isinstance(refused, EventIdReused)
    assert refused.position == 1
    assert len(found.rows) == 1


def test_an_event_id_of_a_refused_request_is_free_for_later_requests() -> None:
    event_id = str(uuid.uuid4())
    found = plan(
        [
            [new("a1", event_id=event_id, n=1, expected_version=5)],
            [new("a1", event_id=event_id, n=2)],
        ]
    )

    assert isinstance(found.outcomes[0], VersionConflict)
    assert [(row.position, row.event_id, row.payload) for row in found.rows] == [
        (1, event_id, '{"n":2}')
    ]


def test_an_empty_batch_plans_nothing() -> None:
    assert plan([], head=3) == Plan([], [])


# -- property ----------------------------------------------------------------------------------

SOURCES = [("agents", "a1"), ("agents", "a2"), ("jobs", "a1"), ("jobs", "j9")]
ID_POOL = [str(uuid.UUID(int=n)) for n in range(1, 7)]

_events = st.builds(
    lambda source, name, n, event_id, expected: NewEvent(
        stream=source[0],
        source_id=source[1],
        event=name,
        payload=msgspec.Raw(msgspec.json.encode({"n": n})),
        event_id=event_id,
        expected_version=expected,
    ),
    st.sampled_from(SOURCES),
    st.sampled_from(["started", "progress"]),
    st.integers(0, 2),
    st.none() | st.sampled_from(ID_POOL),
    st.none() | st.none() | st.integers(0, 4),
)


def _unique_ids(request: list[NewEvent]) -> bool:
    # The store refuses an append naming one event_id twice before it reaches the planner.
    ids = [event.event_id for event in request if event.event_id]
    return len(ids) == len(set(ids))


@settings(max_examples=200, deadline=None)
@given(
    batch=st.lists(st.lists(_events, min_size=1, max_size=5).filter(_unique_ids), max_size=8),
    head=st.integers(0, 1000),
    start_versions=st.lists(st.integers(0, 3), min_size=len(SOURCES), max_size=len(SOURCES)),
    logged=st.lists(st.sampled_from(ID_POOL[:3]), unique=True, max_size=3),
)
def test_any_batch_plans_gapless_positions_and_gapless_versions_per_source(
    batch: list[list[NewEvent]], head: int, start_versions: list[int], logged: list[str]
) -> None:
    versions = dict(zip(SOURCES, start_versions, strict=True))
    existing = {
        event_id: Event(
            position=max(head - index, 1),
            stream="agents",
            source_id="a1",
            version=1,
            event="progress",
            event_id=event_id,
            timestamp=EARLIER,
            payload=msgspec.Raw(b'{"n":0}'),
        )
        for index, event_id in enumerate(logged)
    }

    found = plan(batch, head=head, versions=versions, existing=existing)

    assert [row.position for row in found.rows] == list(range(head + 1, head + len(found.rows) + 1))
    by_source: dict[SourceKey, list[int]] = defaultdict(list)
    for row in found.rows:
        by_source[(row.stream, row.source_id)].append(row.version)
    for key, seen in by_source.items():
        assert seen == list(range(versions[key] + 1, versions[key] + len(seen) + 1))
    # The versions the appender caches for its next batch: the last written, or as given.
    assert found.versions == {
        **versions,
        **{key: seen[-1] for key, seen in by_source.items()},
    }
    ids = [row.event_id for row in found.rows]
    assert len(ids) == len(set(ids))
    assert not set(ids) & set(existing)
    # Every row belongs to exactly one accepted request's non-duplicate result.
    written = [
        (r.position, r.version, r.event_id)
        for outcome in found.outcomes
        if isinstance(outcome, list)
        for r in outcome
        if not r.duplicate
    ]
    assert written == [(row.position, row.version, row.event_id) for row in found.rows]
    assert len(found.outcomes) == len(batch)
    # Each written row's chain value follows the one written before it, or the head's:
    # a refused request's rows leave no trace in the chain.
    assert [row.chain for row in found.rows] == chain_rows(HEAD_CHAIN, found.rows)


def test_with_the_chain_off_rows_carry_no_chain_value() -> None:
    found = plan([[new("a1"), new("a2")], [new("a1", expected_version=1)]], chain=None)

    assert len(found.rows) == 3
    assert [row.chain for row in found.rows] == [None, None, None]
