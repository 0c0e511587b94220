"""The naive baseline: the activity service's write and SSE paths with no persistence.

Events live in a Python list; one ``asyncio.Condition`` wakes every subscriber, and each
subscriber encodes every envelope itself. Wire shapes follow /work/shared/spec/API.md.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import msgspec
import uvicorn
from litestar import Litestar, Request, get, post
from litestar.exceptions import ValidationException
from litestar.response import ServerSentEvent, ServerSentEventMessage

__all__ = ["AppendBatchRequest", "AppendRequest", "BatchItem", "MemoryLog", "create_app"]

RETRY_MS = 3000


class AppendRequest(msgspec.Struct):
    event: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    event_id: str | None = None


class BatchItem(msgspec.Struct):
    source_id: str
    event: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    event_id: str | None = None


class AppendBatchRequest(msgspec.Struct):
    events: list[BatchItem]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MemoryLog:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.versions: dict[str, int] = {}
        self.positions_by_event_id: dict[str, int] = {}
        self.changed = asyncio.Condition()

    def head(self) -> int:
        return len(self.events)

    def append(
        self, source_id: str, event: str, payload: dict[str, Any], event_id: str | None
    ) -> dict[str, Any]:
        if event_id is not None and event_id in self.positions_by_event_id:
            return self.events[self.positions_by_event_id[event_id] - 1]
        version = self.versions.get(source_id, 0) + 1
        self.versions[source_id] = version
        envelope: dict[str, Any] = {
            "position": len(self.events) + 1,
            "stream": "agent",
            "source_id": source_id,
            "version": version,
            "event": event,
            "event_id": event_id or str(uuid4()),
            "timestamp": _now(),
            "payload": payload,
        }
        self.events.append(envelope)
        self.positions_by_event_id[envelope["event_id"]] = envelope["position"]
        return envelope

    async def subscribe(self, after: int) -> AsyncIterator[ServerSentEventMessage]:
        yield ServerSentEventMessage(data=None, retry=RETRY_MS)
        if after > self.head():
            yield ServerSentEventMessage(event="reset", data=f'{{"head": {self.head()}}}')
            after = self.head()
        sent = after
        while True:
            async with self.changed:
                while len(self.events) <= sent:
                    await self.changed.wait()
            pending = self.events[sent:]
            sent += len(pending)
            for envelope in pending:
                yield ServerSentEventMessage(
                    id=envelope["position"],
                    event=envelope["event"],
                    data=msgspec.json.encode(envelope),
                )


def _parse_last_event_id(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not raw.isdigit():
        raise ValidationException(
            detail="Last-Event-ID must be a non-negative integer",
            extra={"last_event_id": raw},
        )
    return int(raw)


def create_app() -> Litestar:
    log = MemoryLog()

    @post("/agents/{source_id:str}/events")
    async def append_agent_event(source_id: str, data: AppendRequest) -> dict[str, int]:
        async with log.changed:
            envelope = log.append(source_id, data.event, data.payload, data.event_id)
            log.changed.notify_all()
        return {"position": envelope["position"], "version": envelope["version"]}

    @post("/agents/events")
    async def append_agent_events(data: AppendBatchRequest) -> dict[str, list[int]]:
        async with log.changed:
            envelopes = [
                log.append(item.source_id, item.event, item.payload, item.event_id)
                for item in data.events
            ]
            log.changed.notify_all()
        return {"positions": [envelope["position"] for envelope in envelopes]}

    @get("/events/stream")
    async def stream_events(
        request: Request[Any, Any, Any], last_event_id: str | None = None
    ) -> ServerSentEvent:
        after = _parse_last_event_id(request.headers.get("last-event-id", last_event_id))
        return ServerSentEvent(log.subscribe(after))

    @get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar(
        route_handlers=[append_agent_event, append_agent_events, stream_events, health],
        openapi_config=None,
    )


app = create_app()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Naive in-memory activity service peer")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
