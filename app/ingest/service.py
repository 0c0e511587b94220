"""Starting, running and cancelling ingests: the ingest as a server-owned job.

An ingest is one source in the log (stream ``ingest``). Two rules keep it consistent across
requests, instances and crashes, with the log as the only record:

* **One ingest per URL at a time.** Each URL has a claim source (stream ``ingest_url``). A new
  ingest appends ``claimed`` there and ``requested`` on its own source in ONE atomic append,
  with ``expected_version`` on the claim: of two concurrent requests exactly one commits; the
  other re-reads the claim and joins the running ingest. The claim is released in the same
  append as the ingest's ``complete`` event.
* **Every step appends with ``expected_version``.** A cancel (``DELETE``) appends ``complete``
  directly; the job's next append then conflicts, and the job stops without writing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.content import ContentUnavailable
from app.eventlog import (
    Event,
    EventFilter,
    EventStore,
    NewEvent,
    VersionConflict,
    canonical_payload,
    replay_then_tail,
)
from app.ingest.model import IngestFailure
from app.ingest.urls import DetectedUrl, detect_url, url_key
from app.jobs import job_leases
from app.projections.ingests import (
    ACTIVE_STATUSES,
    INGEST_STREAM,
    TERMINAL_STATUSES,
    fold_ingest,
    ingests,
)

__all__ = [
    "CLAIM_STREAM",
    "IngestJobs",
    "IngestRun",
    "IngestService",
    "NotCancellable",
    "UnknownIngest",
    "fold_events",
    "new_ingest_id",
]

logger = logging.getLogger(__name__)

CLAIM_STREAM = "ingest_url"


class UnknownIngest(LookupError):
    pass


class NotCancellable(RuntimeError):
    pass


class _Abandoned(Exception):
    """Someone else (a cancel, another instance) wrote to the ingest: stop quietly."""


def new_ingest_id() -> str:
    return f"ing_{uuid.uuid4().hex[:24]}"


def child_ingest_id(parent_id: str, video_id: str) -> str:
    """Deterministic, so a channel run taken over after a crash re-requests the same
    children instead of new ones."""
    digest = hashlib.sha256(f"{parent_id}/{video_id}".encode()).hexdigest()[:24]
    return f"ing_{digest}"


def _event(
    stream: str, source_id: str, name: str, payload: dict[str, Any], expected: int | None
) -> NewEvent:
    return NewEvent(
        stream=stream,
        source_id=source_id,
        event=name,
        payload=canonical_payload(payload),
        expected_version=expected,
    )


def fold_events(events: Sequence[Event]) -> dict[str, Any] | None:
    state: dict[str, Any] | None = None
    for event in events:
        state = fold_ingest(state, event)
    return state


class IngestService:
    def __init__(self, store: EventStore, engine: AsyncEngine) -> None:
        self._store = store
        self._engine = engine

    async def start(
        self,
        url: str,
        channel_limit: str = "all",
        *,
        parent_id: str | None = None,
        ingest_id: str | None = None,
    ) -> tuple[str, bool]:
        """Request an ingest of ``url``; returns (ingest_id, created). A URL already being
        ingested returns the running ingest. Raises :class:`InvalidUrl` for a bad URL."""
        detected = detect_url(url)
        key = url_key(detected)
        if ingest_id is not None and await self._store.source_version(INGEST_STREAM, ingest_id):
            return ingest_id, False
        for _ in range(20):
            claim = await self._store.last_event(CLAIM_STREAM, key)
            if claim is not None and claim.event == "claimed":
                running: str = claim.payload_dict()["ingest_id"]
                return running, False
            new_id = ingest_id or new_ingest_id()
            try:
                await self._store.append(
                    [
                        _event(
                            CLAIM_STREAM,
                            key,
                            "claimed",
                            {"ingest_id": new_id},
                            claim.version if claim else 0,
                        ),
                        _event(
                            INGEST_STREAM,
                            new_id,
                            "requested",
                            _requested_payload(detected, key, channel_limit, parent_id),
                            0,
                        ),
                    ]
                )
            except VersionConflict:
                continue  # another request claimed it (or released it) meanwhile: look again
            return new_id, True
        raise RuntimeError(f"could not claim {key} after repeated conflicts")

    async def events(self, ingest_id: str, *, until_position: int | None = None) -> list[Event]:
        found = await self._store.read_source(
            INGEST_STREAM, ingest_id, until_position=until_position
        )
        if not found and until_position is None:
            raise UnknownIngest(ingest_id)
        return found

    async def cancel(self, ingest_id: str) -> None:
        """End the ingest with status ``error`` ("Cancelled by request")."""
        for _ in range(20):
            events = await self.events(ingest_id)
            state = fold_events(events)
            if state is None:
                raise UnknownIngest(ingest_id)
            if state["status"] in TERMINAL_STATUSES:
                raise NotCancellable(
                    f"ingest {ingest_id} already finished with status {state['status']!r}"
                )
            complete = {
                "type": state["type"],
                "status": "error",
                "message": "Cancelled by request",
                "details": {"error_kind": "cancelled", "retryable": False},
            }
            try:
                await self._finish(state, events[-1].version, complete)
            except VersionConflict:
                continue
            return
        raise RuntimeError(f"could not cancel {ingest_id} after repeated conflicts")

    async def _finish(
        self,
        state: dict[str, Any],
        version: int,
        complete: dict[str, Any],
        follow_ups: Sequence[NewEvent] = (),
    ) -> None:
        """Append ``complete``, the URL claim's release and any follow-up events as one."""
        key = state["url_key"]
        claim = await self._store.last_event(CLAIM_STREAM, key)
        batch = [_event(INGEST_STREAM, state["ingest_id"], "complete", complete, version)]
        if (
            claim is not None
            and claim.event == "claimed"
            and claim.payload_dict().get("ingest_id") == state["ingest_id"]
        ):
            batch.append(
                _event(
                    CLAIM_STREAM,
                    key,
                    "released",
                    {"ingest_id": state["ingest_id"], "status": complete["status"]},
                    claim.version,
                )
            )
        await self._store.append([*batch, *follow_ups])

    async def wait_complete(self, ingest_id: str) -> dict[str, Any]:
        """Follow the ingest until its ``complete`` event; return that payload."""
        async for entries in replay_then_tail(
            self._store, 0, EventFilter(streams=(INGEST_STREAM,), source_ids=(ingest_id,))
        ):
            for entry in entries:
                if entry.event.event == "complete":
                    return entry.payload()
        raise AssertionError("unreachable: a tail never ends")

    def run(self, state: dict[str, Any], version: int, instance: str) -> IngestRun:
        return IngestRun(self, state, version, instance)


