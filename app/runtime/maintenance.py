"""The log's upkeep while the service runs: retention's purges and projection snapshots.

Every ``RETENTION_INTERVAL_SECONDS`` one instance (the holder of a lease) archives and
removes what the retention rules say has expired (:mod:`app.eventlog.retention`), then takes
a snapshot of each projection whose checkpoint has moved ``SNAPSHOT_EVERY_EVENTS`` past its
newest snapshot, or past events a purge has just removed (so that a rebuild then needs no
archive). Both work in short transactions of their own, beside appends and tails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from app.config import RetentionSettings
from app.eventlog import EventStore
from app.eventlog.retention import LEASE, PurgeResult, Retention
from app.jobs import Leases
from app.projections import ProjectionRunner
from app.projections.snapshots import Snapshot, newest_snapshot, take_snapshot
from app.runtime.background import Background

__all__ = ["LogMaintenance", "MaintenanceResult"]

logger = logging.getLogger(__name__)


class MaintenanceResult(NamedTuple):
    purge: PurgeResult | None
    snapshots: list[Snapshot]


class LogMaintenance:
    def __init__(
        self,
        store: EventStore,
        projections: ProjectionRunner,
        leases: Leases,
        settings: RetentionSettings,
    ) -> None:
        self._store = store
        self._projections = projections
        self._leases = leases
        self._settings = settings
        self.retention = Retention(
            store,
            settings.parsed_rules(),
            Path(settings.archive_dir),
            batch_events=settings.batch_events,
            delete_rows=settings.delete_rows,
        )
        self._task = Background("log-maintenance")

    def start(self) -> None:
        self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.interval_seconds)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("log maintenance failed; trying again next interval")

    async def run_once(self) -> MaintenanceResult | None:
        """One purge and the snapshots due; None if another instance holds the lease."""
        if not await self._leases.claim(LEASE, "maintenance"):
            return None
        try:
            purged = None
            if self.retention.rules:
                purged = await self.retention.purge(
                    between_batches=lambda: self._leases.renew(LEASE)
                )
            snapshots = await self.snapshot_due(purged)
        finally:
            await self._leases.release([LEASE])
        return MaintenanceResult(purged, snapshots)

    async def snapshot_due(self, purged: PurgeResult | None = None) -> list[Snapshot]:
        every = self._settings.snapshot_every_events
        if every <= 0:
            return []
        removed_through = max(
            (segment.last_position for segment in (purged.segments if purged else [])), default=0
        )
        taken = []
        engine = self._store.engine
        for name in sorted(self._projections.projections):
            checkpoint = await self._projections.checkpoint(name)
            async with engine.connect() as connection:
                newest = await newest_snapshot(connection, name)
            since = 0 if newest is None else newest.position
            if checkpoint - since >= every or (
                since < removed_through <= checkpoint and checkpoint > since
            ):
                taken.append(await self.snapshot(name))
        return taken

    async def snapshot(self, name: str) -> Snapshot:
        snapshot = await take_snapshot(
            self._store.engine, self._projections.get(name), keep=self._settings.snapshots_kept
        )
        logger.info(
            "snapshot of %s at position %d (%d rows)", name, snapshot.position, snapshot.row_count
        )
        return snapshot

    async def snapshot_all(self, names: Sequence[str] | None = None) -> list[Snapshot]:
        return [
            await self.snapshot(name) for name in (names or sorted(self._projections.projections))
        ]
