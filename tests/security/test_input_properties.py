"""Property tests for the two parsers every client's input goes through: the event envelope
(payload canonicalisation, encoding, decoding) and ``Last-Event-ID``."""

from __future__ import annotations

import string
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.exceptions import ClientException

from app.api.limits import MAX_POSITION
from app.api.sse import parse_last_event_id
from app.events.envelope import (
    MAX_PAYLOAD_DEPTH,
    Event,
    InvalidPayload,
    canonical_decoded,
    canonical_payload,
    decode_event,
    encode_event,
)

# Odd but valid: any unicode (emoji, RTL, combining marks, NUL), empty strings, integers far
# beyond 64 bits, floats of every magnitude, nesting.
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    st.just(""),
    st.sampled_from(["🎉👩‍👩‍👧‍👦🏳️‍🌈", "\u202eevil", "e\u0301", "\x00", "</script>", "\ud7ff"]),
)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=40,
)
payloads = st.dictionaries(st.text(max_size=20), json_values, max_size=8)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def nest(levels: int) -> dict[str, Any]:
    """Objects and arrays alternating, ``levels`` deep, an object outermost."""
    value: Any = [] if (levels - 1) % 2 else {}
    for level in range(levels - 2, -1, -1):
        value = [value] if level % 2 else {"k": value}
    assert isinstance(value, dict)
    return value


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (1 and 1.0 and True differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(
    payload=payloads,
    position=st.integers(min_value=1, max_value=2**63 - 1),
    version=st.integers(min_value=1, max_value=2**31 - 1),
    source_id=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=200
    ),
)
def test_the_envelope_round_trips_exactly(
    payload: dict[str, Any], position: int, version: int, source_id: str
) -> None:
    raw = canonical_payload(payload)
    assert b"\n" not in bytes(raw)  # an SSE data line must hold it
    assert same(msgspec.json.decode(raw), payload)
    # Canonical means stable: canonicalising the stored bytes again changes nothing.
    assert bytes(canonical_payload(bytes(raw))) == bytes(raw)
    event = Event(
        position=position,
        stream="agent",
        source_id=source_id,
        version=version,
        event="progress",
        event_id="6f1c2a3b-0000-4000-8000-000000000000",
        timestamp="2025-01-24T12:34:56.789Z",
        payload=raw,
    )
    encoded = encode_event(event)
    decoded = decode_event(encoded)
    assert decoded == event
    assert bytes(decoded.payload) == bytes(raw)
    assert same(decoded.payload_dict(), payload)
    assert encode_event(decoded) == encoded


@given(payload=payloads)
def test_payloads_deeper_than_the_limit_are_refused_and_others_accepted(
    payload: dict[str, Any],
) -> None:
    if depth(payload) <= MAX_PAYLOAD_DEPTH:
        canonical_payload(payload)
    else:
        with pytest.raises(InvalidPayload, match=str(MAX_PAYLOAD_DEPTH)):
            canonical_payload(payload)


def test_the_depth_limit_is_exact() -> None:
    assert depth(nest(MAX_PAYLOAD_DEPTH)) == MAX_PAYLOAD_DEPTH
    canonical_payload(nest(MAX_PAYLOAD_DEPTH))
    with pytest.raises(InvalidPayload, match=f"deeper than {MAX_PAYLOAD_DEPTH} levels"):
        canonical_payload(nest(MAX_PAYLOAD_DEPTH + 1))


@given(payload=payloads)
def test_a_payload_decoded_from_json_is_made_canonical_as_any_other(
    payload: dict[str, Any],
) -> None:
    """Reported events' payloads, decoded from the request, take the shorter check."""
    decoded = msgspec.json.decode(msgspec.json.encode(payload))
    if depth(payload) <= MAX_PAYLOAD_DEPTH:
        assert bytes(canonical_decoded(decoded)) == bytes(canonical_payload(payload))
    else:
        with pytest.raises(InvalidPayload, match=f"deeper than {MAX_PAYLOAD_DEPTH} levels"):
            canonical_decoded(decoded)


def test_the_depth_limit_is_exact_for_decoded_payloads_too() -> None:
    canonical_decoded(nest(MAX_PAYLOAD_DEPTH))
    for deeper in (nest(MAX_PAYLOAD_DEPTH + 1), {"a": [nest(MAX_PAYLOAD_DEPTH)]}):
        with pytest.raises(InvalidPayload, match=f"deeper than {MAX_PAYLOAD_DEPTH} levels"):
            canonical_decoded(deeper)


