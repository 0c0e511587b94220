"""Server-Sent Events: the contract's framing (:mod:`.framing`), the response the endpoints
return (:mod:`.response`), and the transports that write it (:mod:`.transport`, the plain
task group; :mod:`.lean`, the one that keeps idle subscribers small)."""

from __future__ import annotations

from app.api.sse.framing import (
    SSE_HEADERS,
    FrameBuilder,
    control_frame,
    envelope_frame,
    event_stream,
    parse_last_event_id,
    payload_frame,
    sql_frames,
)
from app.api.sse.response import EventStreamResponse, log_stream

__all__ = [
    "SSE_HEADERS",
    "EventStreamResponse",
    "FrameBuilder",
    "control_frame",
    "envelope_frame",
    "event_stream",
    "log_stream",
    "parse_last_event_id",
    "payload_frame",
    "sql_frames",
]
