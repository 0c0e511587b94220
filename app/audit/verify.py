"""Recomputing the log's chain (app/events/chain.py) and saying where, and how, it breaks.

The input is the history in position order: archived segments first (each checked as a whole
against its manifest, since a segment's lines carry no chain values), then the table's rows
with the chain value each holds. Every chain value is recomputed from the events' content;
the stored ones are only compared with it, so a history whose stored values were rewritten
to match an edit still verifies only up to a signed checkpoint (see
:mod:`app.audit.checkpoints`), which vouches for the recomputed value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import NamedTuple

import msgspec

from app.events.chain import GENESIS, event_chain
from app.events.envelope import Event

__all__ = [
    "ArchivedRange",
    "Broken",
    "ChainedEvent",
    "Checkpointed",
    "Verified",
    "verify_history",
]

#: How many rows after a break are looked at to tell reordered rows from an edited one.
LOOKAHEAD = 64


class ChainedEvent(NamedTuple):
    """A table row: the event and the chain value the row holds (None: it holds none)."""

    event: Event
    chain: bytes | None


class ArchivedRange(NamedTuple):
    """An archive segment as its manifest describes it, and a way to read its events.

    ``problem`` is what is wrong with the file before its events are read (missing, or its
    checksum differs from the manifest's), or None."""

    name: str
    first: int
    last: int
    size: int
    #: The chain values of its first and last events, as the manifest holds them.
    first_chain: bytes | None
    last_chain: bytes
    events: Callable[[], Iterator[Event]]
    problem: str | None = None


class Verified(NamedTuple):
    verified: int
    head: int
    chain: bytes

    def describe(self) -> str:
        return f"verified {self.verified} events, head {self.head} (chain {self.chain.hex()})"


class Broken(NamedTuple):
    position: int
    #: "edited row", "deleted rows", "reordered rows", "tampered segment", "no chain value",
    #: or "rewritten history" (a checkpoint's chain value is not the recomputed one).
    kind: str
    detail: str
    #: Events verified before the break.
    verified: int

    def describe(self) -> str:
        return f"chain broken at position {self.position}: {self.kind}: {self.detail}"


class Checkpointed(NamedTuple):
    """A chain value vouched for at a position (a verified signed checkpoint)."""

    position: int
    chain: bytes


def verify_history(
    rows: Iterable[ChainedEvent],
    *,
    segments: Iterable[ArchivedRange] = (),
    checkpoints: Iterable[Checkpointed] = (),
) -> Verified | Broken:
    """Recompute the chain over ``segments`` then ``rows`` (both in position order); the
    first break, or what was verified. Each of ``checkpoints`` must meet the recomputed
    chain value at its position."""
    state = _State(sorted(checkpoints))
    for segment in segments:
        broken = _verify_segment(state, segment)
        if broken is not None:
            return broken
    table = iter(rows)
    for row in table:
        event = row.event
        if event.position < state.expected:
            continue  # also in a segment, verified there: its purge has not removed it yet
        if event.position > state.expected:
            return state.broken(
                state.expected,
                "deleted rows",
                f"positions {state.expected}-{event.position - 1} are missing "
                f"(the next event is at {event.position})",
            )
        computed = event_chain(state.chain, event)
        if row.chain != computed:
            return _classify(state, row, computed, table)
        broken = state.advance(event.position, computed)
        if broken is not None:
            return broken
    return state.finish()


class _State:
    def __init__(self, checkpoints: list[Checkpointed]) -> None:
        self.expected = 1
        self.chain = GENESIS
        self.count = 0
        self._checkpoints = checkpoints

    def advance(self, position: int, chain: bytes) -> Broken | None:
        self.expected, self.chain = position + 1, chain
        self.count += 1
        while self._checkpoints and self._checkpoints[0].position == position:
            signed = self._checkpoints.pop(0)
            if signed.chain != chain:
                return self.broken(
                    position,
                    "rewritten history",
                    f"the events up to here give chain {chain.hex()}, but the checkpoint "
                    f"signed {signed.chain.hex()}: the history up to it was rewritten",
                )
        return None

    def broken(self, position: int, kind: str, detail: str) -> Broken:
        return Broken(position, kind, detail, self.count)

    def finish(self) -> Verified | Broken:
        if self._checkpoints:
            signed = self._checkpoints[0]
            return self.broken(
                signed.position,
                "deleted rows",
                f"the log ends at position {self.expected - 1}, before the checkpoint signed "
                f"at {signed.position}: the events after it were removed",
            )
        return Verified(self.count, self.expected - 1, self.chain)


def _verify_segment(state: _State, segment: ArchivedRange) -> Broken | None:
    before = state.count

    def tampered(detail: str) -> Broken:
        # Nothing in it counts as verified: its events carry no chain values of their own.
        return Broken(segment.first, "tampered segment", f"{segment.name}: {detail}", before)

    if segment.problem is not None:
        return tampered(segment.problem)
    if segment.first > state.expected:
        return state.broken(
            state.expected,
            "deleted rows",
            f"positions {state.expected}-{segment.first - 1} are in no segment "
            f"(the next segment, {segment.name}, starts at {segment.first})",
        )
    count = 0
    try:
        for event in segment.events():
            if event.position != state.expected:
                return tampered(
                    f"holds position {event.position} where {state.expected} comes next"
                )
            computed = event_chain(state.chain, event)
            if count == 0 and segment.first_chain not in (None, computed):
                return tampered("its first event does not give the chain value its manifest holds")
            count += 1
            broken = state.advance(event.position, computed)
            if broken is not None:
                return broken
    except (OSError, EOFError, ValueError, msgspec.MsgspecError) as exc:
        return tampered(f"cannot be read: {exc}")
    if count != segment.size or state.expected - 1 != segment.last:
        return tampered(
            f"holds {count} events up to position {state.expected - 1}; its manifest says "
            f"{segment.size} up to {segment.last}"
        )
    if state.chain != segment.last_chain:
        return tampered("its events do not give the chain value its manifest holds at its end")
    return None


def _classify(
    state: _State, row: ChainedEvent, computed: bytes, table: Iterator[ChainedEvent]
) -> Broken:
    """How the row at ``state.expected`` broke the chain, from the rows after it."""
    position = state.expected
    if row.chain is None:
        return state.broken(
            position,
            "no chain value",
            "the row holds none (appended with AUDIT_CHAIN=0; an append with the chain on "
            "fills it in)",
        )
    following = list(islice(table, LOOKAHEAD))
    for later in following:
        # Would the later row's event, at this position, give a chain value found here (its
        # content moved without its chain value) or on that row (both moved)?
        moved = msgspec.structs.replace(later.event, position=position)
        if event_chain(state.chain, moved) in (row.chain, later.chain):
            return state.broken(
                position,
                "reordered rows",
                f"the event now at position {later.event.position} was written at {position}",
            )
    after = following[0] if following else None
    if after is None or event_chain(row.chain, after.event) == after.chain:
        detail = "its content does not give the chain value it holds"
    else:
        detail = "neither its content nor its chain value follow from the row before it"
    return state.broken(position, "edited row", f"{detail} (recomputed {computed.hex()})")
