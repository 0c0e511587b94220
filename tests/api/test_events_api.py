"""``GET /events``, ``/health`` and ``/schema`` over a real server: paging, filters, the
envelope's fields and formats, and payloads that come back exactly as they were sent."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.eventlog import NewEvent, canonical_payload
from tests.support import InProcessServer, agent_event

ENVELOPE_FIELDS = {
    "position",
    "stream",
    "source_id",
    "version",
    "event",
    "event_id",
    "timestamp",
    "payload",
}
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


async def append_ingest(server: InProcessServer, source_id: str, event: str, **payload: Any) -> int:
    """An event on another stream than ``agent`` (no HTTP endpoint writes one yet)."""
    new = NewEvent(
        stream="ingest", source_id=source_id, event=event, payload=canonical_payload(payload)
    )
    (result,) = await server.services.store.append([new])
    return result.position


async def page(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/events", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def read_all(client: httpx.AsyncClient, limit: int, **filters: Any) -> list[dict[str, Any]]:
    """Follow ``next_after`` until the head, checking each page's bookkeeping on the way."""
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(500):
        body = await page(client, after=after, limit=limit, **filters)
        assert len(body["events"]) <= limit
        assert all(e["position"] > after for e in body["events"])
        assert all(e["position"] <= body["next_after"] for e in body["events"])
        assert body["next_after"] >= after
        events.extend(body["events"])
        if body["next_after"] >= body["head"]:
            return events
        assert body["next_after"] > after, "paging made no progress"
        after = body["next_after"]
    raise AssertionError("paging did not reach the head")


async def test_paging_walks_the_whole_log_in_order(client: httpx.AsyncClient) -> None:
    batch = [{"source_id": f"s{n % 3}", **agent_event("progress", n=n)} for n in range(25)]
    assert (await client.post("/agents/events", json={"events": batch})).status_code == 201

    first = await page(client, limit=10)
    assert [e["position"] for e in first["events"]] == list(range(1, 11))
    assert (first["next_after"], first["head"]) == (10, 25)
    second = await page(client, after=10, limit=10)
    assert [e["position"] for e in second["events"]] == list(range(11, 21))
    last = await page(client, after=20, limit=10)
    assert [e["position"] for e in last["events"]] == list(range(21, 26))
    assert (last["next_after"], last["head"]) == (25, 25)
    beyond = await page(client, after=25)
    assert beyond == {"events": [], "next_after": 25, "head": 25}

    default = await page(client)
    assert [e["position"] for e in default["events"]] == list(range(1, 26))
    assert [e["payload"]["n"] for e in await read_all(client, limit=7)] == list(range(25))


async def test_empty_log_reads_as_empty(client: httpx.AsyncClient) -> None:
    assert await page(client) == {"events": [], "next_after": 0, "head": 0}


async def test_filters_narrow_the_page(client: httpx.AsyncClient, server: InProcessServer) -> None:
    for n in range(6):
        source_id = "a1" if n % 2 == 0 else "b1"
        event = "started" if n < 2 else "progress"
        await client.post(f"/agents/{source_id}/events", json=agent_event(event, n=n))
        await append_ingest(server, f"ingest-{n % 2}", "progress", step="storing", n=n)
    everything = await read_all(client, limit=1000)
    assert len(everything) == 12

    def expected(predicate: Any) -> list[int]:
        return [e["position"] for e in everything if predicate(e)]

    cases: list[tuple[dict[str, Any], Any]] = [
        ({"stream": "ingest"}, lambda e: e["stream"] == "ingest"),
        ({"stream": ["agent", "ingest"]}, lambda e: True),
        ({"source_id": "a1"}, lambda e: e["source_id"] == "a1"),
        ({"source_id": ["a1", "ingest-1"]}, lambda e: e["source_id"] in ("a1", "ingest-1")),
        ({"event": "started"}, lambda e: e["event"] == "started"),
        (
            {"stream": "agent", "event": "progress"},
            lambda e: e["stream"] == "agent" and e["event"] == "progress",
        ),
        ({"source_id": "nobody"}, lambda e: False),
    ]
    for filters, predicate in cases:
        for limit in (1000, 2):
            got = [e["position"] for e in await read_all(client, limit=limit, **filters)]
            assert got == expected(predicate), (filters, limit)
    # A filtered page still reports the log's head, and skips over what it scanned.
    body = await page(client, source_id="b1", limit=1000)
    assert body["head"] == 12
    assert body["next_after"] == 12


