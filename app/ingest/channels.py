"""List a YouTube channel's videos: yt-dlp's flat extraction of the ``/videos`` tab, with the
channel's RSS feed as the fallback.

yt-dlp reads the tab page's ``ytInitialData`` (and follows its continuations) without an API
key. Its entries come out lazily, newest first, so a count limit or a date window stops the
listing (and the continuation requests) as soon as the answer is known; that is why the
entries are consumed here rather than cut by yt-dlp's ``playlistend``. When yt-dlp fails
(YouTube changes its pages often), times out or lists nothing, the Atom feed
``/feeds/videos.xml?channel_id=UC…`` is read instead; it holds only the newest 15 uploads.
The channel id it needs comes from a ``/channel/UC…`` URL or from the channel page's canonical
link or metadata.

Upload dates, which ``month`` (30 days) and ``year`` (365 days) before ``today`` go by:

* yt-dlp's flat entries carry no upload date, only YouTube's relative text ("3 weeks ago"),
  which yt-dlp turns into a timestamp counted back from the moment of extraction
  (``approximate_date``). That is an *age*, and ages are counted back from ``today``: the video
  was published ``today - age``. The dates are as coarse as the text ("2 months ago").
* An entry with an absolute ``upload_date`` uses it as is.
* When not one listed entry has a date, the dates come from the RSS feed, by video id.
* Newest first means an undated entry listed before a dated entry inside the window is inside
  it too; undated entries after the last dated one inside the window are left out.

``50``/``100`` keep the first N as listed; ``all`` keeps everything. Upcoming premieres are
left out: they have nothing to transcribe yet.

All HTTP (yt-dlp's and the feed's) goes through ``requests`` with the configured proxy and
timeouts, in a worker thread. A listing that outlives ``channel_timeout_seconds`` is abandoned
(the thread ends on its own, bounded by the socket timeouts). A listing that fails in a
retryable way (YouTube unreachable, slow or blocking) is tried again, yt-dlp first, by the
retry policy of :mod:`app.ingest.failures`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import re
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Literal
from urllib.parse import quote, unquote, urlsplit

import msgspec
import requests
import yt_dlp

from app.config import IngestSettings
from app.ingest.failures import describe_failure, proxy_hint, with_retries
from app.ingest.model import ChannelLimit, IngestFailure, Progress, RetryNotice

__all__ = [
    "ChannelListing",
    "ChannelVideo",
    "channel_feed_url",
    "list_channel",
]

logger = logging.getLogger(__name__)

_YOUTUBE_HOSTS: Final = frozenset(
    {"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com"}
)
_CHANNEL_ID: Final = re.compile(r"UC[A-Za-z0-9_-]{22}")
_VIDEO_ID: Final = re.compile(r"[A-Za-z0-9_-]{11}")
_WINDOW_DAYS: Final[Mapping[str, int]] = {"month": 30, "year": 365}
_COUNTS: Final[Mapping[str, int]] = {"50": 50, "100": 100}
# Where a channel page names its own id, most specific first ("channelId" also names others).
_PAGE_CHANNEL_ID: Final = (
    re.compile(
        r"""<link[^>]+rel=["']canonical["'][^>]+href=["']https?://(?:www\.|m\.)?youtube\.com/"""
        r"""channel/(UC[A-Za-z0-9_-]{22})"""
    ),
    re.compile(
        r"""<link[^>]+href=["']https?://(?:www\.|m\.)?youtube\.com/channel/"""
        r"""(UC[A-Za-z0-9_-]{22})["'][^>]+rel=["']canonical["']"""
    ),
    re.compile(
        r"""<meta[^>]+itemprop=["'](?:identifier|channelId)["'][^>]+content=["'](UC[\w-]{22})"""
    ),
    re.compile(r'"externalId"\s*:\s*"(UC[A-Za-z0-9_-]{22})"'),
    re.compile(r'"channelId"\s*:\s*"(UC[A-Za-z0-9_-]{22})"'),
)
_ATOM: Final = {
    "atom": "http://www.w3.org/2005/Atom",
    "yt": "http://www.youtube.com/xml/schemas/2015",
}
_HEADERS: Final = {
    "User-Agent": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36"
    ),
    "Accept-Language": "en-US,en;q=0.9",
}


