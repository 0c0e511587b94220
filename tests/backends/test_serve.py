"""The SQLite writer's loop: a purge's removals take the gaps between appends."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.backends import GuardedWrite
from app.backends.sqlite.serve import YIELD_SECONDS, Answer, Ask, serve
from app.backends.sqlite.writer import SqliteWriter
from app.database import upgrade_database
from app.eventlog import NewEvent, canonical_payload
from app.events.plan import Plan


def _request(n: int) -> list[NewEvent]:
    return [NewEvent("agents", f"a{n % 3}", "progress", canonical_payload({"n": n}))]


def _write(*, yields: bool) -> GuardedWrite:
    return GuardedWrite("SELECT 1", [], [[1]], [], yields=yields)


class _Outbox:
    def __init__(self) -> None:
        #: What the loop did, in order: ("committed", positions) or ("written", token).
        self.done: list[tuple[str, Any]] = []
        self.stopped = False

    def committed(self, group: list[Any], outcome: Plan | Exception, seconds: float) -> None:
        assert not isinstance(outcome, Exception), outcome
        self.done.append(("committed", [row.position for row in outcome.rows]))

    def answer(self, kind: Answer, body: Any) -> None:
        if kind is Answer.WRITTEN:
            token, answer = body
            assert answer is True, answer
            self.done.append(("written", token))
        elif kind is Answer.STOPPED:
            self.stopped = True


class _Script:
    """An inbox that hands over the messages it holds, then what ``more`` makes of each call."""

    def __init__(self, messages: Sequence[tuple[Ask, Any]], more: Any = None) -> None:
        self.messages = deque(messages)
        self.more = more

    def next(self, timeout: float | None) -> tuple[Ask, Any] | None:
        if self.messages:
            return self.messages.popleft()
        return self.more() if self.more is not None else None


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SqliteWriter]:
    path = tmp_path / "events.db"
    asyncio.run(upgrade_database(f"sqlite+aiosqlite:///{path}"))
    writer = SqliteWriter(path, busy_timeout_ms=10_000, cache_kib=1024)
    writer.connect()
    yield writer
    writer.close()


def _serve(writer: SqliteWriter, inbox: _Script, outbox: _Outbox) -> None:
    serve(writer, inbox, outbox, max_batch=100, events_of=lambda request: request)


def test_a_yielding_write_waits_for_the_appends_beside_it_and_a_plain_one_does_not(
    writer: SqliteWriter,
) -> None:
    messages = [
        (Ask.WRITE, (1, _write(yields=True))),
        (Ask.WRITE, (2, _write(yields=False))),
        (Ask.APPEND, [_request(1), _request(2)]),
        (Ask.STOP, None),
    ]
    outbox = _Outbox()
    _serve(writer, _Script(messages), outbox)
    assert outbox.done == [("written", 2), ("committed", [1, 2]), ("written", 1)]
    assert outbox.stopped


def test_under_appends_that_never_pause_a_yielding_write_is_made_within_its_limit(
    writer: SqliteWriter,
) -> None:
    outbox = _Outbox()
    sent = 0
    asked_at: float | None = None
    deadline = time.monotonic() + 10
    calls = 0

    def another() -> tuple[Ask, Any] | None:
        # One more append has come in by every turn of the loop (each turn drains the inbox
        # until it answers None); the write is asked for once appends are flowing.
        nonlocal sent, asked_at, calls
        calls += 1
        if calls % 2 == 0:
            return None
        sent += 1
        if ("written", 7) in outbox.done or time.monotonic() > deadline:
            return (Ask.STOP, None)
        if sent == 5:
            asked_at = time.monotonic()
            return (Ask.WRITE, (7, _write(yields=True)))
        return (Ask.APPEND, [_request(sent)])

    _serve(writer, _Script([], another), outbox)
    written = outbox.done.index(("written", 7))
    commits_before = sum(kind == "committed" for kind, _ in outbox.done[:written])
    assert commits_before >= 1
    assert asked_at is not None
    # It was made while appends still waited, once it had waited its limit.
    assert time.monotonic() - asked_at < YIELD_SECONDS + 5
    assert commits_before > 1, "the write did not wait for the appends"


def test_while_the_wal_is_about_to_start_over_a_yielding_write_waits_and_a_plain_one_does_not(
    writer: SqliteWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    until = time.monotonic() + YIELD_SECONDS / 2
    monkeypatch.setattr(writer, "restarting", lambda: time.monotonic() < until)
    made: dict[int, float] = {}
    outbox = _Outbox()
    answer = outbox.answer

    def answered(kind: Answer, body: Any) -> None:
        if kind is Answer.WRITTEN:
            made[body[0]] = time.monotonic()
        answer(kind, body)

    monkeypatch.setattr(outbox, "answer", answered)
    stopping = False

    def more() -> tuple[Ask, Any] | None:
        nonlocal stopping
        if len(made) == 2 and not stopping:
            stopping = True
            return (Ask.STOP, None)
        return None

    messages = [(Ask.WRITE, (1, _write(yields=True))), (Ask.WRITE, (2, _write(yields=False)))]
    _serve(writer, _Script(messages, more), outbox)
    assert made[2] < until
    assert made[1] >= until
    assert outbox.done == [("written", 2), ("written", 1)]
