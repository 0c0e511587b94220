"""Errors the log raises; the API maps each to its HTTP status."""

from __future__ import annotations

__all__ = ["AppendError", "EventIdReused", "LogUnavailable", "VersionConflict"]


class AppendError(Exception):
    """An append was refused; nothing of its batch was written."""


class VersionConflict(AppendError):
    """``expected_version`` did not match the source's current version (HTTP 409)."""

    def __init__(self, stream: str, source_id: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.source_id = source_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"expected_version {expected} does not match the current version {actual} "
            f"of {stream}/{source_id}"
        )


class EventIdReused(AppendError):
    """An ``event_id`` already names a different event (HTTP 409)."""

    def __init__(self, event_id: str, position: int) -> None:
        self.event_id = event_id
        self.position = position
        super().__init__(
            f"event_id {event_id} was already used at position {position} for a different event"
        )


class LogUnavailable(Exception):
    """The database could not be written or read (HTTP 503); the caller may retry."""
