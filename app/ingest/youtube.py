"""YouTube transcripts (youtube-transcript-api) and video metadata (oEmbed).

The library is blocking and sets no timeouts of its own, so every call runs in a thread, on a
session that puts a timeout on each request, under an overall timeout per attempt. Its
exceptions become :class:`IngestFailure` through the table in :mod:`app.ingest.failures`; the
retryable ones (blocked, failed request, timeout) are retried by its retry policy.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import requests
from youtube_transcript_api import Transcript as TranscriptTrack
from youtube_transcript_api import YouTubeTranscriptApi

from app.config import IngestSettings
from app.ingest.failures import describe_failure, with_retries
from app.ingest.model import IngestFailure, RetryNotice, Snippet

__all__ = [
    "Transcript",
    "VideoMeta",
    "build_session",
    "fetch_metadata",
    "fetch_transcript",
]

OEMBED_URL = "https://www.youtube.com/oembed"
WATCH_URL = "https://www.youtube.com/watch?v={video_id}"

# YouTube serves a trimmed or bot-check page to clients that do not look like a browser.
USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
ACCEPT_LANGUAGE = "en-US,en;q=0.9"

_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{11}")


class Transcript(msgspec.Struct, frozen=True):
    video_id: str
    language: str
    language_code: str
    is_generated: bool
    snippets: list[Snippet]

    @property
    def text(self) -> str:
        """The spoken text as one paragraph: captions break lines for the screen, not for
        meaning, so line breaks and runs of spaces inside and between snippets become one
        space."""
        return " ".join(
            words for snippet in self.snippets if (words := " ".join(snippet.text.split()))
        )


class VideoMeta(msgspec.Struct, frozen=True):
    title: str | None = None
    author_name: str | None = None
    author_url: str | None = None
    thumbnail_url: str | None = None


class _YouTubeSession(requests.Session):
    """A session whose requests always have a timeout and, when one is configured, go through
    the configured proxy."""

    def __init__(self, timeout: float, proxies: dict[str, str]) -> None:
        super().__init__()
        self.timeout = timeout
        self.forced_proxies = proxies
        self.proxies.update(proxies)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        # youtube-transcript-api calls get()/post() without a timeout; without one a stalled
        # YouTube connection would hold a worker thread forever.
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if self.forced_proxies:
            # requests lets HTTP(S)_PROXY from the environment win over Session.proxies;
            # YOUTUBE_PROXY_URL is the more specific setting, so it wins here.
            kwargs["proxies"] = dict(self.forced_proxies)
        return super().send(request, **kwargs)


def build_session(settings: IngestSettings) -> requests.Session:
    """A :class:`requests.Session` for YouTube: per-request timeouts, the optional proxy, and
    browser-like headers."""
    proxy = settings.youtube_proxy_url
    proxies = {"http": proxy, "https": proxy} if proxy else {}
    session = _YouTubeSession(settings.http_timeout_seconds, proxies)
    session.headers.update({"User-Agent": USER_AGENT, "Accept-Language": ACCEPT_LANGUAGE})
    return session


async def fetch_metadata(
    video_id: str, settings: IngestSettings, *, session: requests.Session | None = None
) -> VideoMeta:
    """Title, channel and thumbnail from YouTube's oEmbed endpoint; ``VideoMeta()`` when that
    fails in any way (metadata is optional: private, embed-disabled or missing videos answer
    401/404)."""

    def fetch() -> VideoMeta:
        client = session if session is not None else build_session(settings)
        try:
            response = client.get(
                OEMBED_URL,
                params={"url": WATCH_URL.format(video_id=video_id), "format": "json"},
            )
            response.raise_for_status()
            return msgspec.json.decode(response.content, type=VideoMeta)
        finally:
            if session is None:
                client.close()

    try:
        # The per-request timeout bounds each read, not a trickling response as a whole.
        return await asyncio.wait_for(
            asyncio.to_thread(fetch), timeout=settings.http_timeout_seconds * 2
        )
    except Exception:
        return VideoMeta()


async def fetch_transcript(
    video_id: str,
    settings: IngestSettings,
    *,
    on_retry: RetryNotice | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Transcript:
    """Fetch the preferred transcript of ``video_id``.

    Preference: the first of ``settings.transcript_languages`` that has a track, a manual
    track before an auto-generated one; then any manual track; then any generated one.
    Raises :class:`IngestFailure`: permanent kinds at once, retryable kinds after
    ``settings.retry_attempts`` attempts in total.
    """
    if not _VIDEO_ID.fullmatch(video_id):
        raise IngestFailure(
            "invalid_video_id",
            f"{video_id!r} is not a YouTube video id "
            "(11 characters: letters, digits, '-' and '_').",
            retryable=False,
            details={"video_id": video_id},
        )
    return await with_retries(
        lambda: _fetch_once(video_id, settings, session),
        settings,
        on_retry=on_retry,
        sleep=sleep,
    )


async def _fetch_once(
    video_id: str, settings: IngestSettings, session: requests.Session | None
) -> Transcript:
    timeout = settings.transcript_timeout_seconds
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_fetch_blocking, video_id, settings, session), timeout=timeout
        )
    except TimeoutError as exc:
        # The thread cannot be stopped; it ends on its own within the per-request timeouts.
        raise describe_failure(
            exc, "video", settings, {"video_id": video_id}, timeout_seconds=timeout
        ) from None


def _fetch_blocking(
    video_id: str, settings: IngestSettings, session: requests.Session | None
) -> Transcript:
    # A fresh session per attempt: the library mutates it (headers, consent cookie) and is not
    # thread-safe, and a retry after a block should not carry the blocked session's cookies.
    client = session if session is not None else build_session(settings)
    try:
        try:
            tracks = list(YouTubeTranscriptApi(http_client=client).list(video_id))
        except Exception as exc:
            raise describe_failure(exc, "video", settings, {"video_id": video_id}) from exc
        track = _choose_track(tracks, settings.transcript_languages)
        if track is None:
            raise IngestFailure(
                "no_transcript",
                "This video has no transcript in any language.",
                retryable=False,
                details={"video_id": video_id},
            )
        try:
            fetched = track.fetch()
        except Exception as exc:
            raise describe_failure(exc, "video", settings, {"video_id": video_id}) from exc
    finally:
        if session is None:
            client.close()
    return Transcript(
        video_id=video_id,
        language=fetched.language,
        language_code=fetched.language_code,
        is_generated=fetched.is_generated,
        snippets=[
            Snippet(text=item.text, start=item.start, duration=item.duration)
            for item in fetched.snippets
        ],
    )


def _choose_track(
    tracks: list[TranscriptTrack], languages: tuple[str, ...]
) -> TranscriptTrack | None:
    manual = [track for track in tracks if not track.is_generated]
    generated = [track for track in tracks if track.is_generated]
    for wanted in languages:
        for group in (manual, generated):
            exact = [t for t in group if t.language_code.lower() == wanted.lower()]
            # "en" also accepts "en-GB": many manual tracks carry a regional code.
            regional = [
                t for t in group if t.language_code.lower().startswith(wanted.lower() + "-")
            ]
            if exact or regional:
                return (exact or regional)[0]
    if manual:
        return manual[0]
    return generated[0] if generated else None
