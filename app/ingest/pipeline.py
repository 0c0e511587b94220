"""The steps of each ingest type, each reported as a ``progress`` event before it runs.

Every step is safe to repeat: a run taken over after a crash starts from the top, finds what
the previous run already stored (``checking_cache``), rewrites archive files atomically and
upserts content records, so repeating a step never duplicates or corrupts anything.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from app.config import IngestSettings
from app.content import Archive, ContentStore, article_key
from app.events.envelope import utc_now
from app.ingest.articles import fetch_article
from app.ingest.channels import list_channel
from app.ingest.model import ChannelLimit, IngestFailure, IngestType, RetryNotice
from app.ingest.service import IngestRun, IngestService, child_ingest_id
from app.ingest.urls import detect_url
from app.ingest.youtube import fetch_metadata, fetch_transcript

__all__ = ["STEPS", "IngestPipeline"]

#: The progress steps of each type, in order (a retry repeats its step).
STEPS = {
    "video": (
        "extracting_id",
        "extracted_id",
        "checking_cache",
        "fetching_transcript",
        "transcript_fetched",
        "archiving",
        "archived",
        "storing",
        "stored",
    ),
    "article": (
        "checking_cache",
        "fetching",
        "fetched",
        "extracting",
        "extracted",
        "archiving",
        "archived",
        "storing",
        "stored",
    ),
    "channel": (
        "resolving_channel",
        "listing_videos",
        "listed_videos",
        "queueing_videos",
        "queued_videos",
        "storing",
        "stored",
    ),
}


def _complete(kind: str, status: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "status": status, "message": message, "details": details}


def _announce_retries(run: IngestRun, step: str) -> RetryNotice:
    """A retry notice that reports each retry of ``step`` as a ``progress`` event of it."""

    async def announce(attempt: int, attempts: int, delay: float, failure: IngestFailure) -> None:
        said = failure.message.rstrip()
        if not said.endswith((".", "!", "?", "…")):
            said += "."
        await run.progress(
            step,
            f"{said} Retrying in {delay:g} s (attempt {attempt}/{attempts}).",
            {
                "retrying": True,
                "attempt": attempt,
                "attempts": attempts,
                "delay_seconds": delay,
                "error_kind": failure.kind,
            },
        )

    return announce


@dataclass(frozen=True)
class IngestPipeline:
    settings: IngestSettings
    content: ContentStore
    archive: Archive
    service: IngestService

    async def __call__(self, run: IngestRun) -> dict[str, Any]:
        kind = run.state["type"]
        if kind == "video":
            return await self.run_video(run)
        if kind == "channel":
            return await self.run_channel(run)
        return await self.run_article(run)

    async def run_video(self, run: IngestRun) -> dict[str, Any]:
        await run.progress("extracting_id", "Extracting video ID...")
        video_id = detect_url(run.state["url"]).video_id
        if video_id is None:
            raise IngestFailure("invalid_video_id", "No video ID in the URL.", retryable=False)
        await run.progress("extracted_id", f"Video ID: {video_id}", {"video_id": video_id})

        await run.progress("checking_cache", "Checking if already processed...")
        stored = await self.content.get("video", video_id)
        if stored is not None and stored.get("transcript"):
            return _complete(
                "video",
                "skipped",
                "Video already processed",
                {"video_id": video_id, "title": stored.get("title"), "record": f"video:{video_id}"},
            )

        await run.progress("fetching_transcript", "Fetching transcript...")
        metadata = asyncio.create_task(fetch_metadata(video_id, self.settings))
        try:
            transcript = await fetch_transcript(
                video_id, self.settings, on_retry=_announce_retries(run, "fetching_transcript")
            )
        except BaseException:
            metadata.cancel()
            raise
        meta = await metadata  # optional data: fetch_metadata never raises
        text = transcript.text
        await run.progress(
            "transcript_fetched",
            f"Transcript fetched ({len(text):,} chars)",
            {"transcript_length": len(text), "language": transcript.language_code},
        )

        await run.progress("archiving", "Archiving transcript...")
        record: dict[str, Any] = {
            "video_id": video_id,
            "url": f"https://www.youtube.com/watch?v={video_id}",
            "title": meta.title,
            "channel": meta.author_name,
            "channel_url": meta.author_url,
            "thumbnail_url": meta.thumbnail_url,
            "language": transcript.language,
            "language_code": transcript.language_code,
            "is_generated": transcript.is_generated,
        }
        path = await self.archive.write_json(
            f"videos/{video_id}.json",
            {
                **record,
                "snippets": [
                    {"text": s.text, "start": s.start, "duration": s.duration}
                    for s in transcript.snippets
                ],
                "archived_at": utc_now(),
            },
        )
        await run.progress("archived", "Transcript archived", {"path": str(path)})

        return await self._store(
            run,
            "video",
            video_id,
            {
                **record,
                "transcript": text,
                "transcript_length": len(text),
                # The transcript is these texts joined by single spaces, so a position in it
                # (a search match) finds its segment and the second it is spoken at.
                "segments": [
                    {"start": s.start, "duration": s.duration, "text": words}
                    for s in transcript.snippets
                    if (words := " ".join(s.text.split()))
                ],
                "archive_path": str(path),
            },
            message=f"Ingested {record['title'] or video_id}",
            details={
                "video_id": video_id,
                "title": record["title"],
                "channel": record["channel"],
                "transcript_length": len(text),
                "language": transcript.language_code,
                "archive_path": str(path),
            },
        )

    async def run_article(self, run: IngestRun) -> dict[str, Any]:
        url = run.state["url"]
        key = article_key(url)
        await run.progress("checking_cache", "Checking if already processed...")
        stored = await self.content.get("article", key)
        if stored is not None and stored.get("text"):
            return _complete(
                "article",
                "skipped",
                "Article already processed",
                {"url": url, "title": stored.get("title"), "record": f"article:{key}"},
            )

        await run.progress("fetching", f"Fetching {url}...")
        article = await fetch_article(
            url,
            self.settings,
            progress=run.progress,
            on_retry=_announce_retries(run, "fetching"),
        )
        await run.progress(
            "fetched",
            f"Fetched {len(article.html):,} chars of HTML",
            {"final_url": article.url, "content_type": article.content_type},
        )
        await run.progress("extracting", "Extracting the article text...")
        await run.progress(
            "extracted",
            f"Extracted {len(article.text):,} chars"
            + (f": {article.title}" if article.title else ""),
            {"text_length": len(article.text), "title": article.title},
        )

        await run.progress("archiving", "Archiving page and text...")
        html_path = await self.archive.write_text(f"articles/{key}.html", article.html)
        text_path = await self.archive.write_text(f"articles/{key}.txt", article.text)
        await run.progress(
            "archived",
            "Page and text archived",
            {"path": str(html_path), "text_path": str(text_path)},
        )

        return await self._store(
            run,
            "article",
            key,
            {
                "url": url,
                "final_url": article.url,
                "title": article.title,
                "author": article.author,
                "date": article.date,
                "language": article.language,
                "text": article.text,
                "text_length": len(article.text),
                "archive_path": str(html_path),
                "text_path": str(text_path),
            },
            message=f"Ingested {article.title or article.url}",
            details={
                "url": url,
                "title": article.title,
                "author": article.author,
                "date": article.date,
                "language": article.language,
                "text_length": len(article.text),
                "archive_path": str(html_path),
            },
        )

    async def run_channel(self, run: IngestRun) -> dict[str, Any]:
        url = run.state["url"]
        limit: ChannelLimit = run.state.get("channel_limit") or "all"
        await run.progress("resolving_channel", f"Resolving channel {url}...")
        await run.progress("listing_videos", f"Listing videos (limit: {limit})...")
        listing = await list_channel(
            url, limit, self.settings, on_retry=_announce_retries(run, "listing_videos")
        )
        count = len(listing.videos)
        await run.progress(
            "listed_videos",
            f"Found {count:,} videos on {listing.channel_name}",
            {
                "video_count": count,
                "channel_id": listing.channel_id,
                "channel_name": listing.channel_name,
                "source": listing.source,
            },
        )
        await run.progress("queueing_videos", f"Queueing {count:,} videos...")
        ingest_ids: list[str] = []
        for video in listing.videos:
            child, _ = await self.service.start(
                video.url,
                parent_id=run.ingest_id,
                ingest_id=child_ingest_id(run.ingest_id, video.video_id),
            )
            ingest_ids.append(child)
        await run.progress("queued_videos", f"Queued {count:,} videos", {"ingest_ids": ingest_ids})
        return await self._store(
            run,
            "channel",
            listing.channel_id,
            {
                "channel_id": listing.channel_id,
                "name": listing.channel_name,
                "url": listing.channel_url,
                "video_ids": [video.video_id for video in listing.videos],
                "videos": [
                    {"video_id": v.video_id, "title": v.title, "published": v.published}
                    for v in listing.videos
                ],
            },
            status="queued",
            message=f"Queued {count:,} videos from {listing.channel_name}",
            details={
                "channel_id": listing.channel_id,
                "channel_name": listing.channel_name,
                "video_count": count,
                "ingest_ids": ingest_ids,
                "source": listing.source,
            },
        )

    async def _store(
        self,
        run: IngestRun,
        kind: IngestType,
        key: str,
        record: dict[str, Any],
        *,
        status: str = "success",
        message: str,
        details: dict[str, Any],
    ) -> dict[str, Any]:
        """The last steps of every type: store ``record`` as ``kind:key``, then the ``complete``
        payload, whose details name the stored record."""
        await run.progress("storing", "Storing in database...")
        await self.content.put(
            kind, key, {**record, "ingest_id": run.ingest_id, "ingested_at": utc_now()}
        )
        stored = f"{kind}:{key}"
        await run.progress("stored", "Stored in database", {"record": stored})
        return _complete(kind, status, message, {**details, "record": stored})
