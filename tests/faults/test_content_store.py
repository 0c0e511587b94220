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
from surrealdb import AsyncSurreal

from tests.support import LocalSite, agent_event, free_port, make_settings, running_server

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


async def test_content_reads_answer_503_while_the_store_is_down_and_recover_by_themselves(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        INGEST_ALLOW_PRIVATE_URLS="true",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        SURREALDB_URL=f"surrealkv://{tmp_path / 'content'}",
    )
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE.read_bytes())}) as site:
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        ):
            done = (await client.post("/ingest", json={"url": f"{site.base_url}/fog"})).json()
            assert done["status"] == "success"
            listed = (await client.get("/content")).json()
            assert [item["id"] for item in listed["items"]] == [done["details"]["record"]]

            # What a SurrealDB server that went down looks like from the service: the
            # store's connection now leads to a port where nothing listens.
            store = server.services.content
            await store._db.close()  # type: ignore[union-attr]
            store._db = AsyncSurreal(f"ws://127.0.0.1:{free_port()}")

            down = await client.get("/content")
            assert down.status_code == 503
            assert down.headers["retry-after"] == "1"
            assert down.json()["detail"].startswith(
                f"content store surrealkv://{tmp_path / 'content'} failed to list content:"
            )

            # Nobody restarts anything: a later request opens a new connection.
            deadline = time.monotonic() + 10
            while (again := await client.get("/content")).status_code != 200:
                assert again.status_code == 503, again.text
                assert time.monotonic() < deadline, again.text
                await asyncio.sleep(0.2)
            assert again.json() == listed
            assert (await client.get("/health")).status_code == 200
            hits = (await client.get("/content/search", params={"q": "fog"})).json()["hits"]
            assert [hit["id"] for hit in hits] == [done["details"]["record"]]
