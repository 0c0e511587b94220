"""``ActivityClient``: the service over HTTP, for scripts, agents and the command line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, overload

import httpx
import msgspec

from app.client.agent import AgentActivity, report_activity
from app.client.models import ActivityError, Envelope, Reset, StreamEvent, Truncated
from app.client.streams import RETRYABLE_STATUS, Backoff, error_from, follow_stream

__all__ = ["ActivityClient", "IngestProgress"]

logger = logging.getLogger("app.client")

Filters = Mapping[str, str | Sequence[str] | None]


class _Page(msgspec.Struct):
    events: list[Envelope]
    next_after: int
    head: int | None = None


_page_decoder = msgspec.json.Decoder(_Page)


class ActivityClient:
    """An async client for one service.

    ``stream``, ``ingest`` and ``events`` follow the log; ``agent`` reports an external
    agent's activity. Requests that fail on the network or with 429/5xx are retried with
    backoff (``retry_attempts`` times; streams reconnect for as long as they are read), and
    the service's refusals raise :class:`ActivityError`. Use it as an async context manager,
    or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retry_attempts: int = 8,
        max_delay: float = 15.0,
        idle_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_attempts = retry_attempts
        self.max_delay = max_delay
        self.idle_timeout = idle_timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=self._headers, transport=transport
        )

    async def __aenter__(self) -> ActivityClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plain requests ---------------------------------------------------------------------

    async def request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """One request, retried on network errors and 429/5xx; a 4xx raises ActivityError.

        Retrying a write is safe only when it is idempotent: agent events carry an
        ``event_id``, and ``POST /ingests`` joins the URL's running ingest. Anything else
        passes ``idempotent=False`` and is retried only when it cannot have arrived (the
        connection was refused) or was turned away unprocessed (429, 503).
        """
        backoff = Backoff(0.2, self.max_delay)
        for attempt in range(1, self.retry_attempts + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if not idempotent and not isinstance(
                    exc, (httpx.ConnectError, httpx.ConnectTimeout)
                ):
                    raise ActivityError(
                        f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}; not "
                        "retried, since it may have been carried out"
                    ) from exc
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if response.status_code < 400:
                    return response
                retryable = RETRYABLE_STATUS if idempotent else _REFUSED_UNPROCESSED
                if response.status_code not in retryable:
                    raise error_from(response)
                problem = f"HTTP {response.status_code}"
            if attempt == self.retry_attempts:
                raise ActivityError(
                    f"{method} {self.base_url}{path} failed after {attempt} attempts: {problem}"
                )
            wait = backoff.delay(attempt)
            logger.info("%s %s: %s; retrying in %.1f s", method, path, problem, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def stats(self) -> dict[str, Any]:
        """``GET /stats``."""
        body: dict[str, Any] = (await self.request("GET", "/stats")).json()
        return body

    async def events(
        self, after: int = 0, filters: Filters | None = None, *, until: int | None = None
    ) -> AsyncIterator[Envelope]:
        """Every matching event above ``after`` (and at or below ``until``), page by page,
        up to the log's head when the last page is read."""
        params: dict[str, Any] = {"limit": 1000, **_filter_params(filters, allowed=_LOG_FILTERS)}
        while until is None or after < until:
            params["after"] = after
            page = _page_decoder.decode(
                (await self.request("GET", "/events", params=params)).content
            )
            for envelope in page.events:
                if until is not None and envelope.position > until:
                    return
                yield envelope
            if page.next_after <= after or (page.head is not None and page.next_after >= page.head):
                return
            after = page.next_after

    # -- streams ----------------------------------------------------------------------------

    @overload
    def stream(
        self,
        path_or_filters: str | Filters | None = None,
        last_event_id: int | None = None,
        *,
        report_truncated: Literal[False] = False,
    ) -> AsyncGenerator[StreamEvent | Reset, None]: ...

    @overload
    def stream(
        self,
        path_or_filters: str | Filters | None = None,
        last_event_id: int | None = None,
        *,
        report_truncated: bool,
    ) -> AsyncGenerator[StreamEvent | Reset | Truncated, None]: ...

    def stream(
        self,
        path_or_filters: str | Filters | None = None,
        last_event_id: int | None = None,
        *,
        report_truncated: bool = False,
    ) -> AsyncGenerator[StreamEvent | Reset | Truncated, None]:
        """Follow an SSE endpoint: ``"/events/stream"`` (the default), ``"/agents/stream"``,
        ``"/ingests/{id}/stream"`` (a path may carry its query), or filters for the log
        (``stream``, ``source_id``, ``event``; ``agent_name`` follows ``/agents/stream``).

        Yields a :class:`StreamEvent` per log event, in position order, each once: it
        resumes after a drop, a server restart or a silent connection (no frame for three
        heartbeat periods) with ``Last-Event-ID``, waiting the server's ``retry`` and backing
        off with jitter while the server is unreachable or answering 5xx. Heartbeats are not
        yielded. When the server says the resume point is past its log's head, a
        :class:`Reset` is yielded and the stream goes on from that head. Ends when the server
        answers 204 (an ingest stream resumed after its ``complete``); raises
        :class:`ActivityError` on any other refusal (400, 401, 404). Events the server's
        retention removed from where the stream reads are named in a warning logged, or,
        given ``report_truncated``, by a :class:`Truncated` yielded before the events that
        follow them.
        """
        path, params = _stream_target(path_or_filters)
        return follow_stream(
            self._http,
            path,
            params,
            last_event_id=last_event_id,
            headers=self._headers,
            max_delay=self.max_delay,
            idle_timeout=self.idle_timeout,
            report_truncated=report_truncated,
        )

    # -- ingests ----------------------------------------------------------------------------

    async def start_ingest(self, url: str, channel_limit: str = "all") -> dict[str, Any]:
        """``POST /ingests``: ``{"ingest_id", "status", "stream_url", "created"}``."""
        response = await self.request(
            "POST", "/ingests", json={"url": url, "channel_limit": channel_limit}
        )
        body: dict[str, Any] = response.json()
        return body

    def ingest(self, url: str, channel_limit: str = "all") -> IngestProgress:
        """Start (or join) an ingest of ``url`` and yield its events until ``complete``,
        resuming ``/ingests/{id}/stream`` across drops. The returned iterator's
        ``ingest_id`` is set once the ingest is started, ``result`` once it completes."""
        return IngestProgress(self, url, channel_limit)

    async def start_run(self, agents: Sequence[str], scope: str | Sequence[str]) -> dict[str, Any]:
        """``POST /agents/runs``: a coordinator run of ``agents`` over ``scope``."""
        body = {"agents": list(agents), "scope": scope if isinstance(scope, str) else list(scope)}
        response = await self.request("POST", "/agents/runs", json=body, idempotent=False)
        found: dict[str, Any] = response.json()
        return found

    # -- agents -----------------------------------------------------------------------------

    def agent(
        self,
        agent_name: str,
        source_id: str | None = None,
        *,
        heartbeat_seconds: float = 15.0,
        message: str = "Started",
    ) -> AbstractAsyncContextManager[AgentActivity]:
        """Report an external agent's activity while the block runs::

            async with client.agent("tagger") as activity:
                await activity.progress(0.5, "Processing video 5/10")
                activity.result = {"tags": 12}

        sends ``started``, a ``heartbeat`` every ``heartbeat_seconds`` in the background,
        then ``complete`` (with ``activity.result``), or ``failed`` with the exception's
        message if the block raises (the exception propagates). Every event carries an
        ``event_id`` made here, so a post retried after a lost response is written once.
        """
        return report_activity(self, agent_name, source_id, heartbeat_seconds, message)


class IngestProgress:
    """The events of one ingest, from its start to its ``complete`` (an async iterator)."""

    def __init__(self, client: ActivityClient, url: str, channel_limit: str) -> None:
        self._client = client
        self._url = url
        self._channel_limit = channel_limit
        self.ingest_id: str | None = None
        self.created: bool | None = None
        #: The ``complete`` payload: ``{"type", "status", "message", "details"}``.
        self.result: dict[str, Any] | None = None

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[StreamEvent]:
        accepted = await self._client.start_ingest(self._url, self._channel_limit)
        self.ingest_id = accepted["ingest_id"]
        self.created = accepted.get("created")
        async for item in self._client.stream(accepted["stream_url"]):
            if isinstance(item, Reset):
                continue
            yield item
            if item.event == "complete":
                self.result = item.payload
                return


_LOG_FILTERS = ("stream", "source_id", "event")
_REFUSED_UNPROCESSED = frozenset({429, 503})


def _filter_params(filters: Filters | None, *, allowed: Sequence[str]) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, value in (filters or {}).items():
        if value is None or not value:
            continue
        if name not in allowed:
            raise ValueError(f"unknown filter {name!r}; known: {', '.join(allowed)}")
        params[name] = [value] if isinstance(value, str) else list(value)
    return params


def _stream_target(target: str | Filters | None) -> tuple[str, dict[str, list[str]] | None]:
    if isinstance(target, str):
        return target, None
    params = _filter_params(target, allowed=(*_LOG_FILTERS, "agent_name"))
    if "agent_name" not in params:
        return "/events/stream", params
    # Only /agents/stream filters on the payload's agent_name; it carries the agent stream.
    if params.pop("stream", ["agent"]) != ["agent"]:
        raise ValueError("agent_name filters the agent stream only")
    if "event" in params:
        raise ValueError("agent_name cannot be combined with an event filter")
    return "/agents/stream", params
