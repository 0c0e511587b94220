"""An agent that goes quiet shows as stalled, and exactly one ``stalled`` event says so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.agents.watchdog import StalledWatchdog
from tests.support import InProcessServer, agent_event, make_settings, running_server

HEARTBEAT = 0.3


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url, HEARTBEAT_SECONDS=str(HEARTBEAT), ARCHIVE_DIR=str(tmp_path / "archive")
    )
    async with running_server(settings) as running:
        yield running


async def test_a_quiet_agent_is_marked_stalled_once_and_recovers_when_it_speaks(
    server: InProcessServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        started = await client.post("/agents/ext_1/events", json=agent_event("started"))
        assert started.status_code == 201
        assert (await client.get("/agents/ext_1")).json()["status"] == "running"

        # Quiet for well over three heartbeat periods, with the watchdog sweeping throughout.
        await asyncio.sleep(HEARTBEAT * 8)
        row = (await client.get("/agents/ext_1")).json()
        assert row["status"] == "stalled"
        stalled = (await client.get("/agents", params={"status": "stalled"})).json()
        assert [r["source_id"] for r in stalled] == ["ext_1"]
        events = (await client.get("/events", params={"source_id": "ext_1"})).json()["events"]
        assert [e["event"] for e in events] == ["started", "stalled"]
        assert events[1]["payload"]["agent_name"] == "tagger"
        assert "3 heartbeat periods" in events[1]["payload"]["message"]

        # Another instance's watchdog finds nothing left to do.
        other = StalledWatchdog(
            server.services.engine,
            server.services.store,
            server.services.projections,
            heartbeat_seconds=HEARTBEAT,
        )
        assert await other.sweep() == 0

        back = await client.post("/agents/ext_1/events", json=agent_event("heartbeat"))
        assert back.status_code == 201
        assert (await client.get("/agents/ext_1")).json()["status"] == "running"


async def test_a_stalled_agent_shows_when_it_was_last_heard_from_and_when_it_was_marked(
    server: InProcessServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        await client.post("/agents/ext_2/events", json=agent_event("started"))
        spoke = await client.post("/agents/ext_2/events", json=agent_event("progress"))
        assert spoke.status_code == 201

        async def marked() -> bool:
            events = (await client.get("/events", params={"source_id": "ext_2"})).json()
            return events["events"][-1]["event"] == "stalled"

        deadline = asyncio.get_running_loop().time() + 20
        while not await marked():
            assert asyncio.get_running_loop().time() < deadline, "never marked stalled"
            await asyncio.sleep(HEARTBEAT)
        events = (await client.get("/events", params={"source_id": "ext_2"})).json()["events"]
        row = (await client.get("/agents/ext_2")).json()
        listed = (await client.get("/agents", params={"status": "stalled"})).json()

    mark = events[-1]
    assert row["status"] == "stalled"
    assert row["last_seen"] == spoke.json()["timestamp"] == mark["payload"]["last_seen"]
    assert row["stalled_at"] == mark["timestamp"]
    assert row["last_seen"] < row["stalled_at"]
    assert listed == [row]


async def test_finished_and_queued_activities_never_stall(server: InProcessServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        await client.post("/agents/done_1/events", json=agent_event("started"))
        await client.post("/agents/done_1/events", json=agent_event("complete"))
        await client.post("/agents/queued_1/events", json=agent_event("started", status="pending"))
        await asyncio.sleep(HEARTBEAT * 5)
        assert (await client.get("/agents/done_1")).json()["status"] == "completed"
        assert (await client.get("/agents/queued_1")).json()["status"] == "pending"
        events = (await client.get("/events", params={"event": "stalled"})).json()["events"]
        assert events == []


async def test_two_watchdogs_racing_append_one_stalled_event(server: InProcessServer) -> None:
    services = server.services
    await services.watchdog.close()  # the two below are the only ones sweeping
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        await client.post("/agents/race_1/events", json=agent_event("started"))
    await asyncio.sleep(HEARTBEAT * 4)
    dogs = [
        StalledWatchdog(
            services.engine, services.store, services.projections, heartbeat_seconds=HEARTBEAT
        )
        for _ in range(4)
    ]
    marked = await asyncio.gather(*(dog.sweep() for dog in dogs))
    assert sum(marked) == 1
    events = await services.store.read_source("agent", "race_1")
    assert [event.event for event in events] == ["started", "stalled"]
