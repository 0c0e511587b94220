"""The SQLite file locked by another process: appends answer 503 with a clear message once
``SQLITE_BUSY_TIMEOUT_SECONDS`` has passed, reads go on, ``/health`` says what is wrong, and
when the lock is released the log takes appends again with no gap and nothing half-written."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import agent_event, make_settings, running_server

HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
connection.execute("ROLLBACK")
"""


async def test_a_log_locked_by_another_process_refuses_appends_clearly(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    settings = make_settings(
        f"sqlite+aiosqlite:///{db}",
        SQLITE_BUSY_TIMEOUT_SECONDS="0.5",
        ARCHIVE_DIR=str(tmp_path / "archive"),
    )
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        acked = []
        for n in range(5):
            response = await client.post(f"/agents/a{n}/events", json=agent_event(n=n))
            assert response.status_code == 201
            acked.append(response.json()["position"])

        holder = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
            [sys.executable, "-c", HOLD_LOCK, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert await asyncio.to_thread(holder.stdout.readline) == b"locked\n"
            started = time.monotonic()
            refused = await client.post("/agents/b/events", json=agent_event(n=99))
            waited = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            assert 0.4 < waited < 5, waited
            body = refused.json()
            assert body["status_code"] == 503
            assert "locked by another process" in body["detail"]
            assert "SQLITE_BUSY_TIMEOUT_SECONDS" in body["detail"]
            assert refused.headers["retry-after"] == "1"
            batch = await client.post(
                "/agents/events",
                json={"events": [{"source_id": "c", **agent_event(n=i)} for i in range(3)]},
            )
            assert batch.status_code == 503

            # Reads go on (WAL: readers never wait for the writer's lock).
            page = (await client.get("/events")).json()
            assert [e["position"] for e in page["events"]] == acked
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["appends"]["status"] == "error"
            assert "locked by another process" in health.json()["appends"]["detail"]
            assert health.json()["database"]["status"] == "ok"
            metrics = (await client.get("/metrics")).text
            assert 'activity_append_requests_total{outcome="unavailable"} 2' in metrics
        finally:
            holder.communicate(b"", timeout=10)

        # Released: healthy again (the probe says so even before the next append), and the
        # log goes on right after the last acknowledged position.
        health = await client.get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["appends"] == {"status": "ok"}
        after = await client.post("/agents/b/events", json=agent_event(n=100))
        assert after.status_code == 201, after.text
        assert after.json()["position"] == acked[-1] + 1
        events = (await client.get("/events")).json()["events"]
        assert [e["position"] for e in events] == [*acked, acked[-1] + 1]
        assert [e["payload"].get("n") for e in events] == [0, 1, 2, 3, 4, 100]
