"""What the client hands back: stream items, log envelopes and errors."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["ActivityError", "Envelope", "Reset", "StreamEvent", "Truncated"]


class ActivityError(Exception):
    """The service refused a request (a 4xx, with its JSON error body), or could not be
    reached within the retry budget (``status_code`` is None then)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.extra = extra or {}

    @property
    def message(self) -> str:
        return str(self.args[0])


class StreamEvent(msgspec.Struct, frozen=True):
    """One persisted log event as an SSE frame carried it.

    ``payload`` is always the event's payload, whichever stream it came from.
    ``envelope`` is the whole envelope (``stream``, ``source_id``, ``version``,
    ``event_id``, ``timestamp``, ``payload``) where the frame carries one, as on
    ``/events/stream`` and ``/agents/stream``; it is None on the ingest streams, whose
    frames carry the payload alone.
    """

    position: int
    event: str
    payload: Any
    envelope: dict[str, Any] | None = None

    @classmethod
    def from_frame(cls, position: int, event: str, data: Any) -> StreamEvent:
        """The event a frame with this ``id``, ``event`` and decoded ``data`` carries."""
        if (
            isinstance(data, dict)
            and data.keys() >= _ENVELOPE_FIELDS
            and data["position"] == position
        ):
            return cls(position, event, data["payload"], data)
        return cls(position, event, data)

    @property
    def data(self) -> Any:
        """The frame's decoded JSON as the server sent it: ``envelope`` where there is one,
        ``payload`` otherwise. Kept for existing scripts; read ``payload`` or ``envelope``,
        which mean the same on every stream."""
        return self.payload if self.envelope is None else self.envelope

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.position, "event": self.event, "data": self.data}


_ENVELOPE_FIELDS = frozenset(
    ("position", "stream", "source_id", "version", "event", "event_id", "timestamp", "payload")
)


class Reset(msgspec.Struct, frozen=True):
    """The server's log ends before the position the stream resumed from (it was restored
    from an older copy, say). The stream goes on from ``head``: positions above it are new
    events, even where they repeat numbers seen before."""

    head: int


class Truncated(msgspec.Struct, frozen=True):
    """Events the stream would have delivered were removed from the server's log by its
    retention rules: ``count`` of them in positions ``first``..``last``, kept in the archive
    segment ``segment`` (``export --include-archives`` reads them). The stream goes on with
    the events the log kept."""

    first: int
    last: int
    count: int
    segment: str


class Envelope(msgspec.Struct, frozen=True):
    """One event as ``GET /events`` returns it. ``payload`` keeps the server's bytes as they
    are, so that re-encoding an envelope reproduces the server's JSON exactly."""

    position: int
    stream: str
    source_id: str
    version: int
    event: str
    event_id: str
    timestamp: str
    payload: msgspec.Raw

    def payload_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = msgspec.json.decode(self.payload)
        return value
