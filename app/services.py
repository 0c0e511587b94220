"""The long-lived parts of a running service, opened and closed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from app.database import create_engine, upgrade_database
from app.eventlog import EventStore
from app.projections import ProjectionRunner, all_projections
from app.settings import Settings

__all__ = ["Services", "open_services"]


@dataclass(frozen=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    store: EventStore
    projections: ProjectionRunner


@asynccontextmanager
async def open_services(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Services]:
    """Engine, event store (appender, feed, LISTEN) and projection runner, each closing its own
    resource on the way out, last opened first closed."""
    url = settings.database.url
    if migrate:
        await upgrade_database(url)
    async with AsyncExitStack() as stack:
        engine = create_engine(url, pool_size=settings.database.pool_size)
        stack.push_async_callback(engine.dispose)
        store = await EventStore.open(
            engine,
            max_batch_events=settings.database.max_batch_events,
            poll_seconds=settings.server.poll_seconds,
        )
        stack.push_async_callback(store.close)
        runner = ProjectionRunner(
            engine, all_projections(), store=store, poll_seconds=settings.server.poll_seconds
        )
        await runner.start()
        stack.push_async_callback(runner.close)
        yield Services(settings=settings, engine=engine, store=store, projections=runner)
