"""The activity tracker appends an agent's life to the log; reads come from the projection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.agents.tracker import ActivityTracker
from app.projections.agents import load_activity
from app.runtime.services import Services, open_services
from tests.support import make_settings


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    settings = make_settings(
        database_url, HEARTBEAT_SECONDS="0.2", ARCHIVE_DIR=str(tmp_path / "archive")
    )
    async with open_services(settings, run_jobs=False) as opened:
        yield opened


async def names(services: Services, source_id: str) -> list[str]:
    return [event.event for event in await services.store.read_source("agent", source_id)]


async def row(services: Services, source_id: str) -> dict[str, object]:
    await services.projections.wait_for("agents", await services.store.head())
    async with services.engine.connect() as connection:
        found = await load_activity(connection, source_id, heartbeat_seconds=0.2)
    assert found is not None
    return {field: getattr(found, field) for field in found.__struct_fields__}


async def test_track_records_start_progress_heartbeats_and_completion(services: Services) -> None:
    tracker = ActivityTracker(services.store, heartbeat_seconds=0.2)
    heartbeats_seen = 0
    async with tracker.track("tagger", source_id="tagger_t1", message="Tagging") as activity:
        await activity.progress(0.5, "Processing video 5/10")
        mid = await row(services, "tagger_t1")
        assert mid["status"] == "running"
        assert mid["progress"] == 0.5
        assert mid["message"] == "Processing video 5/10"
        # Keep the block open long enough for the heartbeat task to speak.
        for _ in range(100):
            heartbeats_seen = (await names(services, "tagger_t1")).count("heartbeat")
            if heartbeats_seen >= 2:
                break
            await services.store.feed.changed()
        activity.result = {"tags": ["fog"]}
        activity.final_message = "Tagged"
    assert heartbeats_seen >= 2
    events = await names(services, "tagger_t1")
    assert events[0] == "started"
    assert events[1] == "progress"
    assert events[-1] == "complete"
    done = await row(services, "tagger_t1")
    assert done["status"] == "completed"
    assert done["progress"] == 1.0
    assert done["result"] == {"tags": ["fog"]}
    assert done["message"] == "Tagged"
    assert done["completed_at"] is not None
    # The heartbeat stops with the block: three periods later nothing more was said.
    await asyncio.sleep(0.6)
    assert len(await names(services, "tagger_t1")) == len(events)


async def test_an_exception_in_the_block_is_recorded_as_failed_and_raised(
    services: Services,
) -> None:
    tracker = ActivityTracker(services.store, heartbeat_seconds=0.2)
    with pytest.raises(RuntimeError, match="transcript is empty"):
        async with tracker.track("summarizer", source_id="summarizer_s1"):
            raise RuntimeError("transcript is empty")
    assert (await names(services, "summarizer_s1"))[-1] == "failed"
    failed = await row(services, "summarizer_s1")
    assert failed["status"] == "failed"
    assert failed["message"] == "transcript is empty"
    assert failed["result"] == {"error": "transcript is empty"}


async def test_the_plain_api_appends_each_kind_of_event(services: Services) -> None:
    tracker = ActivityTracker(services.store, heartbeat_seconds=0.2)
    activity = await tracker.register_activity("tagger")
    assert activity.source_id.startswith("tagger_")
    await tracker.update_activity(activity.source_id, "tagger", progress=0.25, message="a quarter")
    await tracker.heartbeat(activity.source_id, "tagger")
    await tracker.fail_activity(activity.source_id, "tagger", error="gave up")
    assert await names(services, activity.source_id) == [
        "started",
        "progress",
        "heartbeat",
        "failed",
    ]
    with pytest.raises(ValueError, match="progress must be from 0 to 1"):
        await tracker.update_activity(activity.source_id, "tagger", progress=1.5)
    assert len(await names(services, activity.source_id)) == 4
