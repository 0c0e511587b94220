"""The runner that executes server-owned jobs on whichever instance holds their claim
(:mod:`app.jobs.leases`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from app.eventlog import Event, EventStore
from app.jobs.leases import Leases, now_ms
from app.projections import ProjectionRunner
from app.runtime.background import Background

__all__ = ["JobKind", "JobRunner"]

logger = logging.getLogger(__name__)


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
        self._task = Background("job-runner")

    def start(self) -> None:
        self._task.start(self._loop())

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
        await self._task.stop()
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
            for job_id in await kind.candidates(free * 4, now_ms()):
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