def _requested_payload(
    detected: DetectedUrl, key: str, channel_limit: str, parent_id: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "url": detected.url,
        "url_key": key,
        "type": detected.type,
    }
    if detected.type == "channel":
        payload["channel_limit"] = channel_limit
    if detected.video_id:
        payload["video_id"] = detected.video_id
    if parent_id:
        payload["parent_id"] = parent_id
    return payload


class IngestRun:
    """One attempt at running an ingest; every append checks nobody else wrote meanwhile."""

    def __init__(
        self, service: IngestService, state: dict[str, Any], version: int, instance: str
    ) -> None:
        self._service = service
        self.state = state
        self.version = version
        self.instance = instance

    @property
    def ingest_id(self) -> str:
        ingest_id: str = self.state["ingest_id"]
        return ingest_id

    async def append(self, name: str, payload: dict[str, Any]) -> None:
        try:
            await self._service._store.append_one(
                _event(INGEST_STREAM, self.ingest_id, name, payload, self.version)
            )
        except VersionConflict as exc:
            raise _Abandoned(self.ingest_id) from exc
        self.version += 1

    async def progress(self, step: str, message: str, extras: dict[str, Any] | None = None) -> None:
        await self.append("progress", {"step": step, "message": message, **(extras or {})})

    async def finish(self, complete: dict[str, Any], follow_ups: Sequence[NewEvent] = ()) -> None:
        try:
            await self._service._finish(self.state, self.version, complete, follow_ups)
        except VersionConflict as exc:
            raise _Abandoned(self.ingest_id) from exc
        self.version += 1


