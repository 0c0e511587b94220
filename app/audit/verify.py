"""Recomputing the log's chain (app/events/chain.py) and saying where, and how, it breaks.

The input is the history in position order: archived segments first (each checked as a whole
against its manifest, since a segment's lines carry no chain values), then the table's rows
with the chain value each holds. Every chain value is recomputed from the events' content;
the stored ones are only compared with it, so a history whose stored values were rewritten
to match an edit still verifies only up to a signed checkpoint (see
:mod:`app.audit.checkpoints`), which vouches for the recomputed value.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, NamedTuple

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
    #: The chain values of its first and last events, as the manifest holds them (None: the
    #: events were appended without a chain; the table's first row still has to follow).
    first_chain: bytes | None
    last_chain: bytes | None
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
    """Recompute the chain over the events of ``segments`` and ``rows`` together, in position
    order (retention archives some events and keeps others between them, so the two
    interleave); the first break, or what was verified. Each of ``checkpoints`` must meet
    the recomputed chain value at its position."""
    state = _State(sorted(checkpoints))
    ranges = list(segments)
    seen = dict.fromkeys((segment.name for segment in ranges), 0)
    # Events verified before each segment's first: what a tampered segment leaves verified.
    before: dict[str, int] = {}
    history = heapq.merge(
        *(_archived(segment) for segment in ranges), _table(rows), key=lambda item: item[:2]
    )
    for position, _, item in history:
        if isinstance(item, ArchivedRange):  # a segment that cannot be read
            return _tampered(item, item.problem or "", state.count)
        if position < state.expected:
            continue  # archived and not removed yet: verified once, from its segment
        if position > state.expected:
            covering = [r.name for r in ranges if r.first <= state.expected <= r.last]
            where = f"; within the range of {', '.join(covering)}" if covering else ""
            return state.broken(
                state.expected,
                "deleted rows",
                f"positions {state.expected}-{position - 1} are missing "
                f"(the next event is at {position}{where})",
            )
        if isinstance(item, ChainedEvent):
            computed = event_chain(state.chain, item.event)
            if item.chain != computed:
                return _classify(state, item, computed, history)
        else:
            event, segment = item
            computed = event_chain(state.chain, event)
            count = seen[segment.name] = seen[segment.name] + 1
            if count == 1:
                before[segment.name] = state.count
            problem = _segment_problem(segment, event, count, computed)
            if problem is not None:
                return _tampered(segment, problem, before[segment.name])
        broken = state.advance(position, computed)
        if broken is not None:
            return broken
    for segment in ranges:
        if seen[segment.name] != segment.size:
            return _tampered(
                segment,
                f"holds {seen[segment.name]} events; its manifest says {segment.size}",
                before.get(segment.name, state.count),
            )
    return state.finish()


# Sorted by (position, rank): a segment that cannot be read before the events at its first
# position, an archived event before the same event still in the table.
_DAMAGED, _ARCHIVED, _ROW = 0, 1, 2


def _table(rows: Iterable[ChainedEvent]) -> Iterator[tuple[int, int, ChainedEvent]]:
    for row in rows:
        yield row.event.position, _ROW, row


def _archived(
    segment: ArchivedRange,
) -> Iterator[tuple[int, int, tuple[Event, ArchivedRange] | ArchivedRange]]:
    if segment.problem is not None:
        yield segment.first, _DAMAGED, segment
        return
    try:
        for event in segment.events():
            yield event.position, _ARCHIVED, (event, segment)
    except (OSError, EOFError, ValueError, msgspec.MsgspecError) as exc:
        yield segment.first, _DAMAGED, segment._replace(problem=f"cannot be read: {exc}")


def _segment_problem(
    segment: ArchivedRange, event: Event, count: int, computed: bytes
) -> str | None:
    if not segment.first <= event.position <= segment.last:
        return f"holds position {event.position}, outside {segment.first}-{segment.last}"
    if count == 1 and (
        event.position != segment.first or segment.first_chain not in (None, computed)
    ):
        return "its first event does not give the chain value its manifest holds"
    if event.position == segment.last:
        if count != segment.size:
            return f"holds {count} events up to its last; its manifest says {segment.size}"
        if segment.last_chain not in (None, computed):
            return "its events do not give the chain value its manifest holds at its end"
    return None


def _tampered(segment: ArchivedRange, detail: str, verified: int) -> Broken:
    # Nothing from it counts as verified: its events carry no chain values of their own.
    return Broken(segment.first, "tampered segment", f"{segment.name}: {detail}", verified)


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


def _classify(
    state: _State, row: ChainedEvent, computed: bytes, history: Iterator[tuple[int, int, Any]]
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
    following = [
        item for _, _, item in islice(history, LOOKAHEAD) if isinstance(item, ChainedEvent)
    ]
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
    if (
        after is None
        or after.event.position != position + 1
        or event_chain(row.chain, after.event) == after.chain
    ):
        detail = "its content does not give the chain value it holds"
    else:
        detail = "neither its content nor its chain value follow from the row before it"
    return state.broken(position, "edited row", f"{detail} (recomputed {computed.hex()})")
