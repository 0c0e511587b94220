"""The log's hash chain: what makes a rewritten history detectable.

Every event's ``chain`` value is ``SHA-256(previous chain value || canonical bytes)``, the
previous value of the event at position 1 being :data:`GENESIS` (32 zero bytes). Whoever
changes, removes or reorders one event changes every chain value after it; a signed
checkpoint of one chain value therefore vouches for the whole history up to it.

The canonical bytes of an event are its eight envelope fields in the envelope's order,
``position``, ``stream``, ``source_id``, ``version``, ``event``, ``event_id``,
``timestamp``, ``payload``, as UTF-8 text (integers in decimal, the payload exactly as
stored: the compact JSON the envelope carries), joined by a newline (0x0A), with no newline
at the end. No field can hold a newline: names and ids are refused with control characters,
the timestamp has a fixed form, and the payload is compact JSON (a newline inside a string is
escaped). So the bytes decode back into exactly one event, and an auditor can recompute them
from an exported envelope with nothing but a JSON parser and SHA-256.

This module is the one place that defines them (docs/architecture.md states the same as an
invariant); it is free of the database, since the SQLite writer process imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import sha256
from typing import Any

from app.events.envelope import Event

__all__ = ["GENESIS", "canonical_bytes", "chain_rows", "event_chain", "link"]

#: The chain value before the first event.
GENESIS = bytes(32)


def canonical_bytes(
    position: int,
    stream: str,
    source_id: str,
    version: int,
    event: str,
    event_id: str,
    timestamp: str,
    payload: str,
) -> bytes:
    """The bytes the chain hashes for one event (see the module's docstring)."""
    text = f"{position}\n{stream}\n{source_id}\n{version}\n{event}\n{event_id}\n{timestamp}\n"
    return (text + payload).encode()


def link(previous: bytes, canonical: bytes) -> bytes:
    """The chain value of an event whose canonical bytes are ``canonical``, following an
    event whose chain value is ``previous``."""
    return sha256(previous + canonical).digest()


def event_chain(previous: bytes, event: Event) -> bytes:
    """The chain value of ``event`` after ``previous``."""
    canonical = canonical_bytes(
        event.position,
        event.stream,
        event.source_id,
        event.version,
        event.event,
        event.event_id,
        event.timestamp,
        bytes(event.payload).decode("utf-8"),
    )
    return sha256(previous + canonical).digest()


def chain_rows(previous: bytes, rows: Iterable[Sequence[Any]]) -> list[bytes]:
    """The chain values of ``rows`` (the events table's first eight columns, in order, in
    position order) after ``previous``: what an appender or a migration stores."""
    values: list[bytes] = []
    for row in rows:
        previous = sha256(previous + canonical_bytes(*row[:8])).digest()
        values.append(previous)
    return values
