"""``/agents`` over a real server: appends (idempotent, versioned, atomic batches), the
activity read model behind ``GET /agents``, and the contract's errors for malformed input."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.support import InProcessServer, agent_event, make_settings, running_server

ROW_FIELDS = {
    "source_id",
    "agent_name",
    "status",
    "message",
    "progress",
    "started_at",
    "updated_at",
    "completed_at",
    "result",
    "last_seen",
    "position",
}
ERROR_FIELDS = {"status_code", "detail", "extra"}


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


async def log_head(client: httpx.AsyncClient) -> int:
    response = await client.get("/events", params={"limit": 1})
    assert response.status_code == 200, response.text
    head: int = response.json()["head"]
    return head


async def all_events(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(1000):
        page = (await client.get("/events", params={"after": after, "limit": 1000})).json()
        events.extend(page["events"])
        if page["next_after"] >= page["head"]:
            return events
        after = page["next_after"]
    raise AssertionError("paging /events did not reach the head")


def assert_error(response: httpx.Response, status: int, *names: str) -> dict[str, Any]:
    """The contract's error body, with one of ``names`` in its detail or extra."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == ERROR_FIELDS, body
    assert body["status_code"] == status
    assert isinstance(body["detail"], str)
    assert body["detail"].strip()
    said = f"{body['detail']} {body['extra']}"
    assert any(name in said for name in names), f"none of {names} named in {body}"
    return body


# --- appends -------------------------------------------------------------------------------


async def test_append_answers_position_and_per_source_version(client: httpx.AsyncClient) -> None:
    answers = []
    for source_id, event in [("a1", "started"), ("a1", "progress"), ("b1", "started")]:
        response = await client.post(f"/agents/{source_id}/events", json=agent_event(event))
        assert response.status_code == 201, response.text
        answers.append(response.json())
    assert [(a["position"], a["version"]) for a in answers] == [(1, 1), (2, 2), (3, 1)]
    logged = await all_events(client)
    assert [(e["position"], e["source_id"], e["version"]) for e in logged] == [
        (1, "a1", 1),
        (2, "a1", 2),
        (3, "b1", 1),
    ]
    assert [a["event_id"] for a in answers] == [e["event_id"] for e in logged]


async def test_retry_with_same_event_id_is_acknowledged_once(client: httpx.AsyncClient) -> None:
    await client.post("/agents/other/events", json=agent_event("started"))
    body = {**agent_event("progress", progress=0.25), "event_id": str(uuid.uuid4())}
    first = await client.post("/agents/a1/events", json=body)
    assert first.status_code == 201, first.text
    for _ in range(3):
        retry = await client.post("/agents/a1/events", json=body)
        assert retry.status_code == 201, retry.text
        assert retry.json()["position"] == first.json()["position"] == 2
        assert retry.json()["version"] == first.json()["version"] == 1
    # An upper-case spelling of the same UUID is the same event.
    upper = await client.post(
        "/agents/a1/events", json={**body, "event_id": body["event_id"].upper()}
    )
    assert upper.status_code == 201, upper.text
    assert upper.json()["position"] == 2
    logged = await all_events(client)
    assert [e["event_id"] for e in logged if e["source_id"] == "a1"] == [body["event_id"]]
    assert await log_head(client) == 2


async def test_same_event_id_with_different_content_is_a_conflict(
    client: httpx.AsyncClient,
) -> None:
    event_id = str(uuid.uuid4())
    first = await client.post(
        "/agents/a1/events", json={**agent_event("progress", progress=0.1), "event_id": event_id}
    )
    assert first.status_code == 201, first.text
    changed = await client.post(
        "/agents/a1/events", json={**agent_event("progress", progress=0.9), "event_id": event_id}
    )
    assert_error(changed, 409, "event_id")
    elsewhere = await client.post(
        "/agents/a2/events", json={**agent_event("progress", progress=0.1), "event_id": event_id}
    )
    assert_error(elsewhere, 409, "event_id")
    assert await log_head(client) == 1
    assert (await client.get("/agents/a2")).status_code == 404


