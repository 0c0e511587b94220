"""The activity tracker: the Python API agents use to report what they are doing.

Every call appends an event to the ``agent`` stream; what an activity looks like now is read
back from the agent projection (``GET /agents``), never kept here.

    async with tracker.track("tagger", source_id="tagger_42") as activity:
        await activity.progress(0.5, "Processing video 5/10")

sends ``started``, the progress, a ``heartbeat`` every heartbeat period while the block runs,
and ``complete`` (or ``failed`` with the exception's message) when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app.eventlog import AppendResult, EventStore, NewEvent, canonical_payload
from app.projections.agents import AGENT_STREAM

__all__ = ["Activity", "ActivityTracker", "agent_event", "new_activity_id"]

logger = logging.getLogger(__name__)


def new_activity_id(agent_name: str) -> str:
    return f"{agent_name}_{uuid.uuid4().hex[:16]}"


def agent_event(
    source_id: str,
    name: str,
    agent_name: str,
    fields: dict[str, Any],
    *,
    event_id: str | None = None,
    expected_version: int | None = None,
) -> NewEvent:
    payload = {"agent_name": agent_name, **{k: v for k, v in fields.items() if v is not None}}
    return NewEvent(
        stream=AGENT_STREAM,
        source_id=source_id,
        event=name,
        payload=canonical_payload(payload),
        event_id=event_id,
        expected_version=expected_version,
    )


class ActivityTracker:
    def __init__(self, store: EventStore, *, heartbeat_seconds: float) -> None:
        self._store = store
        self.heartbeat_seconds = heartbeat_seconds

    async def _append(self, event: NewEvent) -> AppendResult:
        return await self._store.append_one(event)

    async def register_activity(
        self,
        agent_name: str,
        *,
        source_id: str | None = None,
        message: str = "Started",
        status: str = "running",
        **extra: Any,
    ) -> Activity:
        source_id = source_id or new_activity_id(agent_name)
        await self._append(
            agent_event(
                source_id,
                "started",
                agent_name,
                {"status": status, "message": message, "progress": 0.0, **extra},
            )
        )
        return Activity(self, source_id, agent_name)

    async def update_activity(
        self,
        source_id: str,
        agent_name: str,
        *,
        progress: float | None = None,
        message: str | None = None,
        status: str = "running",
        **extra: Any,
    ) -> AppendResult:
        if progress is not None and not 0 <= progress <= 1:
            raise ValueError(f"progress must be from 0 to 1, got {progress}")
        return await self._append(
            agent_event(
                source_id,
                "progress",
                agent_name,
                {"status": status, "message": message, "progress": progress, **extra},
            )
        )

    async def heartbeat(self, source_id: str, agent_name: str) -> AppendResult:
        return await self._append(agent_event(source_id, "heartbeat", agent_name, {}))

    async def complete_activity(
        self,
        source_id: str,
        agent_name: str,
        *,
        message: str = "Done",
        result: Any = None,
    ) -> AppendResult:
        return await self._append(
            agent_event(
                source_id,
                "complete",
                agent_name,
                {"status": "completed", "message": message, "progress": 1.0, "result": result},
            )
        )

    async def fail_activity(
        self,
        source_id: str,
        agent_name: str,
        *,
        error: str,
        result: Any = None,
    ) -> AppendResult:
        return await self._append(
            agent_event(
                source_id,
                "failed",
                agent_name,
                {"status": "failed", "message": error, "error": error, "result": result},
            )
        )

    @contextlib.asynccontextmanager
    async def track(
        self,
        agent_name: str,
        *,
        source_id: str | None = None,
        message: str = "Started",
        **extra: Any,
    ) -> AsyncIterator[Activity]:
        """Register an activity, heartbeat while the block runs, and record how it ended."""
        activity = await self.register_activity(
            agent_name, source_id=source_id, message=message, **extra
        )
        beating = asyncio.create_task(self._beat(activity), name=f"heartbeat:{activity.source_id}")
        try:
            yield activity
        except asyncio.CancelledError:
            # Cancelled from outside (shutdown, a lost lease): leave the activity as it is; the
            # watchdog, or whoever takes the work over, says what happened to it.
            raise
        except Exception as exc:
            beating.cancel()
            await self.fail_activity(
                activity.source_id, agent_name, error=str(exc) or type(exc).__name__
            )
            raise
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await self.complete_activity(
            activity.source_id, agent_name, message=activity.final_message, result=activity.result
        )

    async def _beat(self, activity: Activity) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.heartbeat(activity.source_id, activity.agent_name)
            except Exception:
                logger.warning("heartbeat for %s failed", activity.source_id, exc_info=True)


class Activity:
    """A handle on one running activity (its identity; its state lives in the log)."""

    def __init__(self, tracker: ActivityTracker, source_id: str, agent_name: str) -> None:
        self._tracker = tracker
        self.source_id = source_id
        self.agent_name = agent_name
        #: Recorded with ``complete`` when a :meth:`ActivityTracker.track` block ends.
        self.result: Any = None
        self.final_message = "Done"

    async def progress(self, fraction: float, message: str, **extra: Any) -> None:
        await self._tracker.update_activity(
            self.source_id, self.agent_name, progress=fraction, message=message, **extra
        )

    async def heartbeat(self) -> None:
        await self._tracker.heartbeat(self.source_id, self.agent_name)
