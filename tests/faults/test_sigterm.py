"""SIGTERM: the server stops accepting, ends every open SSE stream at once with a ``retry``
hint (instead of holding the shutdown until the graceful timeout cuts it), releases the leases
of the jobs it was running, and exits; the next start takes those jobs over at once, without
waiting for a lease to expire."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import LocalSite, ServerProcess, SseFrame, read_frames

ARTICLE = Path(__file__).resolve().parent.parent / "fixtures" / "articles" / "fog_signals.html"
LEASE_SECONDS = 120  # far longer than the test: a takeover can only come from a release


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite({"/slow": (200, "text/html", ARTICLE.read_bytes())}) as running:
        running.delays["/slow"] = 20.0
        yield running


async def follow(base_url: str, path: str, frames: list[SseFrame], opened: asyncio.Event) -> str:
    """Read a stream to its end; says how it ended."""
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=60)) as client,
        client.stream("GET", path) as response,
    ):
        assert response.status_code == 200
        try:
            async for frame in read_frames(response):
                frames.append(frame)
                opened.set()
        except httpx.HTTPError as exc:
            return f"cut: {exc!r}"
    return "ended"


async def poll_row(base_url: str, ingest_id: str, check: Any, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while time.monotonic() < deadline:
            row: dict[str, Any] = (await client.get(f"/ingests/{ingest_id}")).json()
            if check(row):
                return row
            await asyncio.sleep(0.05)
    raise AssertionError(f"{ingest_id} never satisfied the check within {within} s")


async def test_sigterm_ends_streams_with_a_retry_hint_and_releases_job_leases(
    tmp_path: Path, site: LocalSite
) -> None:
    db = tmp_path / "events.db"
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "INGEST_ALLOW_PRIVATE_URLS": "true",
        "INGEST_LEASE_SECONDS": str(LEASE_SECONDS),
        "HEARTBEAT_SECONDS": "30",  # nothing else would end a stream during the test
        "TAIL_POLL_SECONDS": "0.2",
    }
    first = ServerProcess(env)
    first.start()
    streams: dict[str, list[SseFrame]] = {p: [] for p in ("/events/stream", "/stats/stream")}
    try:
        await first.wait_ready()
        async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as client:
            answer = await client.post("/ingests", json={"url": f"{site.base_url}/slow"})
        assert answer.status_code == 202, answer.text
        ingest_id = answer.json()["ingest_id"]
        await poll_row(first.base_url, ingest_id, lambda row: row["step"] == "fetching", 30)
        with sqlite3.connect(db) as connection:
            held = connection.execute("SELECT job_id FROM job_leases").fetchall()
        assert held == [(ingest_id,)]

        opened = [asyncio.Event() for _ in streams]
        readers = [
            asyncio.create_task(follow(first.base_url, path, frames, event))
            for (path, frames), event in zip(streams.items(), opened, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened)), 10)

        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        endings = await asyncio.wait_for(asyncio.gather(*readers), 10)
        streams_ended = time.monotonic() - signalled
        code = await asyncio.to_thread(first.process.wait, 30)
        exited = time.monotonic() - signalled
        stderr = first.stderr()
    finally:
        first.kill()

    # Every stream ended cleanly (not cut), at once rather than after the 5 s graceful timeout,
    # and its last frame tells the client when to come back; it carries no id.
    assert endings == ["ended", "ended"]
    assert streams_ended < 3.0, streams_ended
    for frames in streams.values():
        last = frames[-1]
        assert (last.event, last.id) == ("shutdown", None)
        assert last.retry is not None
        assert 0 < last.retry <= 3000
        assert last.json() == {"retry_ms": last.retry}
    # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's.
    assert code in (0, -signal.SIGTERM), stderr
    assert "timeout graceful shutdown exceeded" not in stderr
    assert exited < 5.0 + 3.0, exited
    # The lease was released on the way out (it would otherwise hold for LEASE_SECONDS).
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM job_leases").fetchone() == (0,)
    assert not (await poll_row_offline(db, ingest_id))["complete"]

    site.delays["/slow"] = 0.0
    second = ServerProcess(env, port=first.port)
    second.start()
    try:
        await second.wait_ready()
        started = time.monotonic()
        row = await poll_row(second.base_url, ingest_id, lambda row: row["status"] == "success", 30)
        assert time.monotonic() - started < 15, "taken over at once, not after lease expiry"
        assert row["attempts"] == 2
    finally:
        second.stop()


async def poll_row_offline(db: Path, ingest_id: str) -> dict[str, Any]:
    """What the log says of the ingest, read straight from the file."""
    with sqlite3.connect(db) as connection:
        names = [
            row[0]
            for row in connection.execute(
                "SELECT event FROM events WHERE stream = 'ingest' AND source_id = ?"
                " ORDER BY version",
                (ingest_id,),
            )
        ]
    return {"events": names, "complete": "complete" in names}
