"""Server-owned jobs (ingests, agent runs): claims with leases, and the runner that executes
them on whichever instance holds the claim.

A job's state lives in the log (and its projection); this module only decides who runs it.
A claim is a row in ``job_leases`` taken with one conditional upsert (insert, or take over a
row whose lease has expired), so on SQLite and PostgreSQL alike exactly one instance wins.
The holder renews the lease while it works; if it dies, the lease expires and another
instance (or the next start) takes the job over. On a clean shutdown leases are released at
once. Clocks of instances sharing a database are assumed to agree within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import BigInteger, Column, String, Table, and_, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app.database import metadata, write_transaction
from app.eventlog import Event, EventStore
from app.eventlog.envelope import utc_now
from app.projections import ProjectionRunner

__all__ = ["JobKind", "JobRunner", "Leases", "job_leases", "new_instance_id"]

logger = logging.getLogger(__name__)

job_leases = Table(
    "job_leases",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("owner", String(200), nullable=False),
    # Milliseconds since the epoch.
    Column("expires_at", BigInteger, nullable=False),
    Column("acquired_at", String(24), nullable=False),
)


def new_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Leases:
    """Claims on jobs, held by one instance (``owner``) at a time."""

    def __init__(self, engine: AsyncEngine, owner: str, lease_seconds: float) -> None:
        self._engine = engine
        self.owner = owner
        self.lease_ms = int(lease_seconds * 1000)

    async def claim(self, job_id: str, kind: str) -> bool:
        """Take the job if nobody holds a live lease on it."""
        now = _now_ms()
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                insert = (
                    sqlite.insert(job_leases)
                    if connection.dialect.name == "sqlite"
                    else postgresql.insert(job_leases)
                )
                statement = insert.values(
                    job_id=job_id,
                    kind=kind,
                    owner=self.owner,
                    expires_at=now + self.lease_ms,
                    acquired_at=utc_now(),
                ).on_conflict_do_update(
                    index_elements=["job_id"],
                    set_={
                        "owner": insert.excluded.owner,
                        "expires_at": insert.excluded.expires_at,
                        "acquired_at": insert.excluded.acquired_at,
                        "kind": insert.excluded.kind,
                    },
                    where=job_leases.c.expires_at < now,
                )
                result = await connection.execute(statement)
                return result.rowcount == 1

    async def renew(self, job_id: str) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and was taken)."""
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                result = await connection.execute(
                    update(job_leases)
                    .where(and_(job_leases.c.job_id == job_id, job_leases.c.owner == self.owner))
                    .values(expires_at=_now_ms() + self.lease_ms)
                )
                return result.rowcount == 1

    async def release(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                await connection.execute(
                    delete(job_leases).where(
                        and_(job_leases.c.job_id.in_(job_ids), job_leases.c.owner == self.owner)
                    )
                )


class JobKind(Protocol):
    """One kind of job: where to find unfinished ones, and how to run one."""

    name: str
    concurrency: int
    #: The projection that must be caught up before :meth:`candidates` is trusted.
    projection: str

    async def candidates(self, limit: int, now_ms: int) -> list[str]:
        """Unfinished jobs nobody holds a live lease on (``job_leases.expires_at < now_ms``),
        oldest first."""
        ...

    def wants(self, event: Event) -> bool:
        """Whether ``event`` may have created a job of this kind (worth looking at once)."""
        ...

    async def run(self, job_id: str) -> None:
        """Run the job to its end (appending its events); raise only on a bug."""
        ...


class JobRunner:
    """Claims and runs jobs of the given kinds, at most ``kind.concurrency`` at a time each."""

    def __init__(
        self,
        store: EventStore,
        projections: ProjectionRunner,
        leases: Leases,
        kinds: Sequence[JobKind],
        *,
        poll_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._projections = projections
        self.leases = leases
        self._kinds = {kind.name: kind for kind in kinds}
        self._poll_seconds = poll_seconds
        self._running: dict[str, asyncio.Task[None]] = {}
        self._kind_of: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        self._wake.set()

    @property
    def running_count(self) -> int:
        return len(self._running)

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running

    def cancel_local(self, job_id: str) -> bool:
        """Stop a job this instance is running (its events already say why)."""
        task = self._running.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def close(self) -> None:
        """Stop claiming, stop running jobs, and release their leases at once so that
        another instance or the next start takes them over without waiting for expiry."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        running = list(self._running.items())
        for _, task in running:
            task.cancel()
        for _, task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await self.leases.release([job_id for job_id, _ in running])
        except Exception:
            logger.warning("could not release job leases on shutdown", exc_info=True)

    async def _loop(self) -> None:
        feed = self._store.feed
        due = True
        while True:
            # Taken before looking for work: whatever is appended meanwhile is noticed below.
            changed = feed.changed()
            mark = feed.head
            self._wake.clear()
            if due:
                try:
                    await self._claim_free_slots(feed.head)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.warning("job runner could not look for work; retrying", exc_info=True)
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                done, _ = await asyncio.wait((changed, waiter), timeout=self._poll_seconds)
            finally:
                waiter.cancel()
            if not done or self._wake.is_set():
                due = True  # the periodic look (expired leases), or work finished here
            else:
                # Most appends are not new jobs: look only when one of them is.
                entries = feed.entries_after(mark)
                due = entries is None or any(
                    kind.wants(entry.event) for entry in entries for kind in self._kinds.values()
                )

    async def _claim_free_slots(self, head: int) -> None:
        for kind in self._kinds.values():
            free = kind.concurrency - sum(1 for k in self._kind_of.values() if k == kind.name)
            if free <= 0:
                continue
            await self._projections.wait_for(kind.projection, head, within=2.0)
            for job_id in await kind.candidates(free * 4, _now_ms()):
                if free <= 0:
                    break
                if job_id in self._running:
                    continue
                if await self.leases.claim(job_id, kind.name):
                    self._spawn(kind, job_id)
                    free -= 1

    def _spawn(self, kind: JobKind, job_id: str) -> None:
        task = asyncio.create_task(self._execute(kind, job_id), name=f"job:{kind.name}:{job_id}")
        self._running[job_id] = task
        self._kind_of[job_id] = kind.name

    async def _execute(self, kind: JobKind, job_id: str) -> None:
        work = asyncio.create_task(kind.run(job_id), name=f"work:{job_id}")
        keeper = asyncio.create_task(self._keep_lease(job_id, work))
        try:
            await work
        except asyncio.CancelledError:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise
        except Exception:
            logger.exception("job %s (%s) failed unexpectedly", job_id, kind.name)
        finally:
            keeper.cancel()
            self._running.pop(job_id, None)
            self._kind_of.pop(job_id, None)
            with contextlib.suppress(Exception):
                await self.leases.release([job_id])
            self._wake.set()

    async def _keep_lease(self, job_id: str, work: asyncio.Task[None]) -> None:
        interval = max(self.leases.lease_ms / 3000, 0.05)
        while not work.done():
            await asyncio.sleep(interval)
            try:
                still_ours = await self.leases.renew(job_id)
            except Exception:
                logger.warning("could not renew the lease on %s; will retry", job_id)
                continue
            if not still_ours:
                logger.warning("lost the lease on %s to another instance; stopping it", job_id)
                work.cancel()
                return
