"""The long-lived parts of a running service, opened and closed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.agents.coordinator import AgentRuns
from app.agents.tracker import ActivityTracker
from app.agents.watchdog import StalledWatchdog
from app.audit.checkpoints import CheckpointWriter
from app.audit.keys import load_private_key
from app.config import Settings
from app.content import Archive, ContentStore
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent
from app.ingest.pipeline import IngestPipeline
from app.ingest.service import IngestJobs, IngestService
from app.jobs import JobRunner, Leases, new_instance_id
from app.observability import log_context
from app.projections import ProjectionRunner, all_projections
from app.runtime.maintenance import LogMaintenance

__all__ = ["Services", "open_services"]


class _TaggedIngestJobs(IngestJobs):
    """Every log line written while an ingest runs carries its ingest id."""

    async def run(self, job_id: str) -> None:
        with log_context(ingest_id=job_id):
            await super().run(job_id)


@dataclass(frozen=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    store: EventStore
    projections: ProjectionRunner
    content: ContentStore
    archive: Archive
    ingest: IngestService
    jobs: JobRunner
    tracker: ActivityTracker
    runs: AgentRuns
    watchdog: StalledWatchdog
    maintenance: LogMaintenance
    instance: str
    #: Appends signed checkpoints of the chain; None without AUDIT_SIGNING_KEY.
    checkpoints: CheckpointWriter | None = None


@asynccontextmanager
async def open_services(
    settings: Settings, *, migrate: bool = True, run_jobs: bool = True
) -> AsyncIterator[Services]:
    """Engine, event store (appender, feed, LISTEN), projection runner, content store and job
    runner, each closing its own resource on the way out, last opened first closed."""
    url = settings.database.url
    if migrate:
        await upgrade_database(url)
    instance = new_instance_id()
    async with AsyncExitStack() as stack:
        engine = create_engine(url, pool_size=settings.database.pool_size)
        stack.push_async_callback(engine.dispose)
        store = await EventStore.open(
            engine, settings.database, poll_seconds=settings.server.poll_seconds
        )
        stack.push_async_callback(store.close)
        projections = ProjectionRunner(
            engine, all_projections(), store=store, poll_seconds=settings.server.poll_seconds
        )
        await projections.start()
        stack.push_async_callback(projections.close)
        content = await ContentStore.open(settings.content)
        stack.push_async_callback(content.close)
        archive = Archive(Path(settings.content.archive_dir))
        ingest = IngestService(store, engine)
        pipeline = IngestPipeline(settings.ingest, content, archive, ingest)
        tracker = ActivityTracker(store, heartbeat_seconds=settings.server.heartbeat_seconds)
        runs = AgentRuns(
            store, engine, tracker, content, concurrency=settings.agents.run_concurrency
        )

        def run_agents_after(state: dict[str, Any], complete: dict[str, Any]) -> list[NewEvent]:
            """After a successful video or article ingest, a run of every agent over it."""
            record = complete.get("details", {}).get("record")
            if not settings.agents.auto_run or complete.get("status") != "success":
                return []
            if state["type"] not in ("video", "article") or not record:
                return []
            _, event = runs.run_request(
                ["tagger", "summarizer"], [record], {"ingest_id": state["ingest_id"]}
            )
            return [event]

        jobs = JobRunner(
            store,
            projections,
            Leases(engine, instance, settings.ingest.lease_seconds),
            [
                _TaggedIngestJobs(
                    ingest,
                    engine,
                    pipeline,
                    concurrency=settings.ingest.concurrency,
                    instance=instance,
                    follow_ups=run_agents_after,
                ),
                runs,
            ],
            poll_seconds=settings.server.poll_seconds,
        )
        watchdog = StalledWatchdog(
            engine, store, projections, heartbeat_seconds=settings.server.heartbeat_seconds
        )
        # Long enough for a purge's batch and the snapshots after it; renewed per batch.
        maintenance = LogMaintenance(
            store, projections, Leases(engine, instance, 300.0), settings.retention
        )
        if run_jobs:
            jobs.start()
            watchdog.start()
            maintenance.start()
        stack.push_async_callback(jobs.close)
        stack.push_async_callback(watchdog.close)
        stack.push_async_callback(maintenance.close)
        checkpoints = None
        if settings.audit.signing_key is not None:
            checkpoints = CheckpointWriter(
                engine,
                store,
                load_private_key(settings.audit.signing_key),
                interval=settings.audit.checkpoint_seconds,
            )
            if run_jobs:
                checkpoints.start()
            stack.push_async_callback(checkpoints.close)
        yield Services(
            settings=settings,
            engine=engine,
            store=store,
            projections=projections,
            content=content,
            archive=archive,
            ingest=ingest,
            jobs=jobs,
            tracker=tracker,
            runs=runs,
            watchdog=watchdog,
            maintenance=maintenance,
            instance=instance,
            checkpoints=checkpoints,
        )
