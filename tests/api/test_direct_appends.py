"""The append endpoints answered in front of the router (app/api/direct.py) give every client
exactly what the routed handlers give: the same request sequence, sent to a server with the
direct path and to one without, gets the same statuses, headers and bodies. The direct path
must also really be taking the requests it can (``/metrics`` counts who answered)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import make_settings, running_server

TOKEN = "direct-secret"
EVENT_ID = str(uuid.uuid4())
OTHER_ID = str(uuid.uuid4())


def _one(**fields: Any) -> dict[str, Any]:
    return {"event": "progress", "payload": {"agent_name": "tagger", "progress": 0.5}, **fields}


def _batch(*items: dict[str, Any]) -> dict[str, Any]:
    return {"events": list(items)}


AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}

# (method, path, headers, body as JSON or raw bytes): every way an append can go, in order,
# each depending on the ones before it (versions, event ids already used).
REQUESTS: list[tuple[str, dict[str, str], Any]] = [
    ("/agents/a1/events", AUTH, _one()),
    ("/agents/a1/events", AUTH, _one(event_id=EVENT_ID)),
    ("/agents/a1/events", AUTH, _one(event_id=EVENT_ID)),  # a retry: duplicate, 201
    ("/agents/a1/events", AUTH, _one(expected_version=2)),
    ("/agents/a1/events", AUTH, _one(expected_version=1)),  # conflict: 409
    ("/agents/a1/events", AUTH, _one(event="finished")),  # not an agent event: 400
    ("/agents/a1/events", AUTH, _one(colour="red")),  # unknown field: 400
    ("/agents/a1/events", AUTH, {"event": "progress", "payload": {"progress": 2}}),  # 422
    ("/agents/-a1/events", AUTH, _one()),  # source id: 422
    ("/agents/a1/events", AUTH, _one(event_id="not-a-uuid")),  # 422
    ("/agents/a1/events", AUTH, _one(payload={"agent_name": "t", "message": "x" * 600})),  # 413
    ("/agents/a1/events", AUTH, b'{"event": "progress", "payload": '),  # not JSON: 400
    ("/agents/a1/events", AUTH, b"x" * 3000),  # body over the limit: 413
    ("/agents/a1/events", {**AUTH, "content-type": "text/plain"}, _one()),
    ("/agents/a1/events", {}, _one()),  # no token: 401
    ("/agents/a1/events", {"authorization": "Bearer wrong"}, _one()),  # 401
    ("/agents/a1/events", {"authorization": "Basic abc"}, _one()),  # malformed: 401
    ("/agents/a1/events/", AUTH, _one()),
    ("/agents/a:b@c/events", AUTH, _one()),
    ("/agents/events", AUTH, _batch({"source_id": "b1", **_one()}, {"source_id": "b2", **_one()})),
    ("/agents/events", AUTH, _batch({"source_id": "b1", **_one(event_id=OTHER_ID)})),
    ("/agents/events", AUTH, _batch({"source_id": "b1", **_one(event_id=OTHER_ID)})),  # retry
    ("/agents/events", AUTH, _batch()),  # empty: 400
    ("/agents/events", AUTH, _batch({"source_id": "b1", **_one(expected_version=0)})),  # 409
    (
        "/agents/events",
        AUTH,
        _batch({"source_id": "b3", **_one()}, {"source_id": "bad id", **_one()}),
    ),  # the second is refused: nothing of the batch is written
    (
        "/agents/events",
        AUTH,
        _batch({"source_id": "b4", **_one(event_id=EVENT_ID)}, {"source_id": "b5", **_one()}),
    ),  # the first reuses an id of another source: 409, nothing written
    ("/agents/events", AUTH, {"events": "none"}),  # 400
    ("/agents/events", {}, _batch({"source_id": "b1", **_one()})),  # 401
]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _comparable(text: str) -> str:
    """Server-made ids and times differ between two servers; the rest must not."""
    for known in (EVENT_ID, OTHER_ID):
        text = text.replace(known, "<client id>")
    return _TIME.sub("<time>", _UUID.sub("<id>", text))


async def _answers(tmp_path: Path, direct: bool) -> AsyncIterator[tuple[int, dict[str, str], str]]:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / f'direct-{direct}.db'}",
        DIRECT_APPENDS="1" if direct else "0",
        API_TOKENS=TOKEN,
        REQUEST_MAX_BODY_BYTES="2048",
        EVENT_MAX_PAYLOAD_BYTES="512",
    )
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        for path, headers, body in REQUESTS:
            content = (
                body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
            )
            response = await client.post(path, content=content, headers={**JSON, **headers})
            kept = {
                name: response.headers[name]
                for name in ("content-type", "content-length", "retry-after", "www-authenticate")
                if name in response.headers
            }
            yield response.status_code, kept, _comparable(response.text)
        yield 0, {}, _comparable((await client.get("/events", params={"limit": 1000})).text)


async def test_direct_answers_match_the_router(tmp_path: Path) -> None:
    routed = [answer async for answer in _answers(tmp_path, direct=False)]
    direct = [answer async for answer in _answers(tmp_path, direct=True)]
    for (path, _, body), want, got in zip(REQUESTS, routed, direct, strict=False):
        assert got == want, f"POST {path} {body!r:.80}"
    # The log each one wrote, read back whole, is the same too.
    assert direct[-1] == routed[-1]
    statuses = [status for status, _, _ in routed[:-1]]
    # The sequence covers every outcome (so the comparison above means something).
    assert {201, 400, 401, 409, 413, 422} <= set(statuses)


@pytest.fixture
async def direct_server(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        yield client


def _counted(metrics: str) -> dict[str, int]:
    found = re.findall(r'activity_http_appends_total\{path="(\w+)"\} (\d+)', metrics)
    return {path: int(count) for path, count in found}


async def test_valid_appends_are_answered_directly(direct_server: httpx.AsyncClient) -> None:
    client = direct_server
    for _ in range(3):
        assert (await client.post("/agents/a1/events", json=_one())).status_code == 201
    batch = _batch({"source_id": "b1", **_one()})
    assert (await client.post("/agents/events", json=batch)).status_code == 201
    assert (await client.post("/agents/a1/events", json={"event": "x"})).status_code == 400
    assert _counted((await client.get("/metrics")).text) == {"direct": 4, "router": 1}


async def test_a_body_sent_in_pieces_is_read_whole(direct_server: httpx.AsyncClient) -> None:
    body = httpx.Request("POST", "/", json=_one(event_id=EVENT_ID)).content

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    # No content-length: chunked transfer encoding, many receive() messages.
    response = await direct_server.post("/agents/p1/events", content=pieces(), headers=JSON)
    assert response.status_code == 201, response.text
    assert response.json()["event_id"] == EVENT_ID
    assert _counted((await direct_server.get("/metrics")).text)["direct"] == 1


async def test_a_refused_body_sent_in_pieces_reaches_the_router_whole(
    direct_server: httpx.AsyncClient,
) -> None:
    body = httpx.Request("POST", "/", json=_one(event_id="nope")).content

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 5):
            yield body[start : start + 5]

    response = await direct_server.post("/agents/p1/events", content=pieces(), headers=JSON)
    assert response.status_code == 422
    assert response.json()["extra"] == {"field": "event_id"}
    assert _counted((await direct_server.get("/metrics")).text) == {"direct": 0, "router": 1}