async def test_expected_version_mismatch_is_409_and_writes_nothing(
    client: httpx.AsyncClient,
) -> None:
    for event in ("started", "progress"):
        assert (await client.post("/agents/a1/events", json=agent_event(event))).status_code == 201
    wrong = await client.post(
        "/agents/a1/events", json={**agent_event("progress"), "expected_version": 5}
    )
    body = assert_error(wrong, 409, "expected_version")
    # The message names both versions: the one expected and the current one.
    assert {"5", "2"} <= set(re.findall(r"\d+", body["detail"])), body
    assert body["extra"]["expected_version"] == 5
    assert body["extra"]["current_version"] == 2
    # A new source is at version 0: expecting anything else conflicts, expecting 0 succeeds.
    assert_error(
        await client.post("/agents/new/events", json={**agent_event(), "expected_version": 1}),
        409,
        "expected_version",
    )
    assert await log_head(client) == 2
    assert (await client.get("/agents/new")).status_code == 404

    right = await client.post(
        "/agents/a1/events", json={**agent_event("progress"), "expected_version": 2}
    )
    assert right.status_code == 201, right.text
    assert (right.json()["position"], right.json()["version"]) == (3, 3)
    fresh = await client.post("/agents/new/events", json={**agent_event(), "expected_version": 0})
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["version"] == 1
    stale = await client.post(
        "/agents/a1/events", json={**agent_event("progress"), "expected_version": 2}
    )
    assert_error(stale, 409, "expected_version")
    assert await log_head(client) == 4


async def test_batch_appends_all_events_in_order(client: httpx.AsyncClient) -> None:
    await client.post("/agents/a1/events", json=agent_event("started"))
    batch = [
        {"source_id": "a1", **agent_event("progress", progress=0.5), "expected_version": 1},
        {"source_id": "b1", **agent_event("started", agent_name="summarizer")},
        {"source_id": "a1", **agent_event("complete")},
    ]
    response = await client.post("/agents/events", json={"events": batch})
    assert response.status_code == 201, response.text
    assert response.json()["positions"] == [2, 3, 4]
    logged = await all_events(client)
    assert [(e["source_id"], e["event"], e["version"]) for e in logged[1:]] == [
        ("a1", "progress", 2),
        ("b1", "started", 1),
        ("a1", "complete", 3),
    ]
    assert (await client.get("/agents/a1")).json()["status"] == "completed"
    assert (await client.get("/agents/b1")).json()["agent_name"] == "summarizer"


async def test_batch_with_one_bad_event_writes_none_of_it(client: httpx.AsyncClient) -> None:
    await client.post("/agents/a1/events", json=agent_event("started"))
    good = {"source_id": "b1", **agent_event("started")}
    conflicting = {"source_id": "a1", **agent_event("progress"), "expected_version": 7}
    response = await client.post(
        "/agents/events", json={"events": [good, conflicting, {**good, "source_id": "c1"}]}
    )
    assert_error(response, 409, "expected_version")

    invalid = {"source_id": "a1", "event": "progress", "payload": {"progress": 0.5}}
    response = await client.post("/agents/events", json={"events": [good, invalid]})
    body = assert_error(response, 422, "events[1].payload.agent_name")
    assert body["extra"]["field"] == "events[1].payload.agent_name"

    reused = str(uuid.uuid4())
    response = await client.post(
        "/agents/events",
        json={"events": [{**good, "event_id": reused}, {**good, "event_id": reused}]},
    )
    assert_error(response, 400, "event_id")

    assert await log_head(client) == 1
    rows = (await client.get("/agents")).json()
    assert [row["source_id"] for row in rows] == ["a1"]


# --- the read model ------------------------------------------------------------------------


async def test_reads_see_an_append_as_soon_as_it_is_acknowledged(
    client: httpx.AsyncClient,
) -> None:
    for n in range(15):
        source_id = f"run-{n % 4}"
        appended = await client.post(
            f"/agents/{source_id}/events",
            json=agent_event("progress", message=f"step {n}", progress=n / 20),
        )
        assert appended.status_code == 201, appended.text
        position = appended.json()["position"]
        one = await client.get(f"/agents/{source_id}")
        assert one.status_code == 200, one.text
        assert one.json()["position"] == position
        assert one.json()["message"] == f"step {n}"
        listed = {row["source_id"]: row for row in (await client.get("/agents")).json()}
        assert listed[source_id]["position"] == position


