"""A resumable SSE reader: parsing, reconnecting, and never handing out an event twice."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, NamedTuple

import httpx
import msgspec

from app.client.models import ActivityError, Reset, StreamEvent, Truncated

__all__ = ["Backoff", "SseFrame", "SseParser", "error_from", "follow_stream"]

logger = logging.getLogger("app.client")

# Until the server says otherwise (its first frame does) and until heartbeats are seen.
DEFAULT_RETRY_MS = 3000
DEFAULT_HEARTBEAT_SECONDS = 15.0
# A stream silent for this many heartbeat periods is taken for dead.
SILENT_PERIODS = 3

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class SseFrame(NamedTuple):
    id: str | None
    event: str
    data: str


class SseParser:
    """The SSE line protocol (WHATWG ``text/event-stream``), fed with raw chunks."""

    def __init__(self) -> None:
        self._buffer = b""
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []
        #: The last ``retry:`` value seen, in milliseconds.
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SseFrame]:
        frames: list[SseFrame] = []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data or self._event:
                    frames.append(
                        SseFrame(self._id, self._event or "message", "\n".join(self._data))
                    )
                self._id, self._event, self._data = None, "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return frames


class Backoff(NamedTuple):
    """Delays between attempts: ``base`` doubled per consecutive failure up to ``cap``, plus
    up to a quarter more at random, so that clients dropped together do not return together."""

    base: float
    cap: float

    def delay(self, failures: int) -> float:
        wait = min(self.cap, self.base * 2.0 ** max(failures - 1, 0))
        return max(wait + random.uniform(0.0, wait / 4), 0.01)


def error_from(response: httpx.Response) -> ActivityError:
    """An :class:`ActivityError` from a (read) error response and its JSON body."""
    detail = response.text.strip()[:500] or response.reason_phrase
    extra: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = str(body.get("detail") or detail)
        if isinstance(body.get("extra"), dict):
            extra = body["extra"]
    return ActivityError(
        f"{response.request.method} {response.request.url.path} answered "
        f"{response.status_code}: {detail}",
        status_code=response.status_code,
        extra=extra,
    )


class _Interrupted(Exception):
    """This connection is over (dropped, silent, or refused for now); try another."""


def _decode(data: str) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data


async def follow_stream(
    http: httpx.AsyncClient,
    path: str,
    params: Mapping[str, Any] | None,
    *,
    last_event_id: int | None,
    headers: Mapping[str, str],
    max_delay: float,
    idle_timeout: float | None,
    report_truncated: bool = False,
) -> AsyncGenerator[StreamEvent | Reset | Truncated, None]:
    """Follow an SSE endpoint across drops, restarts and silent connections (see
    :meth:`app.client.ActivityClient.stream`)."""
    last = last_event_id
    retry_ms = DEFAULT_RETRY_MS
    failures = 0
    period: float | None = None
    while True:
        request_headers = {"Accept": "text/event-stream", **headers}
        if last is not None:
            request_headers["Last-Event-ID"] = str(last)
        silent_after = idle_timeout or SILENT_PERIODS * (period or DEFAULT_HEARTBEAT_SECONDS)
        try:
            async with http.stream(
                "GET", path, params=params, headers=request_headers, timeout=_STREAM_TIMEOUT
            ) as response:
                if response.status_code == 204:
                    return
                if response.status_code in RETRYABLE_STATUS:
                    raise _Interrupted(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    await response.aread()
                    raise error_from(response)
                parser = SseParser()
                chunks = response.aiter_raw()
                previous_beat: float | None = None
                while True:
                    try:
                        async with asyncio.timeout(silent_after):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        raise _Interrupted("the server ended the stream") from None
                    except TimeoutError:
                        raise _Interrupted(f"no frame for {silent_after:.0f} s") from None
                    frames = parser.feed(chunk)
                    if parser.retry_ms is not None:
                        retry_ms = parser.retry_ms
                        failures = 0
                    for frame in frames:
                        if frame.id is None:
                            if frame.event == "heartbeat":
                                # Two heartbeats in a row are one period apart: learn it, so a
                                # dead connection is noticed after a few periods, not minutes.
                                now = time.monotonic()
                                if previous_beat is not None and idle_timeout is None:
                                    period = max(now - previous_beat, 0.1)
                                    silent_after = SILENT_PERIODS * period
                                previous_beat = now
                            elif frame.event == "reset":
                                head = int(_decode(frame.data)["head"])
                                last = head
                                yield Reset(head)
                            elif frame.event == "truncated":
                                gone = msgspec.convert(_decode(frame.data), Truncated)
                                if report_truncated:
                                    yield gone
                                else:
                                    logger.warning(
                                        "%s: %d events in positions %d-%d were removed by the "
                                        "server's retention; they are in archive segment %s",
                                        path,
                                        gone.count,
                                        gone.first,
                                        gone.last,
                                        gone.segment,
                                    )
                            continue
                        previous_beat = None
                        if not (frame.id.isascii() and frame.id.isdigit()):
                            continue
                        position = int(frame.id)
                        if last is not None and position <= last:
                            continue
                        last = position
                        yield StreamEvent.from_frame(position, frame.event, _decode(frame.data))
        except (httpx.TransportError, _Interrupted) as exc:
            failures += 1
            reason = str(exc) or type(exc).__name__
        wait = Backoff(retry_ms / 1000, max(max_delay, retry_ms / 1000)).delay(failures)
        logger.info("stream %s interrupted (%s); reconnecting in %.1f s", path, reason, wait)
        await asyncio.sleep(wait)


# Reads are bounded by the silence rule above, not by httpx.
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)
