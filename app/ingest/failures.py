"""What goes wrong while fetching, as the user reads it, and whether trying again may help.

One table turns the exceptions of the libraries the ingest fetches with (youtube-transcript-api,
requests, httpx, the resolver, asyncio's deadlines) into an :class:`IngestFailure`: a stable
``kind``, whether it is ``retryable``, and a message for each source a failure can come from
(a video's transcript, a channel listing, an article page). The message is a short sentence
for a person; the library's own text, which names hosts, pools and causes, goes to
``details["error"]`` for whoever debugs it. A rule without a message for a source does not
apply to that source, so one exception class can mean different things to different sources.

:func:`with_retries` is the one retry policy: a retryable failure is tried again, up to
``retry_attempts`` attempts in all, waiting ``retry_base_seconds`` doubled after each attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal, TypeVar
from xml.etree.ElementTree import ParseError

import httpx
import requests
from youtube_transcript_api import (
    AgeRestricted,
    CouldNotRetrieveTranscript,
    FailedToCreateConsentCookie,
    InvalidVideoId,
    IpBlocked,
    PoTokenRequired,
    RequestBlocked,
    TranscriptsDisabled,
    VideoUnavailable,
    VideoUnplayable,
    YouTubeDataUnparsable,
    YouTubeRequestFailed,
)

from app.config import IngestSettings
from app.ingest.model import IngestFailure, RetryNotice

__all__ = [
    "Source",
    "describe_failure",
    "proxy_hint",
    "redact",
    "with_retries",
]

#: Where a failure came from: a video's transcript, a channel listing, an article page.
Source = Literal["video", "channel", "article"]

_T = TypeVar("_T")

_HTTP_STATUS: Final = re.compile(r"\b([1-5]\d\d)\b")
# The library's text is for debugging; a page of it would only bloat the log.
_MAX_ERROR_CHARS: Final = 1000

_PROXY_HINT: Final = (
    "YouTube blocks most IP addresses of cloud providers (AWS, Google Cloud, Azure, …); "
    "set YOUTUBE_PROXY_URL to send YouTube requests through a proxy, ideally a residential one."
)
_PROXY_IN_USE_HINT: Final = (
    "YouTube blocks this even through the proxy in YOUTUBE_PROXY_URL; proxies on cloud "
    "provider IP addresses are blocked as well, a rotating residential proxy works best."
)


@dataclasses.dataclass(frozen=True)
class _Rule:
    catches: tuple[type[BaseException], ...]
    kind: str
    retryable: bool
    # What the user reads, per source: a template over the failure's details and fields.
    messages: Mapping[Source, str]
    # Values the message (and, when named in ``adds``, the details) take from the exception.
    fields: Callable[[Any], dict[str, Any]] | None = None
    adds: tuple[str, ...] = ()
    # Whether the library's text joins the details; not where the kind says all there is.
    keeps_error: bool = True


def _unplayable(exc: VideoUnplayable) -> dict[str, Any]:
    reason = exc.reason or "no reason given"
    sub_reasons = [part.strip() for part in exc.sub_reasons if part.strip()]
    why = f"{reason.rstrip('.')}." + "".join(f" {part}" for part in sub_reasons)
    return {"why": why, "reason": exc.reason, "sub_reasons": sub_reasons}


def _answered(exc: YouTubeRequestFailed) -> dict[str, Any]:
    match = _HTTP_STATUS.search(exc.reason)
    status = int(match.group(1)) if match else None
    answer = f"HTTP {status}" if status is not None else "with an error"
    return {"http_status": status, "answer": answer}


_YOUTUBE_UNREACHABLE: Final = "Could not connect to YouTube (network error)."
_YOUTUBE_SLOW: Final = "YouTube did not answer within {timeout_seconds:g} s."
_YOUTUBE_UNREADABLE: Final = "YouTube sent a response that could not be read."

# First match wins: a subclass comes before its base class.
_RULES: Final[tuple[_Rule, ...]] = (
    # youtube-transcript-api: what YouTube says about one video's transcripts.
    _Rule(
        (TranscriptsDisabled,),
        "transcripts_disabled",
        False,
        {"video": "Subtitles are turned off for this video, so it has no transcript."},
        keeps_error=False,
    ),
    _Rule(
        (AgeRestricted,),
        "age_restricted",
        False,
        {
            "video": "This video is age-restricted: YouTube only shows its transcript to "
            "signed-in users."
        },
        keeps_error=False,
    ),
    _Rule(
        (InvalidVideoId,),
        "invalid_video_id",
        False,
        {"video": "{video_id!r} is not a YouTube video id."},
        keeps_error=False,
    ),
    _Rule(
        (VideoUnavailable,),
        "video_unavailable",
        False,
        {"video": "This video is unavailable: it was removed, or never existed."},
        keeps_error=False,
    ),
    _Rule(
        (VideoUnplayable,),
        "video_unplayable",
        False,
        {"video": "YouTube will not play this video: {why}"},
        fields=_unplayable,
        adds=("reason", "sub_reasons"),
        keeps_error=False,
    ),
    _Rule(
        (IpBlocked,),  # a RequestBlocked too
        "ip_blocked",
        True,
        {"video": "YouTube is blocking requests from this server's IP address. {hint}"},
        keeps_error=False,
    ),
    _Rule(
        (RequestBlocked,),
        "request_blocked",
        True,
        {"video": "YouTube refused the request and asked to confirm it is not a bot. {hint}"},
        keeps_error=False,
    ),
    _Rule(
        (FailedToCreateConsentCookie,),
        "request_blocked",
        True,
        {
            "video": "YouTube showed a cookie consent page that could not be accepted "
            "automatically (this happens for EU IP addresses; a proxy elsewhere in "
            "YOUTUBE_PROXY_URL avoids it)."
        },
        keeps_error=False,
    ),
    _Rule(
        (PoTokenRequired,),
        # YouTube assigns this experiment per session; a fresh session may not get it.
        "po_token_required",
        True,
        {
            "video": "YouTube asked for a proof-of-origin token for this transcript, "
            "which this service cannot provide."
        },
        keeps_error=False,
    ),
    _Rule(
        (YouTubeRequestFailed,),
        "request_failed",
        True,
        {"video": "A request to YouTube failed: YouTube answered {answer}."},
        fields=_answered,
        adds=("http_status",),
    ),
    # One request that outlived the per-request timeout (a ConnectTimeout is a connection
    # error too: the timeout says more).
    _Rule(
        (requests.Timeout, httpx.TimeoutException),
        "timeout",
        True,
        {
            "video": _YOUTUBE_SLOW,
            "channel": _YOUTUBE_SLOW,
            "article": "{site} did not answer within {timeout_seconds:g} s.",
        },
        adds=("timeout_seconds",),
    ),
    # A whole attempt that outlived its deadline (asyncio's).
    _Rule(
        (TimeoutError,),
        "timeout",
        True,
        {
            "video": "Fetching the transcript from YouTube took longer than {timeout_seconds:g} s.",
            "channel": "Reading the channel's RSS feed took longer than {timeout_seconds:g} s.",
            "article": "Fetching {url} took longer than {timeout_seconds:g} s.",
        },
        adds=("timeout_seconds",),
        keeps_error=False,
    ),
    _Rule(
        (requests.exceptions.ProxyError,),  # a ConnectionError too
        "request_failed",
        True,
        {
            "video": "Could not connect to YouTube through the proxy in YOUTUBE_PROXY_URL.",
            "channel": "Could not connect to YouTube through the proxy in YOUTUBE_PROXY_URL.",
        },
    ),
    # A peer that hangs up before answering is a connection error to requests; so it is here.
    _Rule(
        (requests.ConnectionError, httpx.NetworkError, httpx.RemoteProtocolError),
        "request_failed",
        True,
        {
            "video": _YOUTUBE_UNREACHABLE,
            "channel": _YOUTUBE_UNREACHABLE,
            "article": "Could not connect to {site} (network error).",
        },
    ),
    # getaddrinfo: no such name, no DNS answer, or a name IDNA cannot encode.
    _Rule(
        (socket.gaierror, UnicodeError),
        "request_failed",
        True,
        {"article": "Could not look up the address of {site}."},
    ),
    # Data in a shape the library cannot read (page, JSON, XML): usually a one-off error page;
    # the built-in kinds only come from inside the library calls.
    _Rule(
        (
            YouTubeDataUnparsable,
            requests.RequestException,
            ParseError,
            KeyError,
            IndexError,
            TypeError,
            AttributeError,
            ValueError,
        ),
        "request_failed",
        True,
        {"video": _YOUTUBE_UNREADABLE, "channel": _YOUTUBE_UNREADABLE},
    ),
    _Rule(
        (httpx.HTTPError,),
        "request_failed",
        True,
        {"article": "{site} sent a response that could not be read."},
    ),
    _Rule(
        (CouldNotRetrieveTranscript,),
        "request_failed",
        True,
        {"video": "Could not fetch the transcript from YouTube."},
    ),
)


def describe_failure(
    exc: BaseException,
    source: Source,
    settings: IngestSettings | None,
    details: Mapping[str, Any],
    **fields: Any,
) -> IngestFailure:
    """The failure the table makes of ``exc``, met while fetching from ``source``.

    ``settings`` give the proxy hint, the proxy URL to redact and the per-request timeout
    (``None`` where none are at hand: an address lookup needs none of them). ``details``
    (``video_id``, ``url``, …) go into the failure and its message; ``fields`` only into the
    message (``site``: the host an article comes from; ``timeout_seconds``: the deadline that
    ran out, when it is not the per-request timeout). An exception the table does not name
    for ``source`` is a bug, and is raised again as it is.
    """
    for rule in _RULES:
        template = rule.messages.get(source)
        if template is None or not isinstance(exc, rule.catches):
            continue
        values: dict[str, Any] = {
            "site": "YouTube",
            "hint": proxy_hint(settings),
            "timeout_seconds": settings.http_timeout_seconds if settings else None,
            **details,
            **fields,
            **(rule.fields(exc) if rule.fields is not None else {}),
        }
        added = {name: values[name] for name in rule.adds if values.get(name) is not None}
        if rule.keeps_error:
            added["error"] = redact(_library_text(exc), settings)
        return IngestFailure(
            rule.kind,
            template.format(**values),
            retryable=rule.retryable,
            details={**details, **added},
        )
    raise exc


def proxy_hint(settings: IngestSettings | None) -> str:
    """What to do about YouTube blocking this server, given whether a proxy is in use."""
    return _PROXY_IN_USE_HINT if settings and settings.youtube_proxy_url else _PROXY_HINT


def redact(text: str, settings: IngestSettings | None) -> str:
    """``text`` without the proxy URL: failure details are stored in the event log, and the
    proxy URL may hold a password."""
    proxy = settings.youtube_proxy_url if settings else None
    return text.replace(proxy, "<YOUTUBE_PROXY_URL>") if proxy else text


def _library_text(exc: BaseException) -> str:
    # youtube-transcript-api wraps its cause in paragraphs of advice: the cause is the news.
    text = exc.cause if isinstance(exc, CouldNotRetrieveTranscript) else str(exc)
    text = " ".join(text.split())
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(described) <= _MAX_ERROR_CHARS:
        return described
    return described[: _MAX_ERROR_CHARS - 1] + "…"


async def with_retries(
    attempt: Callable[[], Awaitable[_T]],
    settings: IngestSettings,
    *,
    on_retry: RetryNotice | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> _T:
    """``await attempt()``, tried again after a retryable :class:`IngestFailure`.

    At most ``settings.retry_attempts`` attempts in all; the n-th wait is
    ``retry_base_seconds * 2 ** (n - 1)``. ``on_retry`` hears of each retry before its wait,
    so the user reads "retrying in N s" while it waits. A permanent failure is raised at once;
    the last retryable one is raised with ``details["attempts"]``.
    """
    attempts = max(1, settings.retry_attempts)
    for number in range(1, attempts + 1):
        try:
            return await attempt()
        except IngestFailure as failure:
            if not failure.retryable:
                raise
            if number == attempts:
                failure.details["attempts"] = attempts
                raise
            delay = settings.retry_base_seconds * 2 ** (number - 1)
            if on_retry is not None:
                await on_retry(number + 1, attempts, delay, failure)
            await sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