async def test_rows_carry_the_contract_fields(client: httpx.AsyncClient) -> None:
    await client.post(
        "/agents/a1/events", json=agent_event("started", message="warming up", progress=0)
    )
    row = (await client.get("/agents/a1")).json()
    assert set(row) >= ROW_FIELDS, set(row)
    assert row["source_id"] == "a1"
    assert row["agent_name"] == "tagger"
    assert row["message"] == "warming up"
    assert row["position"] == 1
    listed = (await client.get("/agents")).json()
    assert listed == [row]


async def test_status_follows_the_events(client: httpx.AsyncClient) -> None:
    started = await client.post(
        "/agents/job-1/events", json=agent_event("started", message="begin")
    )
    row = (await client.get("/agents/job-1")).json()
    assert row["status"] == "running"
    assert row["started_at"] == started.json()["timestamp"]
    assert row["completed_at"] is None

    await client.post(
        "/agents/job-1/events", json=agent_event("progress", message="video 5/10", progress=0.5)
    )
    row = (await client.get("/agents/job-1")).json()
    assert (row["status"], row["message"], row["progress"]) == ("running", "video 5/10", 0.5)
    assert row["started_at"] == started.json()["timestamp"]

    done = await client.post(
        "/agents/job-1/events",
        json=agent_event("complete", message="done", result={"tagged": 10}),
    )
    row = (await client.get("/agents/job-1")).json()
    assert row["status"] == "completed"
    assert row["progress"] == 1.0
    assert row["completed_at"] == done.json()["timestamp"]
    assert row["updated_at"] == done.json()["timestamp"]
    assert row["result"] == {"tagged": 10}
    assert row["position"] == done.json()["position"]

    await client.post("/agents/job-2/events", json=agent_event("started"))
    failed = await client.post(
        "/agents/job-2/events", json=agent_event("failed", message="boom", error="quota exceeded")
    )
    row = (await client.get("/agents/job-2")).json()
    assert row["status"] == "failed"
    assert row["completed_at"] == failed.json()["timestamp"]
    assert row["result"] == {"error": "quota exceeded"}


async def test_list_filters_by_status_and_agent_name(client: httpx.AsyncClient) -> None:
    plan = [
        ("a", "tagger", ["started"]),
        ("b", "tagger", ["started", "complete"]),
        ("c", "summarizer", ["started", "failed"]),
        ("d", "summarizer", ["started", "progress"]),
        ("e", "indexer", ["started"]),
    ]
    for source_id, agent_name, events in plan:
        for event in events:
            response = await client.post(
                f"/agents/{source_id}/events", json=agent_event(event, agent_name=agent_name)
            )
            assert response.status_code == 201, response.text

    async def ids(params: list[tuple[str, str]]) -> set[str]:
        response = await client.get("/agents", params=params)
        assert response.status_code == 200, response.text
        return {row["source_id"] for row in response.json()}

    assert await ids([]) == {"a", "b", "c", "d", "e"}
    assert await ids([("status", "running")]) == {"a", "d", "e"}
    assert await ids([("status", "completed")]) == {"b"}
    assert await ids([("status", "running"), ("status", "failed")]) == {"a", "c", "d", "e"}
    assert await ids([("status", "stalled")]) == set()
    assert await ids([("agent_name", "tagger")]) == {"a", "b"}
    assert await ids([("agent_name", "tagger"), ("agent_name", "summarizer")]) == {
        "a",
        "b",
        "c",
        "d",
    }
    assert await ids([("agent_name", "summarizer"), ("status", "running")]) == {"d"}
    assert await ids([("agent_name", "nobody")]) == set()