async def test_envelope_fields_and_formats(client: httpx.AsyncClient) -> None:
    supplied = str(uuid.uuid4())
    answers = [
        (await client.post("/agents/a1/events", json=agent_event("started"))).json(),
        (await client.post("/agents/b1/events", json=agent_event("started"))).json(),
        (
            await client.post(
                "/agents/a1/events", json={**agent_event("progress"), "event_id": supplied.upper()}
            )
        ).json(),
    ]
    logged = (await page(client))["events"]
    assert [set(e) for e in logged] == [ENVELOPE_FIELDS] * 3
    assert [(e["source_id"], e["version"]) for e in logged] == [("a1", 1), ("b1", 1), ("a1", 2)]
    assert [e["stream"] for e in logged] == ["agent"] * 3
    assert [e["event"] for e in logged] == ["started", "started", "progress"]
    assert [e["position"] for e in logged] == [a["position"] for a in answers] == [1, 2, 3]
    assert logged[2]["event_id"] == supplied
    now = datetime.now(UTC)
    for event, answer in zip(logged, answers, strict=True):
        assert str(uuid.UUID(event["event_id"])) == event["event_id"]
        assert event["event_id"] == answer["event_id"]
        assert TIMESTAMP.fullmatch(event["timestamp"]), event["timestamp"]
        moment = datetime.strptime(event["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
        assert abs(moment - now) < timedelta(minutes=5)
        assert event["timestamp"] == answer["timestamp"]
    assert [e["timestamp"] for e in logged] == sorted(e["timestamp"] for e in logged)


ODD_PAYLOADS: list[dict[str, Any]] = [
    {"message": "héllo wörld ✓ 日本語 עברית", "emoji": "🎉👩‍👩‍👧‍👦🏳️‍🌈"},
    {"message": "", "": "empty key", "status": ""},
    {"big": 2**63 - 1, "small": -(2**63), "huge": 10**30, "negative_huge": -(10**25)},
    {"float": 0.1, "exp": 1.5e-300, "zero": 0, "negative_zero": -0.0, "one": 1.0},
    {"nested": {"list": [1, [2, [3, {"deep": None}]]], "empty": {}, "none": []}},
    {"escapes": 'quote " backslash \\ slash / newline \n tab \t nul \u0000 bell \u0007'},
    {"line_separators": "a\u2028b\u2029c", "bom": "\ufeffx", "high": "\U0010ffff"},
    {"booleans": [True, False, None], "order": {"z": 1, "a": 2, "m": 3}},
    {"sse_lookalike": "data: fake\n\nid: 999\nevent: complete\n\n", "cr": "a\r\nb\rc"},
    {"long": "x" * 60_000},  # just under EVENT_MAX_PAYLOAD_BYTES (64 KiB)
]


async def test_odd_payloads_round_trip_exactly(client: httpx.AsyncClient) -> None:
    sent = []
    for n, extra in enumerate(ODD_PAYLOADS):
        payload = {"agent_name": "tagger", **extra}
        response = await client.post(
            f"/agents/odd-{n}/events", json={"event": "progress", "payload": payload}
        )
        assert response.status_code == 201, response.text
        sent.append(payload)
    # Compared as JSON text with the same key order, so 1 != 1.0, key order and
    # big integers all count.
    response = await client.get("/events")
    received = json.loads(response.text)["events"]
    for payload, event in zip(sent, received, strict=True):
        assert json.dumps(event["payload"]) == json.dumps(payload)
    one = await page(client, source_id="odd-2")
    assert one["events"][0]["payload"]["huge"] == 10**30


async def test_health_says_ok(client: httpx.AsyncClient) -> None:
    await client.post("/agents/a1/events", json=agent_event())
    response = await client.get("/health")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["status"] == "ok"


async def test_schema_is_the_openapi_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/schema")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, method in [
        ("/agents/{source_id}/events", "post"),
        ("/agents/events", "post"),
        ("/agents", "get"),
        ("/agents/{source_id}", "get"),
        ("/agents/stream", "get"),
        ("/events", "get"),
        ("/events/stream", "get"),
        ("/health", "get"),
        ("/audit/checkpoints", "get"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from /schema"
