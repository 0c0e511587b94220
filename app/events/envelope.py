"""The event envelope: what the log stores and what every client receives.

The payload is kept as raw JSON bytes (:class:`msgspec.Raw`) from the moment it is validated:
what a client sent is canonicalised once, stored as text, and embedded verbatim in every
envelope and SSE frame afterwards, so nothing is re-encoded per reader and nothing drifts.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = [
    "MAX_PAYLOAD_DEPTH",
    "Event",
    "InvalidPayload",
    "NewEvent",
    "canonical_decoded",
    "canonical_payload",
    "decode_event",
    "encode_event",
    "format_timestamp",
    "new_event_id",
    "new_event_ids",
    "parse_event_id",
    "utc_now",
]

# Deeper payloads are refused: they are never useful and cost stack on every decoder.
MAX_PAYLOAD_DEPTH = 32


class Event(msgspec.Struct, frozen=True, gc=False):
    """One persisted event, exactly as the contract's envelope."""

    position: int
    stream: str
    source_id: str
    version: int
    event: str
    event_id: str
    timestamp: str
    payload: msgspec.Raw

    def payload_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = _dict_decoder.decode(self.payload)
        return value


class NewEvent(msgspec.Struct, frozen=True, gc=False):
    """An event to append. ``payload`` is canonical JSON from :func:`canonical_payload`."""

    stream: str
    source_id: str
    event: str
    payload: msgspec.Raw
    event_id: str | None = None
    expected_version: int | None = None


class InvalidPayload(ValueError):
    """A payload that is not a JSON object, or one nested deeper than allowed."""


_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_any_decoder = msgspec.json.Decoder()


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> Event:
    return _event_decoder.decode(data)


def canonical_payload(payload: Any) -> msgspec.Raw:
    """Validate ``payload`` (a mapping, or JSON bytes of an object) and return compact JSON.

    Compact output matters beyond size: an SSE ``data:`` line must not contain a newline.
    """
    if isinstance(payload, (bytes, bytearray, memoryview, msgspec.Raw)):
        try:
            payload = _any_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise InvalidPayload(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {_json_type(payload)}")
    try:
        encoded = _encoder.encode(payload)
    except RecursionError:
        raise InvalidPayload(f"payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels") from None
    except (TypeError, msgspec.EncodeError) as exc:
        _check_depth(payload, 1)  # the clearer refusal, if it applies
        raise InvalidPayload(f"payload is not JSON-serialisable: {exc}") from exc
    if b"[" in encoded or encoded.count(b"{") > 1:
        _check_depth(payload, 1)
    else:
        # No bracket but the object's own: a flat object (the usual payload), checked here
        # in C; only its keys are left to check (the encoder writes other keys as text).
        for key in payload:
            if type(key) is not str:
                raise InvalidPayload("payload keys must be strings")
    return msgspec.Raw(encoded)


def canonical_decoded(payload: dict[str, Any]) -> msgspec.Raw:
    """:func:`canonical_payload` for an object just decoded from JSON text, whose keys are
    text by construction: only its nesting is checked, and only if it nests at all, which an
    agent's usual flat payload does not."""
    for value in payload.values():
        if type(value) is dict or type(value) is list:
            _check_depth(payload, 1)
            break
    return msgspec.Raw(_encoder.encode(payload))


def _check_depth(value: Any, depth: int) -> None:
    if depth > MAX_PAYLOAD_DEPTH:
        raise InvalidPayload(f"payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidPayload("payload keys must be strings")
            if isinstance(item, (dict, list)):
                _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)):
                _check_depth(item, depth + 1)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


# The variant's two bits (binary 10) over the first hex digit of the random tail.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_event_id() -> str:
    return new_event_ids(1)[0]


def new_event_ids(count: int) -> list[str]:
    """``count`` fresh version 7 UUIDs, in ascending order: the millisecond clock (and a
    fraction of the next millisecond) first, then 62 random bits from the OS.

    Time-ordered ids are inserted at the right-hand end of the event_id index, so a commit of
    a hundred events rewrites a page or two of that index instead of one page per event (as
    random version 4 ids do), which is a large share of what the commit writes and syncs.
    """
    now = time.time_ns()
    millis, nanos = divmod(now, 1_000_000)
    stamp = f"{millis & 0xFFFFFFFFFFFF:012x}"
    # RFC 9562's method 3: rand_a carries the sub-millisecond fraction, in 1/4096 steps.
    head = f"{stamp[:8]}-{stamp[8:]}-7{nanos * 4096 // 1_000_000:03x}-"
    pool = os.urandom(8 * count).hex()
    found = [
        f"{head}{_VARIANT[pool[start]]}{pool[start + 1 : start + 4]}-{pool[start + 4 : start + 16]}"
        for start in range(0, 16 * count, 16)
    ]
    found.sort()
    return found


def parse_event_id(value: str) -> str:
    """Normalise a client-supplied event id to the canonical lowercase UUID form."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        shown = value[:40] if isinstance(value, str) else value
        raise ValueError(f"event_id must be a UUID, got {shown!r}") from None


def format_timestamp(moment: datetime) -> str:
    """RFC 3339, UTC, millisecond precision: ``2025-01-24T12:34:56.789Z``."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def utc_now() -> str:
    return format_timestamp(datetime.now(UTC))