async def test_a_run_waiting_for_its_turn_is_listed_by_status_pending(database_url: str) -> None:
    # An instance with no run slots: a run started here stays pending, as behind busy slots.
    settings = make_settings(database_url, AGENT_RUN_CONCURRENCY="0", AGENTS_AUTO_RUN="false")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        accepted = await client.post("/agents/runs", json={"agent": "tagger", "scope": "untagged"})
        assert accepted.status_code == 202, accepted.text
        run = accepted.json()
        busy = await client.post("/agents/busy/events", json=agent_event("started"))
        assert busy.status_code == 201, busy.text
        pending = await client.get("/agents", params={"status": "pending"})
        running = await client.get("/agents", params={"status": "running"})
        stats = (await client.get("/stats")).json()
        wrong = await client.get("/agents", params={"status": "queued"})

    assert run["status"] == "pending"
    assert pending.status_code == 200, pending.text
    assert [(row["source_id"], row["status"]) for row in pending.json()] == [
        (run["source_id"], "pending")
    ]
    assert [row["source_id"] for row in running.json()] == ["busy"]
    assert stats["agents"]["pending"] == 1
    body = assert_error(wrong, 400, "status")
    named = re.findall(r"[a-z]+", body["detail"].partition("one of")[2].partition("got")[0])
    assert named == ["pending", "running", "stalled", "completed", "failed"], body["detail"]


