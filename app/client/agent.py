"""An external agent's activity, reported over HTTP (``POST /agents/{source_id}/events``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from app.client.models import ActivityError

if TYPE_CHECKING:
    from app.client.client import ActivityClient

__all__ = ["AgentActivity", "report_activity"]

logger = logging.getLogger("app.client")

# How long a block that was cancelled (Ctrl-C) may spend saying so before it gives up.
_CANCEL_REPORT_SECONDS = 5.0


class AgentActivity:
    """One activity of an external agent; every method appends one event to its source."""

    def __init__(self, client: ActivityClient, source_id: str, agent_name: str) -> None:
        self._client = client
        self.source_id = source_id
        self.agent_name = agent_name
        #: Sent with ``complete`` when the ``agent`` block ends normally.
        self.result: Any = None
        self.final_message = "Done"

    async def report(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append ``event`` with ``fields`` in its payload; returns ``{"position", "version",
        "event_id", "timestamp", "duplicate"}``. The event id is made once, here, so every
        retry of this post names the same event and the server writes it at most once."""
        payload = {"agent_name": self.agent_name}
        payload.update({key: value for key, value in fields.items() if value is not None})
        body = {"event": event, "payload": payload, "event_id": str(uuid.uuid4())}
        response = await self._client.request(
            "POST", f"/agents/{quote(self.source_id, safe='')}/events", json=body
        )
        appended: dict[str, Any] = response.json()
        return appended

    async def progress(self, fraction: float | None, message: str, **extra: Any) -> None:
        await self.report("progress", status="running", progress=fraction, message=message, **extra)

    async def heartbeat(self) -> None:
        await self.report("heartbeat")


async def _beat(activity: AgentActivity, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await activity.heartbeat()
        except ActivityError as exc:
            logger.warning("heartbeat for %s failed: %s", activity.source_id, exc)


@contextlib.asynccontextmanager
async def report_activity(
    client: ActivityClient,
    agent_name: str,
    source_id: str | None,
    heartbeat_seconds: float,
    message: str,
) -> AsyncIterator[AgentActivity]:
    activity = AgentActivity(
        client, source_id or f"{agent_name}_{uuid.uuid4().hex[:16]}", agent_name
    )
    await activity.report("started", status="running", message=message, progress=0.0)
    beating = asyncio.create_task(_beat(activity, heartbeat_seconds))
    failure: BaseException | None = None
    try:
        yield activity
    except BaseException as exc:
        failure = exc
        raise
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        if failure is None:
            await activity.report(
                "complete",
                status="completed",
                message=activity.final_message,
                progress=1.0,
                result=activity.result,
            )
        else:
            await _report_failure(activity, failure)


async def _report_failure(activity: AgentActivity, failure: BaseException) -> None:
    error = str(failure) or type(failure).__name__
    if isinstance(failure, Exception):
        try:
            await activity.report("failed", status="failed", message=error, error=error)
        except ActivityError as exc:
            logger.warning("could not report %s as failed: %s", activity.source_id, exc)
        return
    # Cancelled or interrupted: say so if the service answers at once, but do not hold up
    # the shutdown for it (an activity left unreported shows as stalled).
    with contextlib.suppress(Exception, asyncio.CancelledError):
        async with asyncio.timeout(_CANCEL_REPORT_SECONDS):
            await activity.report("failed", status="failed", message="Cancelled", error="Cancelled")