class ChannelVideo(msgspec.Struct, frozen=True):
    video_id: str
    url: str  # https://www.youtube.com/watch?v=ID
    title: str | None = None
    published: str | None = None  # ISO date YYYY-MM-DD when known
    duration_seconds: float | None = None


class ChannelListing(msgspec.Struct, frozen=True):
    channel_id: str  # UC...
    channel_name: str
    channel_url: str
    videos: list[ChannelVideo]
    source: Literal["yt-dlp", "rss"]
    # Why the RSS feed was used (or supplied the dates), for the ingest's progress messages.
    fallback_reason: str | None = None


def channel_feed_url(channel_id: str) -> str:
    return f"https://www.youtube.com/feeds/videos.xml?channel_id={channel_id}"


@dataclasses.dataclass(frozen=True)
class _Target:
    """A channel as the URL names it: ``@handle``, ``channel/UC…``, ``c/name`` or ``user/name``."""

    path: str
    channel_id: str | None

    @property
    def page_url(self) -> str:
        return f"https://www.youtube.com/{quote(self.path, safe='/@')}"

    @property
    def videos_url(self) -> str:
        return f"{self.page_url}/videos"


@dataclasses.dataclass(frozen=True)
class _Video:
    video_id: str
    title: str | None
    published: datetime.date | None
    duration_seconds: float | None


@dataclasses.dataclass(frozen=True)
class _Draft:
    channel_id: str | None
    channel_name: str | None
    videos: list[_Video]