async def test_silent_activity_shows_stalled_until_its_next_event(database_url: str) -> None:
    heartbeat = 0.3
    settings = make_settings(database_url, HEARTBEAT_SECONDS=str(heartbeat))
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        appended = await client.post("/agents/quiet/events", json=agent_event("started"))
        await client.post("/agents/finished/events", json=agent_event("complete"))
        last_seen = datetime.strptime(appended.json()["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
        # The server reads its clock no later than the answer arrives, so any answer received
        # less than 3 heartbeats after the event must still say running.
        early = last_seen + timedelta(seconds=3 * heartbeat - 0.05)
        deadline = time.monotonic() + 20
        while True:
            row = (await client.get("/agents/quiet")).json()
            if datetime.now(UTC) < early:
                assert row["status"] == "running", row
            if row["status"] == "stalled":
                break
            assert row["status"] == "running", row
            assert time.monotonic() < deadline, "never shown as stalled"
            await asyncio.sleep(0.05)

        stalled = (await client.get("/agents", params={"status": "stalled"})).json()
        assert [row["source_id"] for row in stalled] == ["quiet"]
        running = (await client.get("/agents", params={"status": "running"})).json()
        assert running == []
        # A finished activity is never stalled.
        assert (await client.get("/agents/finished")).json()["status"] == "completed"

        again = await client.post("/agents/quiet/events", json=agent_event("progress"))
        assert again.status_code == 201, again.text
        assert (await client.get("/agents/quiet")).json()["status"] == "running"
        running = (await client.get("/agents", params={"status": "running"})).json()
        assert [row["source_id"] for row in running] == ["quiet"]


async def test_unknown_activity_is_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/agents/nobody-here"), 404, "nobody-here")


# --- malformed input -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    why: str
    method: str
    path: str
    status: int
    names: tuple[str, ...]
    json: Any = None
    content: bytes | None = None
    params: list[tuple[str, str]] | None = None


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"child": value}
    return value


_OK = agent_event("progress", progress=0.5)
_ONE = {"source_id": "x1", **_OK}
MALFORMED = [
    Bad("truncated JSON", "POST", "/agents/x1/events", 400, ("body",), content=b'{"event": '),
    Bad("invalid JSON", "POST", "/agents/x1/events", 400, ("body",), content=b"{event: 1}"),
    Bad("payload an array", "POST", "/agents/x1/events", 400, ("payload",),
        json={"event": "progress", "payload": [1, 2]}),
    Bad("payload a string", "POST", "/agents/x1/events", 400, ("payload",),
        json={"event": "progress", "payload": "tagger"}),
    Bad("payload null", "POST", "/agents/x1/events", 400, ("payload",),
        json={"event": "progress", "payload": None}),
    Bad("payload missing", "POST", "/agents/x1/events", 400, ("payload",),
        json={"event": "progress"}),
    Bad("body an array", "POST", "/agents/x1/events", 400, ("object", "data"), json=[_OK]),
    Bad("missing agent_name", "POST", "/agents/x1/events", 422, ("agent_name",),
        json={"event": "progress", "payload": {"progress": 0.5}}),
    Bad("empty agent_name", "POST", "/agents/x1/events", 422, ("agent_name",),
        json=agent_event("progress", agent_name="  ")),
    Bad("agent_name a number", "POST", "/agents/x1/events", 422, ("agent_name",),
        json={"event": "progress", "payload": {"agent_name": 7}}),
    Bad("progress above 1", "POST", "/agents/x1/events", 422, ("progress",),
        json=agent_event("progress", progress=1.5)),
    Bad("progress below 0", "POST", "/agents/x1/events", 422, ("progress",),
        json=agent_event("progress", progress=-0.1)),
    Bad("progress a string", "POST", "/agents/x1/events", 422, ("progress",),
        json=agent_event("progress", progress="0.5")),
    Bad("progress a boolean", "POST", "/agents/x1/events", 422, ("progress",),
        json=agent_event("progress", progress=True)),
    Bad("unknown event name", "POST", "/agents/x1/events", 400, ("event",),
        json=agent_event("exploded")),
    Bad("non-UUID event_id", "POST", "/agents/x1/events", 422, ("event_id",),
        json={**_OK, "event_id": "not-a-uuid"}),
    # Out of range where it is parsed, as a float is: the same 400 for every integer bound.
    Bad("negative expected_version", "POST", "/agents/x1/events", 400, ("expected_version",),
        json={**_OK, "expected_version": -1}),
    Bad("expected_version past the log's", "POST", "/agents/x1/events", 400,
        ("expected_version",), json={**_OK, "expected_version": 2**64}),
    Bad("expected_version a float", "POST", "/agents/x1/events", 400, ("expected_version",),
        json={**_OK, "expected_version": 1.5}),
    Bad("source_id with spaces", "POST", "/agents/has%20space/events", 422, ("source_id",),
        json=_OK),
    Bad("source_id too long", "POST", f"/agents/{'s' * 201}/events", 422, ("source_id",),
        json=_OK),
    Bad("unknown top-level field", "POST", "/agents/x1/events", 400, ("colour",),
        json={**_OK, "colour": "red"}),
    Bad("payload too deep", "POST", "/agents/x1/events", 422, ("payload",),
        json=agent_event("progress", nested=_nested(40))),
    Bad("empty batch", "POST", "/agents/events", 400, ("events",), json={"events": []}),
    Bad("batch over 1000", "POST", "/agents/events", 400, ("events", "1000"),
        json={"events": [_ONE] * 1001}),
    Bad("batch not a list", "POST", "/agents/events", 400, ("events",), json={"events": _ONE}),
    Bad("batch item bad source_id", "POST", "/agents/events", 422, ("events[1].source_id",),
        json={"events": [_ONE, {**_ONE, "source_id": "no spaces"}]}),
    Bad("batch item missing source_id", "POST", "/agents/events", 422, ("source_id",),
        json={"events": [_OK]}),
    Bad("batch item unknown field", "POST", "/agents/events", 400, ("colour",),
        json={"events": [{**_ONE, "colour": "red"}]}),
    Bad("batch item progress", "POST", "/agents/events", 422, ("events[0].payload.progress",),
        json={"events": [{**_ONE, "payload": {"agent_name": "t", "progress": 2}}]}),
    Bad("limit=0", "GET", "/events", 400, ("limit",), params=[("limit", "0")]),
    Bad("limit=5000", "GET", "/events", 400, ("limit",), params=[("limit", "5000")]),
    Bad("after=-1", "GET", "/events", 400, ("after",), params=[("after", "-1")]),
    Bad("after not a number", "GET", "/events", 400, ("after",), params=[("after", "ten")]),
    Bad("status=bogus", "GET", "/agents", 400, ("status",), params=[("status", "bogus")]),
    Bad("agents limit=0", "GET", "/agents", 400, ("limit",), params=[("limit", "0")]),
]  # fmt: skip


async def test_malformed_input_is_refused_naming_the_field(client: httpx.AsyncClient) -> None:
    seeded = await client.post("/agents/x1/events", json=agent_event("started"))
    assert seeded.status_code == 201, seeded.text
    before = await all_events(client)
    rows_before = (await client.get("/agents")).json()
    failures = []
    for case in MALFORMED:
        headers = {"content-type": "application/json"} if case.content is not None else None
        response = await client.request(
            case.method,
            case.path,
            json=case.json,
            content=case.content,
            params=case.params,
            headers=headers,
        )
        try:
            assert_error(response, case.status, *case.names)
        except AssertionError as exc:
            failures.append(f"{case.why}: {exc}")
    assert not failures, "\n".join(failures)
    assert await all_events(client) == before
    assert (await client.get("/agents")).json() == rows_before
