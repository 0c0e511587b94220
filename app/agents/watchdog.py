"""The stalled-agent watchdog: one ``stalled`` event for an activity that went quiet.

An activity (not completed or failed) with no event for three heartbeat periods already shows
``status: "stalled"`` in reads; the watchdog also appends a ``stalled`` event so that streaming
clients learn it. It appends with ``expected_version`` equal to the version it saw, so of
several instances running watchdogs exactly one succeeds, and an agent that speaks up in the
meantime wins over the watchdog.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import and_, not_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.agents.tracker import agent_event
from app.eventlog import EventStore, VersionConflict
from app.projections import ProjectionRunner
from app.projections.agents import NEVER_STALLED, agent_activities, stalled_before
from app.runtime.background import Background

__all__ = ["StalledWatchdog"]

logger = logging.getLogger(__name__)


class StalledWatchdog:
    def __init__(
        self,
        engine: AsyncEngine,
        store: EventStore,
        projections: ProjectionRunner,
        *,
        heartbeat_seconds: float,
    ) -> None:
        self._engine = engine
        self._store = store
        self._projections = projections
        self._heartbeat = heartbeat_seconds
        self._task = Background("stalled-watchdog")

    def start(self) -> None:
        self._task.start(self._loop())

    async def close(self) -> None:
        await self._task.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat / 2)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("stalled-agent sweep failed; retrying", exc_info=True)

    async def sweep(self) -> int:
        """Append ``stalled`` for every activity that went quiet; returns how many."""
        await self._projections.wait_for("agents", self._store.feed.head, within=1.0)
        threshold = stalled_before(self._heartbeat)
        query = select(
            agent_activities.c.source_id,
            agent_activities.c.agent_name,
            agent_activities.c.version,
            agent_activities.c.last_seen,
        ).where(
            and_(
                not_(agent_activities.c.status.in_((*NEVER_STALLED, "stalled"))),
                agent_activities.c.last_seen < threshold,
            )
        )
        async with self._engine.connect() as connection:
            quiet = (await connection.execute(query)).all()
        marked = 0
        for row in quiet:
            event = agent_event(
                row.source_id,
                "stalled",
                row.agent_name,
                {
                    "status": "stalled",
                    "message": f"No event for {3 * self._heartbeat:g} s (3 heartbeat periods)",
                    "last_seen": row.last_seen,
                },
                expected_version=row.version,
            )
            try:
                await self._store.append_one(event)
            except VersionConflict:
                continue  # another instance marked it, or the agent spoke up
            marked += 1
        return marked