async def list_channel(
    url: str,
    limit: ChannelLimit,
    settings: IngestSettings,
    *,
    today: datetime.date | None = None,
    progress: Progress | None = None,
    on_retry: RetryNotice | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ChannelListing:
    """List the videos of the channel at ``url``, newest first, as ``limit`` says.

    ``today`` (default: the UTC date) anchors the ``month``/``year`` windows. Raises
    :class:`IngestFailure`: ``unsupported_url``, ``channel_not_found`` (permanent);
    ``blocked``, ``request_failed`` and ``timeout`` (retryable) after
    ``settings.retry_attempts`` attempts in all. A channel without videos is not an error.
    """
    target = _parse_channel_url(url)
    day = today or datetime.datetime.now(datetime.UTC).date()
    return await with_retries(
        lambda: _list_once(target, limit, settings, day, progress),
        settings,
        on_retry=on_retry,
        sleep=sleep,
    )


async def _list_once(
    target: _Target,
    limit: ChannelLimit,
    settings: IngestSettings,
    today: datetime.date,
    progress: Progress | None,
) -> ChannelListing:
    deadline = settings.channel_timeout_seconds

    draft: _Draft | None = None
    ytdlp_error: str | None
    try:
        draft = await asyncio.wait_for(
            asyncio.to_thread(_list_with_ytdlp, target, limit, settings, today), deadline
        )
    except TimeoutError:
        ytdlp_error = f"yt-dlp took longer than {deadline:g} s"
    except Exception as exc:  # yt-dlp breaks in many ways when YouTube changes: use the feed
        ytdlp_error = f"yt-dlp failed: {_describe(exc)}"
    else:
        ytdlp_error = None if draft.videos else "yt-dlp listed no videos"
    if ytdlp_error is not None:
        logger.info("channel %s: %s; reading the RSS feed", target.page_url, ytdlp_error)

    if draft is not None and draft.videos:
        if limit not in _WINDOW_DAYS or any(video.published for video in draft.videos):
            return _listing(target, draft, limit, today, "yt-dlp", None)
        reason = "yt-dlp gave no upload dates; dates from the RSS feed"
        if progress is not None:
            await progress("listing_videos", f"{reason}...", {"fallback": "rss"})
        dated = await _dated_from_feed(target, draft, settings, deadline)
        return _listing(target, dated, limit, today, "yt-dlp", reason)

    if progress is not None:
        await progress(
            "listing_videos",
            f"{ytdlp_error}; reading the channel's RSS feed...",
            {"fallback": "rss"},
        )
    try:
        known_id = (draft.channel_id if draft else None) or target.channel_id
        feed = await _read_feed_with_deadline(target, known_id, settings, deadline)
    except IngestFailure as failure:
        if draft is not None and draft.channel_id:
            # yt-dlp read the channel and found it empty; the feed could only have confirmed it.
            return _listing(target, draft, limit, today, "yt-dlp", None)
        failure.details.setdefault("yt_dlp_error", ytdlp_error)
        raise
    return _listing(target, feed, limit, today, "rss", ytdlp_error)


async def _dated_from_feed(
    target: _Target, draft: _Draft, settings: IngestSettings, deadline: float
) -> _Draft:
    feed = await _read_feed_with_deadline(
        target, draft.channel_id or target.channel_id, settings, deadline
    )
    dates = {video.video_id: video.published for video in feed.videos}
    return dataclasses.replace(
        draft,
        channel_id=draft.channel_id or feed.channel_id,
        videos=[
            dataclasses.replace(video, published=dates.get(video.video_id))
            for video in draft.videos
        ],
    )


def _parse_channel_url(url: str) -> _Target:
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        failure = _unsupported(url, "it cannot be parsed")
        failure.details["error"] = f"{type(exc).__name__}: {exc}"
        raise failure from None
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme.lower() not in ("http", "https") or host not in _YOUTUBE_HOSTS:
        raise _unsupported(url, "not a youtube.com address")
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    if segments and segments[0].startswith("@") and len(segments[0]) > 1:
        return _Target(segments[0], None)
    if len(segments) >= 2 and segments[0].lower() == "channel":
        if not _CHANNEL_ID.fullmatch(segments[1]):
            raise _unsupported(url, f"{segments[1]!r} is not a channel id (UC…)")
        return _Target(f"channel/{segments[1]}", segments[1])
    if len(segments) >= 2 and segments[0].lower() in ("c", "user"):
        return _Target(f"{segments[0].lower()}/{segments[1]}", None)
    raise _unsupported(url, "expected /@handle, /channel/UC…, /c/name or /user/name")


def _unsupported(url: str, why: str) -> IngestFailure:
    return IngestFailure(
        "unsupported_url",
        f"{url!r} is not a YouTube channel URL ({why}).",
        retryable=False,
        details={"url": url},
    )


# --- yt-dlp ---------------------------------------------------------------------------------


class _YtDlpLog:
    """yt-dlp's logger interface, into ours (it would print to stdout otherwise)."""

    def debug(self, message: str) -> None:
        logger.debug("yt-dlp: %s", message)

    def info(self, message: str) -> None:
        logger.debug("yt-dlp: %s", message)

    def warning(self, message: str) -> None:
        logger.info("yt-dlp: %s", message)

    def error(self, message: str) -> None:
        logger.info("yt-dlp: %s", message)


def _list_with_ytdlp(
    target: _Target, limit: ChannelLimit, settings: IngestSettings, today: datetime.date
) -> _Draft:
    params: dict[str, Any] = {
        "skip_download": True,
        "quiet": True,
        "noprogress": True,
        "logger": _YtDlpLog(),
        "cachedir": False,
        "socket_timeout": settings.http_timeout_seconds,
        # One retry for a flaky page: the RSS fallback and the job's own retries come after.
        "extractor_retries": 1,
        "extractor_args": {"youtubetab": {"approximate_date": [""]}},
    }
    if settings.youtube_proxy_url:
        params["proxy"] = settings.youtube_proxy_url
    with yt_dlp.YoutubeDL(params) as ydl:
        # process=False: the tab's flat entries as the extractor yields them, lazily.
        info = ydl.extract_info(target.videos_url, download=False, process=False)
        for _ in range(3):  # a channel may answer with a redirect to its regional twin
            if not isinstance(info, dict) or info.get("_type") not in ("url", "url_transparent"):
                break
            info = ydl.extract_info(info["url"], download=False, process=False)
        if not isinstance(info, dict) or info.get("_type") != "playlist":
            raise ValueError(f"{target.videos_url} is not a list of videos")
        channel_id = _valid_channel_id(info.get("channel_id")) or target.channel_id
        name = info.get("channel") or info.get("uploader")
        videos: list[_Video] = []
        seen: set[str] = set()
        # Iterating the entries is what downloads them: stop as soon as the limit is met.
        for entry in info.get("entries") or ():
            video = _video_from_entry(entry, today)
            if video is None or video.video_id in seen:
                continue
            seen.add(video.video_id)
            if _past_limit(videos, video, limit, today):
                break
            videos.append(video)
    return _Draft(channel_id=channel_id, channel_name=name, videos=videos)


def _video_from_entry(entry: Any, today: datetime.date) -> _Video | None:
    if not isinstance(entry, dict) or entry.get("ie_key") != "Youtube":
        return None  # playlists, channels: not videos
    video_id = entry.get("id")
    if not isinstance(video_id, str) or not _VIDEO_ID.fullmatch(video_id):
        return None
    if entry.get("live_status") == "is_upcoming":
        return None
    duration = entry.get("duration")
    title = entry.get("title")
    return _Video(
        video_id=video_id,
        title=title if isinstance(title, str) and title else None,
        published=_entry_date(entry, today),
        duration_seconds=float(duration) if isinstance(duration, int | float) else None,
    )


def _entry_date(entry: Mapping[str, Any], today: datetime.date) -> datetime.date | None:
    upload_date = entry.get("upload_date")
    if isinstance(upload_date, str) and len(upload_date) == 8 and upload_date.isdigit():
        try:
            return datetime.date(int(upload_date[:4]), int(upload_date[4:6]), int(upload_date[6:]))
        except ValueError:
            pass
    timestamp = entry.get("timestamp")
    if isinstance(timestamp, int | float):
        # An approximate date: an age, counted back from `today` (see the module docstring).
        age_days = max(0, round((time.time() - timestamp) / 86400))
        return today - datetime.timedelta(days=age_days)
    return None


def _past_limit(
    videos: list[_Video], candidate: _Video, limit: ChannelLimit, today: datetime.date
) -> bool:
    if limit in _COUNTS:
        return len(videos) >= _COUNTS[limit]
    if limit in _WINDOW_DAYS:
        cutoff = today - datetime.timedelta(days=_WINDOW_DAYS[limit])
        return candidate.published is not None and candidate.published < cutoff
    return False


def _valid_channel_id(value: object) -> str | None:
    return value if isinstance(value, str) and _CHANNEL_ID.fullmatch(value) else None


def _describe(exc: BaseException) -> str:
    message = str(exc).removeprefix("ERROR: ").strip() or type(exc).__name__
    first_line = message.splitlines()[0]
    return first_line if len(first_line) <= 300 else first_line[:300] + "…"


# --- the RSS feed ---------------------------------------------------------------------------


async def _read_feed_with_deadline(
    target: _Target, channel_id: str | None, settings: IngestSettings, deadline: float
) -> _Draft:
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_read_feed, target, channel_id, settings), deadline
        )
    except TimeoutError as exc:
        raise describe_failure(
            exc, "channel", settings, {"url": target.page_url}, timeout_seconds=deadline
        ) from None


