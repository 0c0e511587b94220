"""Input and connection limits: each refusal names the limit it hit, and nothing is written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import InProcessServer, agent_event, make_settings, read_frames, running_server

BODY_LIMIT = 128 * 1024
PAYLOAD_LIMIT = 4096


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        REQUEST_MAX_BODY_BYTES=str(BODY_LIMIT),
        EVENT_MAX_PAYLOAD_BYTES=str(PAYLOAD_LIMIT),
        SSE_MAX_CONNECTIONS="3",
        ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    # No Content-Length: the server must count what arrives.
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]


async def test_each_refusal_names_its_limit(client: httpx.AsyncClient) -> None:
    big_message = "x" * (PAYLOAD_LIMIT + 10)
    one = {"source_id": "s1", **agent_event()}
    body = b'{"event": "progress", "payload": {"agent_name": "t", "pad": "' + b"y" * BODY_LIMIT
    cases: list[tuple[str, int, str, dict[str, Any]]] = [
        ("body", 413, "131072 bytes (REQUEST_MAX_BODY_BYTES)",
         {"method": "POST", "url": "/agents/a/events", "content": body + b'"}}',
          "headers": {"content-type": "application/json"}}),
        ("chunked body", 413, "131072 bytes (REQUEST_MAX_BODY_BYTES)",
         {"method": "POST", "url": "/agents/a/events", "content": chunked(body),
          "headers": {"content-type": "application/json"}}),
        ("payload", 413, "4096 bytes per event (EVENT_MAX_PAYLOAD_BYTES)",
         {"method": "POST", "url": "/agents/a/events",
          "json": agent_event(message=big_message)}),
        ("batch payload", 413, "events[1].payload",
         {"method": "POST", "url": "/agents/events",
          "json": {"events": [one, {**one, **agent_event(message=big_message)}]}}),
        ("batch size", 400, "at most 1000 events",
         {"method": "POST", "url": "/agents/events", "json": {"events": [one] * 1001}}),
        ("depth", 422, "32 levels",
         {"method": "POST", "url": "/agents/a/events", "json": agent_event(n=nested(40))}),
        ("page limit", 400, "1000",
         {"method": "GET", "url": "/events", "params": {"limit": 1001}}),
        ("filter count", 400, "at most 20 values of stream",
         {"method": "GET", "url": "/events", "params": [("stream", f"s{i}") for i in range(21)]}),
        ("filter length", 400, "1-200 characters",
         {"method": "GET", "url": "/events", "params": {"source_id": "s" * 201}}),
        ("url length", 400, "at most 2048",
         {"method": "POST", "url": "/ingests", "json": {"url": "https://e.com/" + "a" * 2048}}),
    ]  # fmt: skip
    failures = []
    for name, status, words, request in cases:
        response = await client.request(**request)
        detail = response.json().get("detail", "") if response.content else ""
        if response.status_code != status or words not in detail:
            failures.append(f"{name}: {response.status_code} {detail[:200]!r}")
    assert not failures, "\n".join(failures)
    assert (await client.get("/events")).json()["events"] == []
    # Just under the limits is fine.
    ok = await client.post("/agents/a/events", json=agent_event(message="x" * 3000))
    assert ok.status_code == 201, ok.text


async def test_sse_connections_beyond_the_cap_get_503_with_retry_after(
    server: InProcessServer, client: httpx.AsyncClient
) -> None:
    async def metric(name: str) -> float:
        text = (await client.get("/metrics")).text
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    async with contextlib.AsyncExitStack() as stack:
        for path in ("/events/stream", "/agents/stream", "/stats/stream"):
            response = await stack.enter_async_context(client.stream("GET", path))
            assert response.status_code == 200
            frames = await stack.enter_async_context(contextlib.aclosing(read_frames(response)))
            assert (await anext(frames)).retry is not None
        assert await metric("activity_sse_connections") == 3
        for path in ("/events/stream", "/ingests/x/stream"):
            refused = await client.get(path)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            body = refused.json()
            assert body["status_code"] == 503
            assert "limit of 3 SSE connections (SSE_MAX_CONNECTIONS)" in body["detail"]
            assert body["extra"] == {"limit": 3}
        # Plain reads are not counted.
        assert (await client.get("/events")).status_code == 200
    # Every way out releases the slot: closed streams, a 404 stream, a 400 stream.
    for _ in range(500):
        if await metric("activity_sse_connections") == 0:
            break
        await asyncio.sleep(0.02)
    assert await metric("activity_sse_connections") == 0
    for _ in range(5):
        assert (await client.get("/ingests/nothing/stream")).status_code == 404
        bad = await client.get("/events/stream", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 400
    assert await metric("activity_sse_refused_total") == 2
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            response = await stack.enter_async_context(client.stream("GET", "/events/stream"))
            assert response.status_code == 200
