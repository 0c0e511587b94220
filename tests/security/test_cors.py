"""CORS: same-origin only unless ``CORS_ORIGINS`` names origins (or ``*``), over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.support import agent_event, make_settings, running_server

ALLOWED = "https://dashboard.example.org"
OTHER = "https://evil.example.net"


@asynccontextmanager
async def client_for(tmp_path: Path, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", **env)
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        yield client


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def test_same_origin_only_by_default(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        response = await client.get("/events", headers={"Origin": OTHER})
        assert response.status_code == 200
        assert cors_headers(response) == {}
        answer = await client.options("/agents/a/events", headers=preflight(OTHER))
        assert cors_headers(answer) == {}


async def test_configured_origins_get_cors_headers_and_others_do_not(tmp_path: Path) -> None:
    env = {"CORS_ORIGINS": f"{ALLOWED},http://localhost:5173", "API_TOKENS": "tok-123456"}
    async with client_for(tmp_path, **env) as client:
        answer = await client.options("/agents/a/events", headers=preflight(ALLOWED))
        assert answer.status_code in (200, 204), answer.text
        assert answer.headers["access-control-allow-origin"] == ALLOWED
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        assert "POST" in answer.headers["access-control-allow-methods"]
        # A preflight carries no credentials: it is answered even though writes need a token.
        refused = await client.options("/agents/a/events", headers=preflight(OTHER))
        assert "access-control-allow-origin" not in refused.headers

        posted = await client.post(
            "/agents/a/events",
            json=agent_event(),
            headers={"Origin": ALLOWED, "Authorization": "Bearer tok-123456"},
        )
        assert posted.status_code == 201
        assert posted.headers["access-control-allow-origin"] == ALLOWED
        assert "x-request-id" in posted.headers["access-control-expose-headers"].lower()
        other = await client.get("/events", headers={"Origin": OTHER})
        assert "access-control-allow-origin" not in other.headers
        # An error is readable by the allowed page too (it needs the 401 to ask for a token).
        unauthorized = await client.post(
            "/agents/a/events", json=agent_event(), headers={"Origin": ALLOWED}
        )
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == ALLOWED


async def test_a_wildcard_only_when_configured(tmp_path: Path) -> None:
    async with client_for(tmp_path, CORS_ORIGINS="*") as client:
        response = await client.get("/events", headers={"Origin": OTHER})
        assert response.headers["access-control-allow-origin"] == "*"
        answer = await client.options("/events/stream", headers=preflight(OTHER, "GET"))
        assert answer.headers["access-control-allow-origin"] == "*"
