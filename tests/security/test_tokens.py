"""Access control over real sockets: every write endpoint needs an API token, every read
endpoint a read (or API) token when read tokens are set, SSE takes ``access_token`` in the query,
and tokens never reach a log. The route table is walked, so an endpoint added later is covered
without anyone adding it here."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute

from app.api.security import access_for
from tests.support import InProcessServer, agent_event, make_settings, read_frames, running_server

API_TOKENS = ("write-token-one-7f3a", "write-token-two-91cc")
READ_TOKEN = "read-token-5d20e8"
WRONG = "not-a-token-at-all"

# The routes anyone may call: the dashboard page and its assets, /health, the OpenAPI document.
PUBLIC = {
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/web/{file_path}"),
    ("HEAD", "/web/{file_path}"),
    ("GET", "/schema"),
    ("GET", "/schema/openapi.json"),
    ("GET", "/schema/{path}"),
}
WRITES = {
    ("POST", "/agents/{source_id}/events"),
    ("POST", "/agents/events"),
    ("POST", "/agents/runs"),
    ("POST", "/ingest"),
    ("POST", "/ingest/stream"),
    ("POST", "/ingests"),
    ("DELETE", "/ingests/{ingest_id}"),
}
PATH_VALUES = {
    "source_id": "probe",
    "ingest_id": "probe",
    "content_id": "video:probe",
    "file_path": "app.js",
    "path": "x",
}


def route_table(app: Litestar) -> list[tuple[str, str]]:
    """(method, path template) of every handler the app serves, OPTIONS aside."""
    found = set()
    for route in app.routes:
        assert isinstance(route, HTTPRoute), route
        for method in route.methods:
            if method != "OPTIONS":
                found.add((method, route.path_format))
    return sorted(found)


def concrete(path_format: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path_format)


def body_for(method: str, path_format: str) -> Any:
    """A body that passes the guard quickly without touching the network (a refused URL)."""
    if method != "POST":
        return None
    if path_format == "/agents/{source_id}/events":
        return agent_event("progress")
    if path_format == "/agents/events":
        return {"events": [{"source_id": "probe", **agent_event("progress")}]}
    if path_format == "/agents/runs":
        return {"agent": "tagger", "scope": ["video:nothing"]}
    return {"url": "not a url"}


async def call(
    client: httpx.AsyncClient, method: str, path_format: str, token: str | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with client.stream(
        method, concrete(path_format), headers=headers, json=body_for(method, path_format)
    ) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
        return response


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        API_TOKENS=",".join(API_TOKENS),
        READ_TOKENS=READ_TOKEN,
        ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    async with running_server(settings) as server:
        yield server


@pytest.fixture
async def client(guarded: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.base_url, timeout=30) as opened:
        yield opened


def assert_refused(response: httpx.Response, *secrets: str) -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    body = response.json()
    assert body["status_code"] == 401
    assert body["extra"] == {}
    assert "token" in body["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    for secret in secrets:
        assert secret not in response.text


def test_every_route_is_classified_and_only_the_known_ones_are_public(
    guarded: InProcessServer,
) -> None:
    routes = route_table(guarded.app)
    assert ("GET", "/metrics") in routes
    public = {r for r in routes if access_for(*r) == "public"}
    writes = {r for r in routes if access_for(*r) == "write"}
    assert public == PUBLIC, "a new public route must be a deliberate decision"
    assert writes == WRITES | {r for r in routes if r[0] in ("PUT", "PATCH")}


async def test_every_route_refuses_a_missing_or_wrong_token_and_takes_the_right_one(
    guarded: InProcessServer, client: httpx.AsyncClient
) -> None:
    for method, path_format in route_table(guarded.app):
        access = access_for(method, path_format)
        anonymous = await call(client, method, path_format, None)
        if access == "public":
            # (/schema/{path} answers 404 for a document it does not have.)
            assert anonymous.status_code in (200, 404), (method, path_format, anonymous.text)
            continue
        assert_refused(anonymous)
        assert_refused(await call(client, method, path_format, WRONG), WRONG)
        # A read token grants reads only.
        with_read = await call(client, method, path_format, READ_TOKEN)
        if access == "write":
            assert_refused(with_read, READ_TOKEN)
        else:
            assert with_read.status_code != 401, (method, path_format, with_read.text)
        for token in API_TOKENS:
            accepted = await call(client, method, path_format, token)
            assert accepted.status_code != 401, (method, path_format, accepted.text)
            assert accepted.status_code < 500, (method, path_format, accepted.text)


async def test_a_refused_write_writes_nothing_and_an_accepted_one_is_in_the_log(
    client: httpx.AsyncClient,
) -> None:
    refused = await client.post("/agents/a1/events", json=agent_event("started"))
    assert_refused(refused)
    auth = {"Authorization": f"Bearer {API_TOKENS[1]}"}
    page = (await client.get("/events", headers=auth)).json()
    assert page["events"] == []
    accepted = await client.post("/agents/a1/events", json=agent_event("started"), headers=auth)
    assert accepted.status_code == 201, accepted.text
    page = (await client.get("/events", headers={"Authorization": f"Bearer {READ_TOKEN}"})).json()
    assert [e["source_id"] for e in page["events"]] == ["a1"]


async def test_a_malformed_authorization_header_is_refused_with_a_clear_reason(
    client: httpx.AsyncClient,
) -> None:
    for header in (f"Basic {READ_TOKEN}", "Bearer", f"Token {READ_TOKEN}", READ_TOKEN):
        response = await client.get("/events", headers={"Authorization": header})
        assert_refused(response, READ_TOKEN)
        assert "Bearer" in response.json()["detail"]
    # The scheme is case-insensitive.
    ok = await client.get("/events", headers={"Authorization": f"bearer {READ_TOKEN}"})
    assert ok.status_code == 200


async def test_sse_takes_the_token_in_the_query_other_reads_do_not(
    client: httpx.AsyncClient,
) -> None:
    auth = {"Authorization": f"Bearer {API_TOKENS[0]}"}
    posted = await client.post("/agents/a1/events", json=agent_event("started"), headers=auth)
    assert posted.status_code == 201
    for path in ("/events/stream", "/agents/stream", "/stats/stream"):
        async with client.stream("GET", path, params={"access_token": READ_TOKEN}) as response:
            assert response.status_code == 200, path
            frames = read_frames(response)
            assert (await anext(frames)).retry is not None
        async with client.stream("GET", path, params={"access_token": WRONG}) as response:
            await response.aread()
            assert_refused(response, WRONG)
    async with client.stream(
        "GET", "/events/stream", params={"access_token": READ_TOKEN, "last_event_id": "0"}
    ) as response:
        frames = read_frames(response)
        await anext(frames)
        first = await anext(frames)
        assert (first.id, first.event) == ("1", "started")
    # Not on a plain read: a token in a URL ends up in proxies' logs and browser history.
    response = await client.get("/events", params={"access_token": READ_TOKEN})
    assert_refused(response, READ_TOKEN)
    assert "access_token" not in response.json()["detail"]
    stream_refusal = await client.get("/events/stream")
    assert "access_token" in stream_refusal.json()["detail"]


async def test_health_is_open_but_says_only_its_status_without_a_token(
    client: httpx.AsyncClient,
) -> None:
    anonymous = await client.get("/health")
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok"}
    detailed = await client.get("/health", headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert detailed.status_code == 200
    assert {"database", "content_store", "appends"} <= set(detailed.json())


async def test_the_dashboard_page_loads_and_its_data_calls_need_the_token(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert (await client.get("/web/app.js")).status_code == 200
    assert_refused(await client.get("/stats"))
    with_token = await client.get("/stats", headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert with_token.status_code == 200


async def test_tokens_never_reach_the_log(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("app", "app.access", "uvicorn", "litestar"):
        caplog.set_level(logging.DEBUG, logger=name)
    async with client.stream(
        "GET", "/events/stream", params={"access_token": READ_TOKEN, "stream": "agent"}
    ) as response:
        assert response.status_code == 200
    await client.get("/events/stream", params={"access_token": WRONG})
    await client.post(
        "/agents/a/events",
        json=agent_event(),
        headers={"Authorization": f"Bearer {API_TOKENS[0]}"},
    )
    # The server's records (the test's own HTTP client logs its URLs; that is not the server).
    server_side = [
        record for record in caplog.records if not record.name.startswith(("httpx", "httpcore"))
    ]
    access_lines = [r.getMessage() for r in server_side if r.name == "app.access"]
    redacted = "/events/stream?access_token=[redacted]&stream=agent"
    assert any(redacted in line for line in access_lines), access_lines
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in server_side)
    for secret in (READ_TOKEN, WRONG, *API_TOKENS):
        assert secret not in everything


async def test_without_tokens_configured_everything_is_open(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'open.db'}")
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        assert (await client.post("/agents/a/events", json=agent_event())).status_code == 201
        assert (await client.get("/events")).status_code == 200
        assert set((await client.get("/health")).json()) > {"status"}


async def test_api_tokens_alone_guard_writes_and_leave_reads_open(tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'writes.db'}", API_TOKENS=API_TOKENS[0]
    )
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        assert_refused(await client.post("/agents/a/events", json=agent_event()))
        assert_refused(await client.delete("/ingests/x"))
        assert (await client.get("/events")).status_code == 200
        assert (await client.get("/agents")).status_code == 200
        ok = await client.post(
            "/agents/a/events",
            json=agent_event(),
            headers={"Authorization": f"Bearer {API_TOKENS[0]}"},
        )
        assert ok.status_code == 201
