"""A Python client for the service: resumable streams, ingests, agent reports and the log.

    async with ActivityClient("http://127.0.0.1:8000") as client:
        async for item in client.stream({"stream": "agent"}):
            if isinstance(item, Reset):
                ...  # the server's log is shorter than where we were: it goes on from item.head
            else:
                print(item.position, item.event, item.payload)

``stream`` yields :class:`StreamEvent` objects, and :class:`Reset` when the server reports a
``reset``; it never yields one position twice and never raises on a drop (it reconnects).
A :class:`StreamEvent`'s ``payload`` is the event's payload on every stream and ``ingest``;
its ``envelope`` is the whole envelope where the stream sends one (None on ingest streams).
"""

from __future__ import annotations

from app.client.agent import AgentActivity
from app.client.client import ActivityClient, IngestProgress
from app.client.models import ActivityError, Envelope, Reset, StreamEvent, Truncated

__all__ = [
    "ActivityClient",
    "ActivityError",
    "AgentActivity",
    "Envelope",
    "IngestProgress",
    "Reset",
    "StreamEvent",
    "Truncated",
]