def _read_feed(target: _Target, channel_id: str | None, settings: IngestSettings) -> _Draft:
    with requests.Session() as session:
        session.headers.update(_HEADERS)
        # Without these, EU visitors get a consent page instead of the channel page.
        session.cookies.set("SOCS", "CAI", domain=".youtube.com")
        session.cookies.set("PREF", "hl=en&tz=UTC", domain=".youtube.com")
        if settings.youtube_proxy_url:
            session.proxies = {
                "http": settings.youtube_proxy_url,
                "https": settings.youtube_proxy_url,
            }
        if channel_id is None:
            page = _get(session, target.page_url, settings)
            channel_id = _channel_id_from_page(page.text)
            if channel_id is None:
                raise IngestFailure(
                    "channel_not_found",
                    f"The page {target.page_url} does not say which channel it is.",
                    retryable=False,
                    details={"url": target.page_url},
                )
        feed = _get(session, channel_feed_url(channel_id), settings)
        return _parse_feed(feed.content, channel_id, settings)


def _get(session: requests.Session, url: str, settings: IngestSettings) -> requests.Response:
    timeout = settings.http_timeout_seconds
    try:
        response = session.get(url, timeout=(timeout, timeout))
    except requests.RequestException as exc:
        raise describe_failure(exc, "channel", settings, {"url": url}) from None
    status = response.status_code
    if status < 400:
        return response
    details = {"url": url, "status": status}
    if status in (404, 410):
        raise IngestFailure(
            "channel_not_found",
            f"YouTube has no channel at {url!r} (HTTP {status}).",
            retryable=False,
            details=details,
        )
    if status in (403, 429):
        raise IngestFailure(
            "blocked",
            f"YouTube refused the request (HTTP {status}). {proxy_hint(settings)}",
            retryable=True,
            details=details,
        )
    raise IngestFailure(
        "request_failed",
        f"A request to YouTube failed: YouTube answered HTTP {status}.",
        retryable=status >= 500,
        details=details,
    )


