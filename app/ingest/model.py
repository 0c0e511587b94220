"""Shared shapes of the ingest pipeline: failures, progress callbacks, fetched content."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

__all__ = [
    "ChannelLimit",
    "IngestFailure",
    "IngestType",
    "Progress",
    "RetryNotice",
]

IngestType = Literal["video", "channel", "article"]
ChannelLimit = Literal["month", "year", "50", "100", "all"]

#: ``await progress(step, message, extras)`` appends one ``progress`` event for the ingest.
Progress = Callable[[str, str, dict[str, Any]], Awaitable[None]]


class IngestFailure(Exception):
    """An ingest step failed in a way the user should read about.

    ``kind`` is a stable machine-readable name (``transcripts_disabled``, ``ip_blocked``,
    ``blocked_address``, …); ``retryable`` says whether trying again later may succeed.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.details = details or {}

    def as_details(self) -> dict[str, Any]:
        return {**self.details, "error_kind": self.kind, "retryable": self.retryable}


#: ``await on_retry(next_attempt, attempts, delay_seconds, failure)``, called before the wait.
RetryNotice = Callable[[int, int, float, IngestFailure], Awaitable[None]]


class Snippet(msgspec.Struct, frozen=True):
    text: str
    start: float
    duration: float
