"""Ingests end to end through a real server: the job runs on the server, the SSE response is
only a tail of the ingest's events, and the log tells the whole story afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.content import article_key
from app.ingest.pipeline import STEPS
from tests.support import (
    InProcessServer,
    LocalSite,
    SseFrame,
    eventually,
    make_settings,
    read_frames,
    running_server,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "articles"
ARTICLE = (FIXTURES / "fog_signals.html").read_bytes()
TITLE = "How Lighthouse Keepers Listened to the Fog"


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite(
        {
            "/fog": (200, "text/html; charset=utf-8", ARTICLE),
            "/slow": (200, "text/html; charset=utf-8", ARTICLE),
            "/other": (200, "text/html; charset=utf-8", ARTICLE.replace(b"Fog", b"Mist")),
        }
    ) as running:
        yield running


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        INGEST_ALLOW_PRIVATE_URLS="true",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_LEASE_SECONDS="5",
    )
    async with running_server(settings) as running:
        yield running


async def collect(response: httpx.Response) -> list[SseFrame]:
    """Every frame with an id until the stream ends (after ``complete``)."""
    frames = []
    async for frame in read_frames(response):
        if frame.id is not None:
            frames.append(frame)
    return frames


def steps(frames: list[SseFrame]) -> list[str]:
    return [frame.json()["step"] for frame in frames if frame.event == "progress"]


async def wait_status(client: httpx.AsyncClient, ingest_id: str, *wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row: dict[str, Any] = (await client.get(f"/ingests/{ingest_id}")).json()
        if row["status"] in wanted:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"ingest {ingest_id} never reached {wanted}")


async def test_an_article_ingest_streams_every_step_then_stores_and_archives(
    server: InProcessServer, site: LocalSite
) -> None:
    url = f"{site.base_url}/fog"
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        client.stream("POST", "/ingest/stream", json={"url": url}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        ingest_id = response.headers["x-ingest-id"]
        frames = await collect(response)

    assert steps(frames) == list(STEPS["article"])
    complete = frames[-1]
    assert complete.event == "complete"
    result = complete.json()
    assert result["type"] == "article"
    assert result["status"] == "success"
    assert result["details"]["title"] == TITLE
    # Frame data is the payload alone; ids are log positions, increasing.
    assert "step" in frames[1].json() or frames[1].event != "progress"
    ids = [int(frame.id or 0) for frame in frames]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)

    key = article_key(url)
    record = await server.services.content.get("article", key)
    assert record is not None
    assert record["title"] == TITLE
    assert record["author"] == "Margaret Ellery"
    assert "fog" in record["text"].lower()
    archive = Path(result["details"]["archive_path"])
    html = await asyncio.to_thread(archive.read_text, encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    text = await asyncio.to_thread(archive.with_suffix(".txt").read_text, encoding="utf-8")
    assert text == record["text"]

    async with httpx.AsyncClient(base_url=server.base_url) as client:
        row = (await client.get(f"/ingests/{ingest_id}")).json()
    assert row["status"] == "success"
    assert row["type"] == "article"
    assert row["url"] == url
    assert row["completed_at"] is not None
    assert row["result"]["details"]["record"] == f"article:{key}"


async def test_an_article_already_stored_is_skipped(
    server: InProcessServer, site: LocalSite
) -> None:
    url = f"{site.base_url}/fog"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        first = (await client.post("/ingest", json={"url": url})).json()
        second = (await client.post("/ingest", json={"url": url})).json()
    assert first["status"] == "success"
    assert second["status"] == "skipped"
    assert second["ingest_id"] != first["ingest_id"]
    assert site.hits["/fog"] == 1


async def test_the_same_url_requested_at_once_is_one_ingest(
    server: InProcessServer, site: LocalSite
) -> None:
    site.delays["/slow"] = 1.0
    url = f"{site.base_url}/slow"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        answers = await asyncio.gather(
            *(client.post("/ingests", json={"url": url}) for _ in range(6))
        )
        assert {answer.status_code for answer in answers} == {202}
        bodies = [answer.json() for answer in answers]
        assert len({body["ingest_id"] for body in bodies}) == 1
        assert sum(body["created"] for body in bodies) == 1
        assert bodies[0]["stream_url"] == f"/ingests/{bodies[0]['ingest_id']}/stream"
        await wait_status(client, bodies[0]["ingest_id"], "success")
        requested = (await client.get("/events", params={"event": "requested"})).json()["events"]
    assert len(requested) == 1
    assert site.hits["/slow"] == 1


async def test_a_client_that_disconnects_does_not_stop_the_ingest_and_resumes_exactly(
    server: InProcessServer, site: LocalSite
) -> None:
    site.delays["/slow"] = 1.0
    url = f"{site.base_url}/slow"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        ingest_id = (await client.post("/ingests", json={"url": url})).json()["ingest_id"]
        seen: list[SseFrame] = []
        async with client.stream("GET", f"/ingests/{ingest_id}/stream") as response:
            async for frame in read_frames(response):
                if frame.id is not None:
                    seen.append(frame)
                if frame.event == "progress" and frame.json()["step"] == "fetching":
                    break  # drop the connection mid-ingest
        assert seen[-1].event == "progress"
        await wait_status(client, ingest_id, "success")

        last = seen[-1].id
        async with client.stream(
            "GET", f"/ingests/{ingest_id}/stream", headers={"Last-Event-ID": str(last)}
        ) as response:
            rest = await collect(response)
        everything = (await client.get(f"/ingests/{ingest_id}/events")).json()["events"]
        assert [int(f.id or 0) for f in seen + rest] == [e["position"] for e in everything]
        assert rest[-1].event == "complete"

        finished = await client.get(
            f"/ingests/{ingest_id}/stream", params={"last_event_id": rest[-1].id}
        )
        assert finished.status_code == 204


async def test_cancelling_a_running_ingest_ends_it_as_an_error(
    server: InProcessServer, site: LocalSite
) -> None:
    site.delays["/slow"] = 1.5
    url = f"{site.base_url}/slow"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        ingest_id = (await client.post("/ingests", json={"url": url})).json()["ingest_id"]
        async with client.stream("GET", f"/ingests/{ingest_id}/stream") as response:
            async for frame in read_frames(response):
                if frame.event == "progress" and frame.json()["step"] == "fetching":
                    break
        cancelled = await client.delete(f"/ingests/{ingest_id}")
        assert cancelled.status_code == 200
        row = cancelled.json()
        assert row["status"] == "error"
        assert row["message"] == "Cancelled by request"
        assert row["result"]["details"]["error_kind"] == "cancelled"

        again = await client.delete(f"/ingests/{ingest_id}")
        assert again.status_code == 409
        assert "already finished" in again.json()["detail"]

        # The job stops: nothing follows the complete event, and nothing was stored.
        assert await eventually(lambda: server.services.jobs.running_count == 0)
        events = (await client.get(f"/ingests/{ingest_id}/events")).json()["events"]
        assert events[-1]["event"] == "complete"
        assert [e["event"] for e in events].count("complete") == 1
    assert await server.services.content.get("article", article_key(url)) is None


async def test_as_of_shows_an_ingest_as_it_was(server: InProcessServer, site: LocalSite) -> None:
    url = f"{site.base_url}/fog"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        done = (await client.post("/ingest", json={"url": url})).json()
        ingest_id = done["ingest_id"]
        events = (await client.get(f"/ingests/{ingest_id}/events")).json()["events"]
        fetched = next(e for e in events if e["payload"].get("step") == "fetched")
        then = await client.get(f"/ingests/{ingest_id}", params={"as_of": fetched["position"]})
        assert then.status_code == 200
        assert then.json()["status"] == "running"
        assert then.json()["step"] == "fetched"
        assert then.json()["completed_at"] is None
        before = await client.get(
            f"/ingests/{ingest_id}", params={"as_of": events[0]["position"] - 1}
        )
        assert before.status_code == 404
        now = (await client.get(f"/ingests/{ingest_id}")).json()
        assert now["status"] == "success"

        paged = (await client.get(f"/ingests/{ingest_id}/events", params={"limit": 3})).json()
        assert [e["position"] for e in paged["events"]] == [e["position"] for e in events[:3]]
        rest = (
            await client.get(f"/ingests/{ingest_id}/events", params={"after": paged["next_after"]})
        ).json()
        assert paged["events"] + rest["events"] == events

        listed = (await client.get("/ingests", params={"status": "success"})).json()
        assert [row["ingest_id"] for row in listed] == [ingest_id]
        assert (await client.get("/ingests", params={"status": "running"})).json() == []
        assert (await client.get("/ingests", params={"status": "bogus"})).status_code == 400
        assert (await client.get("/ingests/ing_missing")).status_code == 404
        assert (await client.get("/ingests/ing_missing/events")).status_code == 404
        assert (await client.get("/ingests/ing_missing/stream")).status_code == 404


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("ftp://example.com/file", "http"),
        ("not a url", "http"),
        ("https://", "host"),
        ("https://example.com/" + "a" * 3000, "long"),
    ],
)
async def test_bad_urls_are_refused_with_the_problem_named(
    server: InProcessServer, url: str, problem: str
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        head = (await client.get("/events")).json()["head"]
        for path in ("/ingests", "/ingest", "/ingest/stream"):
            answer = await client.post(path, json={"url": url})
            assert answer.status_code == 400, (path, answer.text)
            body = answer.json()
            assert body["extra"]["field"] == "url"
            assert problem in body["detail"].lower()
        detected = await client.get("/ingest/detect", params={"url": url})
        assert detected.status_code == 400
        assert (await client.get("/events")).json()["head"] == head


async def test_detect_names_the_kind_of_url(server: InProcessServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        for url, kind in (
            ("https://youtu.be/dQw4w9WgXcQ?t=42", "video"),
            ("https://www.youtube.com/@somechannel/videos", "channel"),
            ("https://example.com/post/1", "article"),
        ):
            answer = (await client.get("/ingest/detect", params={"url": url})).json()
            assert answer["type"] == kind
        video = await client.get("/ingest/detect", params={"url": "https://youtu.be/dQw4w9WgXcQ"})
        assert video.json()["url"] == "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


async def test_private_addresses_are_refused_by_default(
    database_url: str, tmp_path: Path, site: LocalSite
) -> None:
    settings = make_settings(database_url, ARCHIVE_DIR=str(tmp_path / "archive"))
    async with (
        running_server(settings) as running,
        httpx.AsyncClient(base_url=running.base_url, timeout=30) as client,
    ):
        result = (await client.post("/ingest", json={"url": f"{site.base_url}/fog"})).json()
    assert result["status"] == "error"
    assert result["details"]["error_kind"] == "blocked_address"
    assert result["details"]["retryable"] is False
    assert "/fog" not in site.hits


@pytest.fixture
async def impatient_server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """Quick retries and a short per-request timeout, to watch retries within a test."""
    settings = make_settings(
        database_url,
        INGEST_ALLOW_PRIVATE_URLS="true",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_RETRY_ATTEMPTS="3",
        INGEST_RETRY_BASE_SECONDS="0.05",
        INGEST_HTTP_TIMEOUT_SECONDS="0.5",
    )
    async with running_server(settings) as running:
        yield running


async def ingest_and_log(
    server: InProcessServer, url: str
) -> tuple[list[SseFrame], list[dict[str, Any]]]:
    """The ingest's stream as it ran, and its events in the log afterwards."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        async with client.stream("POST", "/ingest/stream", json={"url": url}) as response:
            ingest_id = response.headers["x-ingest-id"]
            frames = await collect(response)
        events = (await client.get(f"/ingests/{ingest_id}/events")).json()["events"]
    return frames, events