def _channel_id_from_page(html: str) -> str | None:
    for pattern in _PAGE_CHANNEL_ID:
        found = pattern.search(html)
        if found is not None:
            return found.group(1)
    return None


def _parse_feed(content: bytes, channel_id: str, settings: IngestSettings) -> _Draft:
    try:
        # YouTube's own feed; expat refuses entity-expansion bombs by itself.
        root = ElementTree.fromstring(content)
    except ElementTree.ParseError as exc:
        raise describe_failure(exc, "channel", settings, {"channel_id": channel_id}) from None
    name = root.findtext("atom:title", namespaces=_ATOM) or root.findtext(
        "atom:author/atom:name", namespaces=_ATOM
    )
    return _Draft(
        channel_id=channel_id,
        channel_name=name.strip() if name else None,
        videos=list(_feed_videos(root.iterfind("atom:entry", _ATOM))),
    )


def _feed_videos(entries: Iterable[ElementTree.Element]) -> Iterable[_Video]:
    for entry in entries:
        video_id = (entry.findtext("yt:videoId", namespaces=_ATOM) or "").strip()
        if not _VIDEO_ID.fullmatch(video_id):
            continue
        title = (entry.findtext("atom:title", namespaces=_ATOM) or "").strip()
        yield _Video(
            video_id=video_id,
            title=title or None,
            published=_feed_date(entry.findtext("atom:published", namespaces=_ATOM)),
            duration_seconds=None,
        )


def _feed_date(text: str | None) -> datetime.date | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC)
    return moment.date()


# --- the answer -----------------------------------------------------------------------------


def _listing(
    target: _Target,
    draft: _Draft,
    limit: ChannelLimit,
    today: datetime.date,
    source: Literal["yt-dlp", "rss"],
    fallback_reason: str | None,
) -> ChannelListing:
    channel_id = draft.channel_id or target.channel_id
    if channel_id is None:
        raise IngestFailure(
            "channel_not_found",
            f"Could not tell which channel {target.page_url} is.",
            retryable=False,
            details={"url": target.page_url},
        )
    videos = _apply_limit(draft.videos, limit, today)
    return ChannelListing(
        channel_id=channel_id,
        channel_name=draft.channel_name or target.path,
        channel_url=f"https://www.youtube.com/channel/{channel_id}",
        videos=[
            ChannelVideo(
                video_id=video.video_id,
                url=f"https://www.youtube.com/watch?v={video.video_id}",
                title=video.title,
                published=video.published.isoformat() if video.published else None,
                duration_seconds=video.duration_seconds,
            )
            for video in videos
        ],
        source=source,
        fallback_reason=fallback_reason,
    )


def _apply_limit(videos: list[_Video], limit: ChannelLimit, today: datetime.date) -> list[_Video]:
    if limit in _COUNTS:
        return videos[: _COUNTS[limit]]
    if limit not in _WINDOW_DAYS:
        return list(videos)
    cutoff = today - datetime.timedelta(days=_WINDOW_DAYS[limit])
    # Newest first: everything listed before the last dated video inside the window is inside.
    last_inside = -1
    for index, video in enumerate(videos):
        if video.published is not None and video.published >= cutoff:
            last_inside = index
    return [
        video
        for video in videos[: last_inside + 1]
        if video.published is None or video.published >= cutoff
    ]
