"""How a stream's frames reach its subscriber: a response that writes each frame within a
deadline, ends when the peer disconnects, and says goodbye when the process drains.

:class:`SubscriberResponse` is what every transport shares: the end of a stream, whatever
ended it (:meth:`SubscriberResponse.finish`). :class:`TaskGroupSubscriber` is the plain
transport, a task group as Starlette's and Litestar's streaming responses are: one task writes
the frames, one listens for the disconnect, one for the drain, and whichever finishes first
ends the others. :mod:`app.api.sse.lean` is the transport that keeps an idle subscriber to its
own suspended task (``SSE_LEAN_STREAMS``, the default); both answer byte for byte alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from litestar.datastructures import MutableScopeHeaders
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Scope, Send

from app.api.sse.fanout import FanoutCounts, FanoutSink
from app.api.sse.framing import shutdown_frame
from app.server import CONNECTION_EXTENSION

__all__ = ["End", "SubscriberResponse", "TaskGroupSubscriber"]

logger = logging.getLogger(__name__)

#: What ended a stream: its body ran out, the peer went, the process is draining, or a write
#: did not complete within the write timeout.
End = Literal["ended", "disconnect", "drain", "timeout"]

#: The headers of a response whose headers were sent (none; never added to).
_SENT = MutableScopeHeaders()


class SubscriberResponse(ASGIStreamingResponse):
    """A stream to one subscriber; how it waits is the subclass's (:meth:`send_body`)."""

    __slots__ = (
        "_chunks",
        "abort",
        "counts",
        "draining",
        "retry_ms",
        "sink",
        "started",
        "write_timeout",
    )

    write_timeout: float
    #: Set when the process is shutting down: the stream ends with :func:`shutdown_frame`.
    draining: asyncio.Event | None
    retry_ms: int
    #: Closes the connection at once, unsent bytes dropped (where the server offers it).
    abort: Callable[[], None] | None
    started: float
    #: Takes the stream's live frames while it is caught up (:mod:`app.api.sse.fanout`),
    #: once bound to the connection's chunk writer; None: the stream writes them all.
    sink: FanoutSink | None
    counts: FanoutCounts | None
    _chunks: Callable[[], Any] | None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions: dict[str, Any] = scope.get("extensions") or {}
        connection: dict[str, Any] = extensions.get(CONNECTION_EXTENSION) or {}
        self.abort = connection.get("abort")
        chunks = connection.get("chunks")
        self._chunks = None if chunks is None or self.sink is None else lambda: chunks(scope)
        self.started = time.monotonic()
        await super().__call__(scope, receive, send)

    async def start_response(self, send: Send) -> None:
        await super().start_response(send)
        # Sent: the headers need not be held for the hours the stream may last.
        self.headers = _SENT
        # Started: from here the body may be written straight to the connection.
        chunks, self._chunks = self._chunks, None
        if chunks is not None and self.sink is not None:
            writer = chunks()
            if writer is not None:
                self.sink.bind(writer, self.counts)

    async def finish(self, send: Send, end: End) -> None:
        """End the response as ``end`` requires."""
        if end == "disconnect":
            return  # nobody to write to
        if end == "timeout":
            self._give_up()
            return
        try:
            if end == "drain":
                # Shutting down: a peer that cannot take one more frame now is not waited
                # for (it resumes from its Last-Event-ID all the same).
                frame = shutdown_frame(self.retry_ms)
                async with asyncio.timeout(min(self.write_timeout, 1.0)):
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            self._give_up()

    def _give_up(self) -> None:
        # Expected of subscribers that vanish (a closed laptop, a dropped network): the client
        # resumes from its Last-Event-ID. The connection goes at once, with the bytes it could
        # not take.
        logger.warning(
            "closing an SSE stream after %.0f s: the subscriber took no data for %g s "
            "(SSE_WRITE_TIMEOUT_SECONDS)",
            time.monotonic() - self.started,
            self.write_timeout,
        )
        if self.abort is not None:
            self.abort()

    async def close_iterator(self) -> None:
        aclose = getattr(self.iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class _Ended(Exception):
    """Raised by one of a stream's tasks to end the others (see TaskGroupSubscriber)."""

    def __init__(self, end: End) -> None:
        self.end = end


async def _ends(waiting: Any, end: End) -> None:
    await waiting
    raise _Ended(end)


class TaskGroupSubscriber(SubscriberResponse):
    """The plain transport: a task group of a writer, a disconnect listener and (while the
    process may drain) a drain listener; the first to finish ends the stream."""

    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        end: End = "ended"
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._write(send))
                group.create_task(_ends(_disconnected(receive), "disconnect"))
                if self.draining is not None:
                    group.create_task(_ends(self.draining.wait(), "drain"))
        except* _Ended as ended:
            first = ended.exceptions[0]
            assert isinstance(first, _Ended)
            end = first.end
        finally:
            await self.close_iterator()
        await self.finish(send, end)

    async def _write(self, send: Send) -> None:
        async for chunk in self.iterator:
            body = chunk if isinstance(chunk, bytes) else chunk.encode()
            try:
                async with asyncio.timeout(self.write_timeout):
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            except TimeoutError:
                raise _Ended("timeout") from None
        raise _Ended("ended")


async def _disconnected(receive: Receive) -> None:
    """Until the peer disconnects (a receive channel that fails has no peer either)."""
    while True:
        try:
            message = await receive()
        except Exception:
            logger.debug("SSE receive failed; ending the stream", exc_info=True)
            return
        if message["type"] == "http.disconnect":
            return