def retries_in(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        event["payload"]
        for event in events
        if event["event"] == "progress" and event["payload"].get("retrying")
    ]


async def test_an_article_whose_connection_breaks_is_retried_and_the_retry_is_logged(
    impatient_server: InProcessServer, site: LocalSite
) -> None:
    site.troubles["/fog"] = ["hang up"]

    frames, events = await ingest_and_log(impatient_server, f"{site.base_url}/fog")

    assert frames[-1].json()["status"] == "success"
    assert frames[-1].json()["details"]["title"] == TITLE
    assert site.hits["/fog"] == 2
    [retry] = retries_in(events)
    assert retry["step"] == "fetching"
    assert (retry["attempt"], retry["attempts"]) == (2, 3)
    assert retry["error_kind"] == "request_failed"
    assert retry["message"] == (
        "Could not connect to 127.0.0.1 (network error). Retrying in 0.05 s (attempt 2/3)."
    )
    # The retry repeats its step; every other step is reported once, in order.
    assert [step for step in steps(frames) if step != "fetching"] == [
        step for step in STEPS["article"] if step != "fetching"
    ]


async def test_an_article_that_times_out_is_retried_as_a_timeout(
    impatient_server: InProcessServer, site: LocalSite
) -> None:
    site.troubles["/fog"] = [2.0]

    frames, events = await ingest_and_log(impatient_server, f"{site.base_url}/fog")

    assert frames[-1].json()["status"] == "success"
    [retry] = retries_in(events)
    assert retry["error_kind"] == "timeout"
    assert retry["message"] == (
        "127.0.0.1 did not answer within 0.5 s. Retrying in 0.05 s (attempt 2/3)."
    )


async def test_an_article_that_keeps_timing_out_ends_as_a_retryable_timeout(
    impatient_server: InProcessServer, site: LocalSite
) -> None:
    site.troubles["/fog"] = [2.0, 2.0, 2.0]

    frames, events = await ingest_and_log(impatient_server, f"{site.base_url}/fog")

    result = frames[-1].json()
    assert result["status"] == "error"
    assert result["message"] == "127.0.0.1 did not answer within 0.5 s."
    assert result["details"]["error_kind"] == "timeout"
    assert result["details"]["retryable"] is True
    assert result["details"]["attempts"] == 3
    assert [(r["attempt"], r["error_kind"]) for r in retries_in(events)] == [
        (2, "timeout"),
        (3, "timeout"),
    ]
    assert site.hits["/fog"] == 3
