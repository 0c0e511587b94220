"""The SSE response the endpoints return, on the transport the settings choose."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from litestar import Request
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.datastructures import Cookie
from litestar.enums import MediaType
from litestar.response import Stream
from litestar.response.base import ASGIResponse

from app.api.sse.fanout import FanoutSink
from app.api.sse.framing import SSE_HEADERS, FrameBuilder, event_stream
from app.api.sse.lean import LeanSubscriber
from app.api.sse.transport import SubscriberResponse, TaskGroupSubscriber
from app.eventlog import EventFilter, LogEntry
from app.runtime.services import Services

__all__ = ["EventStreamResponse", "log_stream"]


class EventStreamResponse(Stream):
    """``text/event-stream`` with the contract's headers and the subscriber write timeout,
    written by the lean transport unless ``SSE_LEAN_STREAMS`` is off; its live frames by the
    fan-out (``sink``) where the connection allows."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        write_timeout: float,
        headers: dict[str, str] | None = None,
        sink: FanoutSink | None = None,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **(headers or {})},
        )
        self.write_timeout = write_timeout
        self.sink = sink

    def to_asgi_response(
        self,
        app: Any,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: Any = None,
    ) -> ASGIResponse:
        merged = {**headers, **self.headers} if headers is not None else dict(self.headers)
        # Exactly the contract's type: SSE is always UTF-8, so no charset parameter.
        merged["content-type"] = "text/event-stream"
        # Litestar passes app=None here; the request knows its app.
        state = request.app.state
        services: Services | None = state.get("services")
        lean = services is None or services.settings.server.lean_streams
        transport: type[SubscriberResponse] = LeanSubscriber if lean else TaskGroupSubscriber
        connections = state.get("sse_connections")
        if connections is not None:
            connections.transports[transport.__name__] += 1
        response = transport(
            background=self.background or background,
            cookies=[*self.cookies, *(cookies or ())],
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers=merged,
            is_head_response=is_head_response,
            iterator=self.iterator,  # type: ignore[arg-type]
            media_type="text/event-stream",
            status_code=self.status_code or status_code,
        )
        response.write_timeout = self.write_timeout
        response.sink = self.sink
        response.counts = connections
        response.draining = state.get("draining")
        response.retry_ms = services.settings.server.retry_ms if services is not None else 3000
        return response


def log_stream(
    services: Services,
    after: int | None,
    event_filter: EventFilter,
    *,
    build: FrameBuilder,
    stop: Callable[[LogEntry], bool] | None = None,
    headers: dict[str, str] | None = None,
) -> EventStreamResponse:
    """The SSE response of a stream of the log (see :func:`event_stream`), as the
    settings shape it: heartbeats, the retry hint, the write timeout."""
    settings = services.settings.server
    # A stream that looks at its entries (a stop) is written by its own task alone.
    sink = FanoutSink(event_filter, build) if settings.fanout and stop is None else None
    return EventStreamResponse(
        event_stream(
            services.store,
            after,
            event_filter,
            build=build,
            heartbeat_seconds=settings.heartbeat_seconds,
            retry_ms=settings.retry_ms,
            stop=stop,
            sink=None if sink is None else sink.if_bound,
        ),
        write_timeout=settings.write_timeout_seconds,
        headers=headers,
        sink=sink,
    )
