"""The disk holding the SQLite log fills up (a small tmpfs): appends answer 503 saying so,
nothing acknowledged is lost, ``/health`` says what is wrong, and once space is freed the log
takes appends again, gapless, and passes SQLite's integrity check.

Needs root (``mount -t tmpfs``); skipped with the reason when the mount is refused.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import agent_event, make_settings, running_server

SIZE_MB = 24


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path, leave_bytes: int) -> None:
    """Write a filler file until only about ``leave_bytes`` remain free."""
    stat = os.statvfs(path.parent)
    free = stat.f_bavail * stat.f_frsize
    with path.open("wb") as filler:
        remaining = max(free - leave_bytes, 0)
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            with contextlib.suppress(OSError):
                filler.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)


async def test_a_full_disk_refuses_appends_and_loses_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    db = small_disk / "events.db"
    settings = make_settings(f"sqlite+aiosqlite:///{db}", ARCHIVE_DIR=str(tmp_path / "archive"))
    blob = "z" * 8000
    acked: dict[int, int] = {}  # position -> n
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
    ):
        for n in range(20):
            response = await client.post("/agents/a/events", json=agent_event(n=n, blob=blob))
            assert response.status_code == 201
            acked[response.json()["position"]] = n
        filler = small_disk / "filler"
        fill(filler, leave_bytes=256 * 1024)

        refusal = None
        for n in range(20, 2000):
            response = await client.post(
                f"/agents/s{n % 7}/events", json=agent_event(n=n, blob=blob)
            )
            if response.status_code == 201:
                acked[response.json()["position"]] = n
                continue
            refusal = response
            break
        assert refusal is not None, "the disk never filled up"
        assert refusal.status_code == 503, refusal.text
        assert "disk holding the event log is full" in refusal.json()["detail"]
        assert refusal.headers["retry-after"] == "1"
        # Still full: a batch is refused whole.
        batch = await client.post(
            "/agents/events",
            json={"events": [{"source_id": "b", **agent_event(n=-i, blob=blob)} for i in range(5)]},
        )
        assert batch.status_code == 503

        health = await client.get("/health")
        assert health.status_code == 503
        assert "full" in health.json()["appends"]["detail"]

        # Everything acknowledged is readable, in order, nothing else.
        log = await read_all(client)
        assert {e["position"]: e["payload"]["n"] for e in log} == acked
        assert sorted(acked) == list(range(1, len(acked) + 1))

        filler.unlink()
        health = await client.get("/health")
        assert health.status_code == 200, health.text
        after = await client.post("/agents/a/events", json=agent_event(n=-1))
        assert after.status_code == 201, after.text
        assert after.json()["position"] == len(acked) + 1
        acked[len(acked) + 1] = -1
        log = await read_all(client)
        assert {e["position"]: e["payload"]["n"] for e in log} == acked

    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = connection.execute("SELECT position FROM events ORDER BY position").fetchall()
        assert [row[0] for row in rows] == sorted(acked)


async def read_all(client: httpx.AsyncClient) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    after = 0
    while True:
        page = (await client.get("/events", params={"after": after, "limit": 1000})).json()
        events.extend(page["events"])
        if page["next_after"] >= page["head"]:
            return events
        after = page["next_after"]