#: Runs the steps of one ingest and returns its ``complete`` payload (or raises IngestFailure).
Pipeline = Callable[[IngestRun], Awaitable[dict[str, Any]]]
#: Events to append atomically with an ingest's ``complete`` (e.g. a run of agents over it).
FollowUps = Callable[[dict[str, Any], dict[str, Any]], list[NewEvent]]


class IngestJobs:
    """The ingest job kind for :class:`app.jobs.JobRunner`."""

    name = "ingest"
    projection = "ingests"

    def __init__(
        self,
        service: IngestService,
        engine: AsyncEngine,
        pipeline: Pipeline,
        *,
        concurrency: int,
        instance: str,
        follow_ups: FollowUps | None = None,
    ) -> None:
        self._follow_ups = follow_ups
        self._service = service
        self._engine = engine
        self._pipeline = pipeline
        self.concurrency = concurrency
        self._instance = instance

    def wants(self, event: Event) -> bool:
        return event.stream == INGEST_STREAM and event.event == "requested"

    async def candidates(self, limit: int, now_ms: int) -> list[str]:
        query = (
            select(ingests.c.ingest_id)
            .select_from(ingests.outerjoin(job_leases, job_leases.c.job_id == ingests.c.ingest_id))
            .where(
                and_(
                    ingests.c.status.in_(ACTIVE_STATUSES),
                    or_(job_leases.c.job_id.is_(None), job_leases.c.expires_at < now_ms),
                )
            )
            .order_by(ingests.c.requested_position)
            .limit(limit)
        )
        async with self._engine.connect() as connection:
            return [row[0] for row in (await connection.execute(query)).all()]

    async def run(self, job_id: str) -> None:
        events = await self._service.events(job_id)
        state = fold_events(events)
        if state is None or state["status"] in TERMINAL_STATUSES:
            return
        run = self._service.run(state, events[-1].version, self._instance)
        try:
            await self._run(run, events)
        except _Abandoned:
            logger.info("ingest %s was ended elsewhere (cancelled); stopping", job_id)

    async def _run(self, run: IngestRun, events: Sequence[Event]) -> None:
        attempts = sum(1 for event in events if event.event == "started")
        if attempts:
            await run.append(
                "interrupted",
                {
                    "message": f"The previous run (attempt {attempts}) stopped before finishing;"
                    " starting again",
                    "attempt": attempts,
                },
            )
        await run.append(
            "started", {"message": "Started", "attempt": attempts + 1, "instance": self._instance}
        )
        try:
            complete = await self._pipeline(run)
        except IngestFailure as failure:
            complete = {
                "type": run.state["type"],
                "status": "error",
                "message": failure.message,
                "details": failure.as_details(),
            }
        except (asyncio.CancelledError, _Abandoned):
            raise
        except ContentUnavailable as exc:
            logger.warning("ingest %s: content store unavailable: %s", run.ingest_id, exc)
            complete = {
                "type": run.state["type"],
                "status": "error",
                "message": f"The content store is unavailable: {exc}",
                "details": {"error_kind": "content_store_unavailable", "retryable": True},
            }
        except Exception as exc:
            logger.exception("ingest %s failed", run.ingest_id)
            complete = {
                "type": run.state["type"],
                "status": "error",
                "message": f"Internal error: {exc}",
                "details": {"error_kind": "internal", "retryable": True},
            }
        extra = self._follow_ups(run.state, complete) if self._follow_ups else []
        await run.finish(complete, extra)
