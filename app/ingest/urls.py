"""What a pasted URL is: a YouTube video, a YouTube channel, or an article.

YouTube URLs are normalized (one video has many URL spellings), so that :func:`url_key`
gives the same identity to every spelling of the same thing.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import SplitResult, parse_qs, quote, unquote, urlsplit

import msgspec

from app.content.store import article_key, normalize_article_url
from app.ingest.model import IngestType

__all__ = [
    "MAX_URL_LENGTH",
    "DetectedUrl",
    "InvalidUrl",
    "detect_url",
    "url_key",
]

MAX_URL_LENGTH: Final = 2048

_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_CHANNEL_ID = re.compile(r"UC[A-Za-z0-9_-]{22}")
# Handles and legacy channel names: letters of any script, digits, '_', '-', '.', '·'.
_CHANNEL_NAME = re.compile(r"[\w.\-·]{1,100}")
_BAD_HOST_CHARS = re.compile(r"[\s<>\"{}|\\^`%]")

_YOUTUBE_HOSTS: Final = frozenset(
    {
        "youtube.com",
        "www.youtube.com",
        "m.youtube.com",
        "music.youtube.com",
        "youtube-nocookie.com",
        "www.youtube-nocookie.com",
    }
)
_SHORT_HOSTS: Final = frozenset({"youtu.be", "www.youtu.be"})
# Path prefixes whose next segment is a video id.
_VIDEO_PREFIXES: Final = frozenset({"shorts", "live", "embed", "v", "e"})
# /embed/videoseries?list=… embeds a playlist, and happens to be 11 letters long.
_NOT_VIDEO_IDS: Final = frozenset({"videoseries"})
_CHANNEL_PREFIXES: Final = frozenset({"c", "user"})


class InvalidUrl(ValueError):
    """The URL cannot be ingested; the message says why, for the user to read."""


class DetectedUrl(msgspec.Struct, frozen=True):
    # Videos: https://www.youtube.com/watch?v=ID; channels: https://www.youtube.com/<channel>;
    # articles: the URL as given, without blanks around it or its #fragment.
    url: str
    type: IngestType
    video_id: str | None = None
    # "@handle", "channel/UC…", "c/name" or "user/name".
    channel: str | None = None


def detect_url(url: str) -> DetectedUrl:
    """Classify and normalize ``url``; raises :class:`InvalidUrl` naming the problem."""
    parts = _parse(url)
    host = (parts.hostname or "").rstrip(".")
    if host in _SHORT_HOSTS:
        segments = _segments(parts)
        if not segments:
            raise InvalidUrl("youtu.be URL has no video id")
        return _video(segments[0])
    if host in _YOUTUBE_HOSTS:
        detected = _detect_youtube(parts)
        if detected is not None:
            return detected
    return DetectedUrl(url=normalize_article_url(url), type="article")


def url_key(detected: DetectedUrl) -> str:
    """A stable identity for "the same URL": ``video:ID``, ``channel:<channel>`` (handles and
    names in lower case, as YouTube treats them), ``article:<hash of the URL>``."""
    if detected.type == "video" and detected.video_id is not None:
        return f"video:{detected.video_id}"
    if detected.type == "channel" and detected.channel is not None:
        channel = detected.channel
        if not channel.startswith("channel/"):
            channel = channel.lower()
        return f"channel:{channel}"
    return f"article:{article_key(detected.url)}"


def _parse(url: str) -> SplitResult:
    if not isinstance(url, str):
        raise InvalidUrl("URL must be a string")
    text = url.strip()
    if not text:
        raise InvalidUrl("URL is empty")
    if len(text) > MAX_URL_LENGTH:
        raise InvalidUrl(f"URL is too long: {len(text)} characters, at most {MAX_URL_LENGTH}")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise InvalidUrl("URL cannot be parsed: it contains a control character")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number 0-65535
    except ValueError as exc:
        raise InvalidUrl(f"URL cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = f", not '{scheme}:'" if scheme else ""
        raise InvalidUrl(f"URL must start with http:// or https://{got}")
    host = parts.hostname
    if not host or not host.rstrip("."):
        raise InvalidUrl("URL has no host")
    if _BAD_HOST_CHARS.search(host):
        raise InvalidUrl(f"URL cannot be parsed: {host!r} is not a valid host name")
    return parts


def _segments(parts: SplitResult) -> list[str]:
    return [unquote(segment) for segment in parts.path.split("/") if segment]


def _detect_youtube(parts: SplitResult) -> DetectedUrl | None:
    segments = _segments(parts)
    if not segments:
        return None
    first = segments[0]
    prefix = first.lower()
    if prefix == "watch":
        ids = parse_qs(parts.query, keep_blank_values=True).get("v")
        if ids:
            return _video(ids[0])
        if len(segments) > 1:  # /watch/ID, as some apps share
            return _video(segments[1])
        raise InvalidUrl("YouTube watch URL has no video id (v=…)")
    if prefix in _VIDEO_PREFIXES:
        if len(segments) < 2:
            raise InvalidUrl(f"YouTube /{first} URL has no video id")
        if segments[1] in _NOT_VIDEO_IDS:
            return None
        return _video(segments[1])
    if first.startswith("@"):
        return _channel("@", first[1:], "handle")
    if prefix == "channel":
        if len(segments) < 2:
            raise InvalidUrl("YouTube /channel URL has no channel id")
        channel_id = segments[1]
        if not _CHANNEL_ID.fullmatch(channel_id):
            raise InvalidUrl(
                f"YouTube channel id {_shown(channel_id)} is not valid: a channel id is 'UC' "
                "followed by 22 letters, digits, '-' or '_'"
            )
        return _channel_url(f"channel/{channel_id}")
    if prefix in _CHANNEL_PREFIXES:
        if len(segments) < 2:
            raise InvalidUrl(f"YouTube /{first} URL has no channel name")
        return _channel(f"{prefix}/", segments[1], "name")
    return None


def _video(video_id: str) -> DetectedUrl:
    if not _VIDEO_ID.fullmatch(video_id):
        raise InvalidUrl(
            f"YouTube video id {_shown(video_id)} is not valid: a video id is 11 letters, "
            "digits, '-' or '_'"
        )
    return DetectedUrl(
        url=f"https://www.youtube.com/watch?v={video_id}", type="video", video_id=video_id
    )


def _channel(prefix: str, name: str, what: str) -> DetectedUrl:
    if not _CHANNEL_NAME.fullmatch(name):
        raise InvalidUrl(
            f"YouTube channel {what} {_shown(prefix + name)} is not valid: it must be 1-100 "
            "letters, digits, '_', '-' or '.'"
        )
    return _channel_url(prefix + name)


def _channel_url(channel: str) -> DetectedUrl:
    return DetectedUrl(
        url=f"https://www.youtube.com/{quote(channel, safe='/@')}",
        type="channel",
        channel=channel,
    )


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "…")
