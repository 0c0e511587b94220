"""Ingests survive the process that ran them: a server killed mid-ingest is restarted and the
ingest is taken over and finished; the log shows what happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import LocalSite, ServerProcess

ARTICLE = Path(__file__).resolve().parent.parent / "fixtures" / "articles" / "fog_signals.html"


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite({"/slow": (200, "text/html", ARTICLE.read_bytes())}) as running:
        running.delays["/slow"] = 2.0
        yield running


async def poll_row(base_url: str, ingest_id: str, check: Any, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while time.monotonic() < deadline:
            row: dict[str, Any] = (await client.get(f"/ingests/{ingest_id}")).json()
            if check(row):
                return row
            await asyncio.sleep(0.05)
    raise AssertionError(f"{ingest_id} never satisfied the check")


async def test_a_killed_server_s_ingest_is_taken_over_after_restart(
    database_url: str, tmp_path: Path, site: LocalSite
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "SURREALDB_URL": f"surrealkv://{tmp_path / 'content'}",
        "ARCHIVE_DIR": str(tmp_path / "archive"),
        "INGEST_ALLOW_PRIVATE_URLS": "true",
        "INGEST_LEASE_SECONDS": "2",
    }
    first = ServerProcess(env)
    first.start()
    try:
        await first.wait_ready()
        async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as client:
            answer = await client.post("/ingests", json={"url": f"{site.base_url}/slow"})
        ingest_id = answer.json()["ingest_id"]
        await poll_row(first.base_url, ingest_id, lambda row: row["step"] == "fetching")
    finally:
        first.kill()

    second = ServerProcess(env, port=first.port)
    second.start()
    try:
        await second.wait_ready()
        row = await poll_row(second.base_url, ingest_id, lambda row: row["status"] == "success")
        assert row["attempts"] == 2
        async with httpx.AsyncClient(base_url=second.base_url, timeout=10) as client:
            events = (await client.get(f"/ingests/{ingest_id}/events")).json()["events"]
    finally:
        second.stop()

    names = [event["event"] for event in events]
    assert names[0] == "requested"
    assert names.count("started") == 2
    assert names.count("complete") == 1
    interrupted = names.index("interrupted")
    assert names[interrupted + 1] == "started"
    assert "attempt 1" in events[interrupted]["payload"]["message"]
    assert events[interrupted + 1]["payload"]["attempt"] == 2
    # The second run did every step again, from the top.
    second_run = [e["payload"]["step"] for e in events[interrupted:] if e["event"] == "progress"]
    assert second_run[0] == "checking_cache"
    assert second_run[-1] == "stored"


async def test_a_second_process_on_the_same_content_path_fails_clearly(
    database_url: str, tmp_path: Path
) -> None:
    content = tmp_path / "content"
    first = ServerProcess({"DATABASE_URL": database_url, "SURREALDB_URL": f"surrealkv://{content}"})
    first.start()
    try:
        await first.wait_ready()
        second = ServerProcess(
            {
                "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'other.db'}",
                "SURREALDB_URL": f"surrealkv://{content}",
            }
        )
        second.start()
        try:
            with pytest.raises(RuntimeError, match="in use by another process") as failure:
                await second.wait_ready()
            assert str(content) in str(failure.value)
            assert second.process is not None
            assert second.process.returncode not in (None, 0)
        finally:
            second.stop()
    finally:
        first.stop()