@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_a_payload_that_is_not_an_object_is_refused(value: Any) -> None:
    with pytest.raises(InvalidPayload, match="must be a JSON object"):
        canonical_payload(msgspec.json.encode(value))


# --- Last-Event-ID ----------------------------------------------------------------------------

blanks = st.text(alphabet=" \t", max_size=3)
positions = st.integers(min_value=0, max_value=MAX_POSITION)


def refused(header: str | None, query: str | None) -> ClientException:
    with pytest.raises(ClientException) as caught:
        parse_last_event_id(header, query)
    assert caught.value.status_code == 400
    assert "non-negative integer" in caught.value.detail
    return caught.value


@given(position=positions, before=blanks, after=blanks, zeros=st.integers(0, 3))
def test_every_position_the_log_can_hold_is_accepted(
    position: int, before: str, after: str, zeros: int
) -> None:
    digits = "0" * zeros + str(position)
    if len(digits) > 19:
        digits = str(position)  # leading zeros count as digits too
    text = f"{before}{digits}{after}"
    assert parse_last_event_id(text, None) == int(digits)
    assert parse_last_event_id(None, text) == int(digits)
    assert parse_last_event_id("", text) == int(digits)
    assert parse_last_event_id(" ", text) == int(digits)


@given(position=st.integers(min_value=MAX_POSITION + 1, max_value=10**19 - 1))
def test_19_digit_numbers_past_the_largest_position_are_refused(position: int) -> None:
    # A position is a signed 64-bit integer: 2**63 and up can name no event, and used to be
    # answered with a reset instead of the contract's 400.
    assert refused(str(position), None).extra == {"field": "Last-Event-ID"}
    assert refused(None, str(position)).extra == {"field": "last_event_id"}


@given(header=positions, query=st.one_of(positions.map(str), st.text()))
def test_the_header_wins_over_the_query(header: int, query: str) -> None:
    # Whatever the query holds, even garbage: a reconnecting EventSource keeps its first URL.
    assert parse_last_event_id(str(header), query) == header


@given(digits=st.text(alphabet=string.digits, min_size=20, max_size=40))
def test_more_than_19_digits_are_refused(digits: str) -> None:
    error = refused(digits, None)
    assert error.extra == {"field": "Last-Event-ID"}
    assert refused(None, digits).extra == {"field": "last_event_id"}


@given(text=st.text(min_size=1))
def test_anything_but_ascii_digits_is_refused(text: str) -> None:
    stripped = text.strip()
    if not stripped:
        assert parse_last_event_id(text, None) is None  # blank: as if absent
        return
    if stripped.isascii() and stripped.isdigit() and len(stripped) <= 19:
        assert parse_last_event_id(text, None) == int(stripped)
        return
    refused(text, None)
    refused(None, text)


@pytest.mark.parametrize("text", ["-1", "+1", "1.0", "1e3", "0x10", "١٢", "\uff11", "1 2", "²"])
def test_lookalikes_of_numbers_are_refused(text: str) -> None:
    refused(text, None)


def test_nothing_given_means_from_the_start_or_live() -> None:
    assert parse_last_event_id(None, None) is None
    assert parse_last_event_id("  ", "") is None


@pytest.mark.parametrize(
    "payload",
    [{1: "a"}, {"a": 1, 2.5: "b"}, {"a": {2: "b"}}, {"a": [{(1, 2): "b"}]}],
    ids=["flat int key", "flat float key", "nested int key", "tuple key in a list"],
)
def test_a_payload_key_that_is_not_a_string_is_refused(payload: dict[Any, Any]) -> None:
    # The encoder would write int and float keys as text: they are refused before that.
    with pytest.raises(InvalidPayload, match="keys must be strings"):
        canonical_payload(payload)


def test_a_payload_that_contains_itself_is_refused() -> None:
    payload: dict[str, Any] = {"a": 1}
    payload["again"] = [payload]
    with pytest.raises(InvalidPayload, match=f"deeper than {MAX_PAYLOAD_DEPTH} levels"):
        canonical_payload(payload)
