"""The content store goes away under a running server: ``/health`` answers 503 naming it, an
ingest ends as ``error`` with the reason (and its log lines carry its ingest id), and the event
log is untouched by it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import LocalSite, agent_event, make_settings, running_server

ARTICLE = Path(__file__).resolve().parent.parent / "fixtures" / "articles" / "fog_signals.html"


async def wait_for_row(client: httpx.AsyncClient, ingest_id: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        row: dict[str, Any] = (await client.get(f"/ingests/{ingest_id}")).json()
        if row["status"] not in ("pending", "running"):
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"ingest {ingest_id} did not end within {within} s")


async def test_an_unavailable_content_store_fails_ingests_and_health_clearly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        INGEST_ALLOW_PRIVATE_URLS="true",
        ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE.read_bytes())}) as site:
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        ):
            assert (await client.get("/health")).status_code == 200
            # The real store, closed under the running service: every call to it now fails.
            await server.services.content.close()

            health = await client.get("/health")
            assert health.status_code == 503
            body = health.json()
            assert body["status"] == "unavailable"
            assert body["content_store"]["status"] == "error"
            assert "content store mem://" in body["content_store"]["detail"]
            assert body["database"]["status"] == "ok"

            answer = await client.post("/ingests", json={"url": f"{site.base_url}/fog"})
            assert answer.status_code == 202, answer.text
            ingest_id = answer.json()["ingest_id"]
            row = await wait_for_row(client, ingest_id, 30)
            assert row["status"] == "error"
            assert "content store" in row["message"]
            events = (await client.get(f"/ingests/{ingest_id}/events")).json()["events"]
            complete = [e for e in events if e["event"] == "complete"]
            assert len(complete) == 1
            assert complete[0]["payload"]["status"] == "error"
            assert "content store" in complete[0]["payload"]["message"]
            details = complete[0]["payload"]["details"]
            assert details["error_kind"] == "content_store_unavailable"
            assert details["retryable"] is True

            # The log itself is fine: appends go on, positions follow on.
            head = (await client.get("/events", params={"limit": 1})).json()["head"]
            posted = await client.post("/agents/a/events", json=agent_event())
            assert posted.status_code == 201
            assert posted.json()["position"] == head + 1

    tagged = [r for r in caplog.records if getattr(r, "ingest_id", None) == ingest_id]
    assert tagged, "no log line carried the ingest's id"
    assert any("content store" in (r.exc_text or r.getMessage()) for r in tagged)
