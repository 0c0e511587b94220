"""Connections that cannot exhaust the server: a deadline for the request head, an idle
keep-alive timeout, and a ceiling on open connections below the descriptor limit.

uvicorn (the default server) holds a connection that never completes a request for ever: a
client that opens sockets and sends nothing takes the process to its descriptor limit, and
then nothing, ``/health`` included, can connect. :class:`GuardedHttpToolsProtocol` is its
HTTP/1.1 protocol with three bounds added, shared by the connections of one process through
a :class:`ConnectionGuard`:

- A connection waiting for a request head (its first, or the next on a keep-alive
  connection) is closed if the whole head has not arrived within ``header_timeout``
  seconds. A connection that is idle after a response is closed after uvicorn's keep-alive
  timeout (``KEEPALIVE_TIMEOUT_SECONDS``), which is the shorter of the two.
- At most ``max_connections`` are open. A connection beyond that closes the one that has
  waited longest for a request head (the slowest of those sending nothing useful), so a
  client that is about to ask something, a load balancer's ``/health`` included, gets in
  while an attacker holds the maximum. If every connection is being answered (streams,
  requests in flight), the new one is answered ``503`` with ``Retry-After`` and closed.
- A response that the application gives up on (an SSE subscriber that stopped reading) can
  abort its connection at once through the ``activity.connection`` scope extension
  (``abort``), instead of leaving unsent bytes for a peer that will never read them; the
  extension's ``guard`` gives ``/metrics`` the counts, and its ``chunks`` a writer of the
  response's body straight to the connection (:mod:`app.server.chunks`).

Granian, the alternative server, takes the header timeout (``header_read_timeout``); the
ceiling and the keep-alive timeout are this module's, under uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings
from app.server import CONNECTION_EXTENSION
from app.server.chunks import ChunkWriter

__all__ = [
    "CONNECTION_EXTENSION",
    "ConnectionGuard",
    "GuardedHttpToolsProtocol",
    "connection_ceiling",
    "uvicorn_options",
]

logger = logging.getLogger(__name__)


#: Descriptors kept back from connections: the event log and its writer, the content
#: store's files, the database pool, log files.
_RESERVED_DESCRIPTORS = 256

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_REFUSAL_BODY = (
    b'{"status_code":503,"detail":"this instance has its limit of open connections '
    b'(MAX_CONNECTIONS) and every one is being answered; retry shortly","extra":{}}'
)


def connection_ceiling(requested: int | None) -> int:
    """The most connections one process may hold: ``requested`` (``MAX_CONNECTIONS``), or
    by default all the descriptors the process may open but a reserve. The soft descriptor
    limit is raised to the hard one first. Raises ValueError if ``requested`` leaves no
    reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    available = soft - _RESERVED_DESCRIPTORS
    if requested is None:
        return max(1, available)
    if requested > available:
        raise ValueError(
            f"MAX_CONNECTIONS is {requested}, but this process may open {soft} descriptors "
            f"and keeps {_RESERVED_DESCRIPTORS} for its own files: at most {available} "
            "(raise the limit with ulimit -n, or lower MAX_CONNECTIONS)"
        )
    return requested


class ConnectionGuard:
    """The open connections of one server, against its ceiling and deadlines (each worker
    process has its own copy)."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: Connections waiting for a request head, oldest first (a dict keeps that order).
        self._waiting: dict[GuardedHttpToolsProtocol, None] = {}
        self.open = 0
        #: Connections closed for a head that did not arrive in time, to make room for a
        #: newer one, and refused because every open one was being answered.
        self.timed_out = 0
        self.evicted = 0
        self.refused = 0

    def admit(self, connection: GuardedHttpToolsProtocol) -> bool:
        """Count a new connection in; False if it must be refused (nothing to make room)."""
        if self.open >= self.max_connections:
            if not self._waiting:
                self.refused += 1
                return False
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self.evicted += 1
            oldest.drop()
        self.open += 1
        return True

    def __getstate__(self) -> dict[str, Any]:
        # Crosses to worker processes before any connection: the bounds alone.
        return {**self.__dict__, "_waiting": {}}

    def wait_for_head(self, connection: GuardedHttpToolsProtocol) -> None:
        self._waiting[connection] = None

    def head_arrived(self, connection: GuardedHttpToolsProtocol) -> None:
        self._waiting.pop(connection, None)

    def closed(self, connection: GuardedHttpToolsProtocol, admitted: bool) -> None:
        self._waiting.pop(connection, None)
        if admitted:
            self.open -= 1


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module's docstring."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard = guard
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._guard.admit(self):
            transport.write(_REFUSAL % (len(_REFUSAL_BODY), _REFUSAL_BODY))
            transport.close()
            return
        self._admitted = True
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._guard.closed(self, self._admitted)
        self._admitted = False
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {
            CONNECTION_EXTENSION: {
                "abort": self.drop,
                "guard": self._guard,
                "chunks": self.chunk_writer,
            }
        }

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request, unless a pipelined one has started or it closes.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._wait_for_head()

    def chunk_writer(self, scope: Any) -> ChunkWriter | None:
        """Writes the body of the response to ``scope`` straight to this connection (see
        :mod:`app.server.chunks`), if it is the response in progress here."""
        return ChunkWriter.of(self.cycle, scope)

    def drop(self) -> None:
        """Close the connection now, dropping whatever is still unsent."""
        if self.cycle is not None and not self.cycle.response_complete:
            # Now, not when the transport reports the loss: the application may return
            # first, and must not be taken for one that left its response unfinished.
            self.cycle.disconnected = True
        if not self.transport.is_closing():
            self.transport.abort()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self._guard.wait_for_head(self)
        self._head_timer = self.loop.call_later(self._guard.header_timeout, self._head_late)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._guard.head_arrived(self)

    def _head_late(self) -> None:
        self._head_timer = None
        self._guard.timed_out += 1
        self.drop()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The options that give a uvicorn server these bounds (``uvicorn.Config`` keywords).
    Raises ValueError for a ``MAX_CONNECTIONS`` the descriptor limit cannot hold."""
    server = settings.server
    ceiling = connection_ceiling(server.max_connections)
    max_streams = settings.limits.sse_max_connections
    if max_streams >= ceiling:
        # Streams are never closed to make room: at this many, they alone could hold every
        # connection and leave none for a request (or /health).
        logger.warning(
            "SSE_MAX_CONNECTIONS (%d) is not below the connection ceiling (%d): raise the "
            "descriptor limit (ulimit -n) or lower SSE_MAX_CONNECTIONS",
            max_streams,
            ceiling,
        )
    guard = ConnectionGuard(ceiling, server.header_timeout_seconds)
    return {
        "http": functools.partial(GuardedHttpToolsProtocol, guard=guard),
        "timeout_keep_alive": server.keepalive_timeout_seconds,
    }
