"""What a commit's NOTIFY says to other instances: its rows, or its newest position alone.

A commit's rows travel in its notifications, so that another instance's feed takes them as
they come and does not read the table for them: a JSON array of rows, each
``[position, stream, source_id, version, event, event_id, timestamp, payload]`` with the
payload as the JSON text it is stored as, as many notifications as the rows need (each under
PostgreSQL's payload limit), sent in position order. PostgreSQL delivers a transaction's
notifications only once it has committed, and in commit order, which is position order; a
listener still hands the rows to the feed, which takes them only where they continue its head
exactly and otherwise reads the table (:meth:`~app.eventlog.notify.LogFeed.publish`).

A commit whose rows would take more than :data:`MAX_ROWS_BYTES` (or a row more than one
notification holds), and every commit while ``NOTIFY_EVENTS=0``, sends its newest position
alone: a wake-up, after which the feed reads the table. A listener takes either form, so
instances that send either can share one database.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from app.events.envelope import Event
from app.events.plan import Row

__all__ = ["MAX_PAYLOAD_BYTES", "MAX_ROWS_BYTES", "decode", "encode"]

#: The most one notification carries (PostgreSQL refuses payloads of 8,000 bytes or more).
MAX_PAYLOAD_BYTES = 7_900
#: The most a commit sends in row notifications: every listener receives all of them.
MAX_ROWS_BYTES = 64 * 1024

_NotifiedRow = tuple[int, str, str, int, str, str, str, msgspec.Raw]
_encode = msgspec.json.Encoder().encode
_decode_rows = msgspec.json.Decoder(list[_NotifiedRow]).decode


def encode(rows: Sequence[Row], *, with_rows: bool) -> list[str]:
    """The payloads of the notifications for a commit of ``rows`` (at least one row)."""
    head = [str(rows[-1].position)]
    if not with_rows:
        return head
    payloads: list[str] = []
    chunk: list[bytes] = []
    size = total = 0
    for row in rows:
        encoded = _encode(
            (row[0], row[1], row[2], row[3], row[4], row[5], row[6], msgspec.Raw(row[7]))
        )
        total += len(encoded) + 1
        if len(encoded) + 2 > MAX_PAYLOAD_BYTES or total > MAX_ROWS_BYTES:
            return head
        if size + len(encoded) + 2 > MAX_PAYLOAD_BYTES:
            payloads.append(_joined(chunk))
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded) + 1
    payloads.append(_joined(chunk))
    return payloads


def _joined(encoded_rows: list[bytes]) -> str:
    return (b"[" + b",".join(encoded_rows) + b"]").decode()


def decode(payload: str) -> list[Event] | int:
    """The events a notification carries, or the position it names (0 if it names none)."""
    if payload.startswith("["):
        return [
            Event(position, stream, source_id, version, event, event_id, timestamp, body)
            for position, stream, source_id, version, event, event_id, timestamp, body in (
                _decode_rows(payload)
            )
        ]
    try:
        return int(payload)
    except ValueError:
        return 0
