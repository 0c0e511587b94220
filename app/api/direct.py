"""The two append endpoints answered straight from ASGI, in front of the router.

``POST /agents/{source_id}/events`` and ``POST /agents/events`` carry every agent's reports:
they are the service's hottest routes. Through the router, a single append spent more CPU in
Litestar's routing, dependency resolution, signature model and response objects than in the
durable append itself. :class:`DirectAppends` answers these requests with the same structs,
the same checks (:func:`~app.api.agents.prepare_event`, :func:`~app.api.agents.prepare_batch`)
and the same bodies as the routed handlers, and takes only the requests it can answer exactly
as they would. Everything else goes on to the router untouched, with the body it already read
handed on: a body that does not decode or fails a check, a token the route would refuse, a
cross-origin request, another content type, a body over the limit. So every refusal before
the append is the router's own, and the log's refusals after it (409, 503) are rendered by
the same function as the router's exception handlers (:func:`~app.api.errors.append_refusal`).

It sits inside the request-id wrapper, so these responses carry ``X-Request-ID`` and an
access-log line like every other.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
from litestar import Litestar
from litestar.exceptions import ClientException
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from app.agents.reports import AgentEventIn, AgentEventsIn, InvalidReport
from app.api.agents import appended, batch_appended, prepare_batch, prepare_event
from app.api.errors import append_refusal, error_body
from app.api.security import AccessPolicy
from app.config import Settings
from app.eventlog import EventIdReused, LogUnavailable, NewEvent, VersionConflict
from app.runtime.services import Services

__all__ = ["DirectAppends"]

logger = logging.getLogger(__name__)

_PREFIX = "/agents/"
_SUFFIX = "/events"
_BATCH_PATH = "/agents/events"

_single = msgspec.json.Decoder(AgentEventIn)
_batch = msgspec.json.Decoder(AgentEventsIn)
_encode = msgspec.json.Encoder().encode


class _NotMine(Exception):
    """The router answers this request."""


class DirectAppends:
    """ASGI wrapper around the router: answers the append endpoints it can, passes the rest."""

    def __init__(
        self, app: Litestar, router: ASGIApp, settings: Settings, policy: AccessPolicy
    ) -> None:
        self._app = app
        self._router = router
        self._policy = policy
        self._cors = bool(settings.security.cors_origins)
        self._max_body = settings.limits.max_body_bytes
        self._max_payload = settings.limits.max_payload_bytes
        #: Append requests answered here, and those handed on to the router.
        self.answered = 0
        self.handed_on = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) == "http" and scope.get("method") == "POST":
            path: str = scope["path"]
            if path == _BATCH_PATH:
                source_id = None
            elif path.startswith(_PREFIX) and path.endswith(_SUFFIX):
                source_id = path[len(_PREFIX) : -len(_SUFFIX)]
                if not source_id or "/" in source_id:
                    source_id = ""
            else:
                source_id = ""
            if source_id != "" and self._takes(scope):
                received: list[ReceiveMessage] = []
                try:
                    await self._answer(source_id, receive, received, send)
                    self.answered += 1
                    return
                except _NotMine:
                    receive = _replaying(received, receive)
            if source_id != "":
                self.handed_on += 1
        await self._router(scope, receive, send)

    def _takes(self, scope: Scope) -> bool:
        """Headers the routed handler would treat just as this one does."""
        json = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                json = value.partition(b";")[0].strip().lower() == b"application/json"
            elif name == b"content-length":
                if not value.isdigit() or int(value) > self._max_body:
                    return False
            elif name == b"origin" and (
                # A page's request: the router adds the CORS headers, and refuses the pages
                # that may not write.
                self._cors or self._policy.write_refusal(scope) is not None
            ):
                return False
        return json and self._policy.permits(scope, "write")

    async def _answer(
        self, source_id: str | None, receive: Receive, received: list[ReceiveMessage], send: Send
    ) -> None:
        services: Services | None = getattr(self._app.state, "services", None)
        if services is None:
            raise _NotMine
        body = await self._read_body(receive, received)
        batch: list[NewEvent]
        try:
            if source_id is None:
                batch = prepare_batch(_batch.decode(body), self._max_payload)
            else:
                batch = [prepare_event(source_id, _single.decode(body), self._max_payload)]
        except (msgspec.DecodeError, RecursionError, InvalidReport, ClientException):
            # Refused before the append: the router refuses it in its own words.
            raise _NotMine from None
        try:
            results = await services.store.append(batch)
        except (VersionConflict, EventIdReused, LogUnavailable) as exc:
            status, detail, extra, headers = append_refusal(exc)
            await _respond(send, status, _encode(error_body(status, detail, extra)), headers)
            return
        except Exception:
            logger.exception("append failed")
            await _respond(send, 500, _encode(error_body(500, "Internal Server Error")), {})
            return
        response = batch_appended(results) if source_id is None else appended(results[0])
        await _respond(send, 201, _encode(response), {})

    async def _read_body(self, receive: Receive, received: list[ReceiveMessage]) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                raise _NotMine  # the client left: the router sees it as it would have
            chunk: bytes = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body:
                raise _NotMine  # the router answers 413
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replaying(
    received: list[ReceiveMessage], receive: Receive
) -> Callable[[], Awaitable[ReceiveMessage]]:
    """``receive`` that first gives back the messages already taken from the client."""
    pending = deque(received)

    async def replay() -> ReceiveMessage:
        if pending:
            return pending.popleft()
        return await receive()

    return replay


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
