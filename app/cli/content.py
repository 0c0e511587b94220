"""``content list|show|search``: what ingests stored, read from the local content store or,
with ``--server``, from a running service."""

from __future__ import annotations

import argparse
import asyncio
import html
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from app.cli.common import (
    CliError,
    add_server_options,
    content_store_in_use,
    print_line,
)
from app.client import ActivityClient, ActivityError

if TYPE_CHECKING:
    from app.content import (
        ContentFilter,
        ContentItem,
        ContentPage,
        ContentStore,
        SearchResults,
    )

__all__ = ["format_hits", "format_item", "format_page", "register"]

T = TypeVar("T")
_MARK = re.compile(r"<mark>(.*?)</mark>", re.DOTALL)


# -- formatting -----------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _plain(snippet: str) -> str:
    """A snippet for a terminal, on one line: matched words in *stars*, entities decoded."""
    return " ".join(html.unescape(_MARK.sub(r"*\1*", snippet)).split())


def format_page(page: ContentPage) -> list[str]:
    lines = []
    for item in page.items:
        tags = f"  [{', '.join(item.tags[:5])}]" if item.tags else ""
        lines.append(f"{item.ingested_at or '-':<24}  {item.id:<44}  {item.title or ''}{tags}")
    if not page.items:
        lines.append("no content")
    if page.next is not None:
        lines.append(f"more: --cursor {page.next}")
    return lines


def format_item(item: ContentItem) -> list[str]:
    """The item as text: a header of what is known about it, then its text (a transcript
    one segment a line, each with the second it starts at)."""
    lines = [f"{item.title or '(untitled)'}", f"  id:        {item.id} ({item.type})"]
    for label, value in (
        ("url", item.url),
        ("channel", item.channel if item.type == "video" else None),
        ("author", item.author),
        ("published", item.published),
        ("ingested", item.ingested_at),
        ("language", item.language),
        ("tags", ", ".join(item.tags) if item.tags else None),
        ("ingest", f"{item.ingest_id} (replay {item.ingest_id})" if item.ingest_id else None),
    ):
        if value:
            lines.append(f"  {label + ':':<10} {value}")
    for run in item.agent_runs:
        lines.append(f"  {run.agent + ':':<10} {run.source_id} at {run.at or '?'}")
    if item.summary:
        lines += ["", "Summary", f"  {item.summary}"]
    if item.videos is not None:
        lines += ["", f"Videos ({len(item.videos)})"]
        for video in item.videos:
            stored = video.id or "not stored"
            lines.append(
                f"  {video.published or '-':<12} {video.title or video.video_id}  [{stored}]"
            )
    if item.segments:
        lines += ["", "Transcript"]
        lines += [f"  [{_clock(s.start)}] {s.text}" for s in item.segments]
    elif item.text:
        lines += ["", "Text", item.text]
    return lines


def format_hits(results: SearchResults) -> list[str]:
    if not results.hits:
        return [f"no content matches {results.query!r}"]
    lines = []
    for rank, hit in enumerate(results.hits, start=1):
        lines.append(f"{rank}. {hit.title or '(untitled)'}  ({hit.id}, score {hit.score:.2f})")
        lines.append(f"   {_plain(hit.snippet)}")
        if hit.segment is not None:
            lines.append(f"   at {_clock(hit.segment.start)}: {hit.segment.url}")
        elif hit.url:
            lines.append(f"   {hit.url}")
    return lines


# -- reading --------------------------------------------------------------------------------


@asynccontextmanager
async def _local_store() -> AsyncIterator[ContentStore]:
    from app.config import get_settings
    from app.content import ContentStore

    settings = get_settings().content
    path = ContentStore.missing(settings)
    if path is not None:
        raise CliError(
            f"no content store at {path}: set SURREALDB_URL to the service's, or use --server URL"
        )
    with content_store_in_use(
        ". If that is a running server, read from it with --server URL "
        "(e.g. --server http://127.0.0.1:8000)"
    ):
        store = await ContentStore.open(settings)
    try:
        yield store
    finally:
        await store.close()


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "type": args.type or None,
        "channel": args.channel or None,
        "tag": args.tag or None,
        "since": args.since,
        "until": args.until,
    }


def _local_filter(args: argparse.Namespace) -> ContentFilter:
    from app.content import content_filter

    values = _filters(args)
    return content_filter(
        types=values["type"],
        channels=values["channel"],
        tags=values["tag"],
        since=values["since"],
        until=values["until"],
    )


async def _read(
    args: argparse.Namespace,
    remote: Callable[[ActivityClient], Awaitable[T]],
    local: Callable[[ContentStore], Awaitable[T]],
) -> T:
    from app.content import ContentUnavailable, InvalidContentQuery

    try:
        if args.server:
            async with ActivityClient(args.server, args.token) as client:
                return await remote(client)
        async with _local_store() as store:
            return await local(store)
    except ActivityError as exc:
        raise CliError(exc.message, code=2 if exc.status_code == 400 else 1) from None
    except InvalidContentQuery as exc:
        raise CliError(str(exc), code=2) from None
    except ContentUnavailable as exc:
        raise CliError(str(exc)) from None


def _emit(value: Any, lines: list[str], as_json: bool) -> None:
    if as_json:
        print_line(msgspec.json.encode(value).decode())
        return
    for line in lines:
        print_line(line)


def _list(args: argparse.Namespace) -> int:
    from app.content import list_content

    page = asyncio.run(
        _read(
            args,
            lambda client: client.list_content(
                **_filters(args), cursor=args.cursor, limit=args.limit
            ),
            lambda store: list_content(
                store, _local_filter(args), cursor=args.cursor, limit=args.limit
            ),
        )
    )
    _emit(page, format_page(page), args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    from app.content import get_content

    async def local(store: ContentStore) -> ContentItem:
        item = await get_content(store, args.id)
        if item is None:
            raise CliError(f"no content {args.id!r}")
        return item

    item = asyncio.run(_read(args, lambda client: client.get_content(args.id), local))
    _emit(item, format_item(item), args.json)
    return 0


def _search(args: argparse.Namespace) -> int:
    from app.content import search_content

    results = asyncio.run(
        _read(
            args,
            lambda client: client.search_content(args.query, **_filters(args), limit=args.limit),
            lambda store: search_content(store, args.query, _local_filter(args), limit=args.limit),
        )
    )
    _emit(results, format_hits(results), args.json)
    return 0


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--type", action="append", default=[], help="video, article or channel (repeatable)"
    )
    parser.add_argument(
        "--channel", action="append", default=[], help="a channel's name or id (repeatable)"
    )
    parser.add_argument("--tag", action="append", default=[], help="any of these tags")
    parser.add_argument("--since", help="ingested at or after (ISO 8601)")
    parser.add_argument("--until", help="ingested at or before (ISO 8601)")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    content = commands.add_parser(
        "content",
        help="list, show and search what ingests stored",
        description="What ingests stored: newest first, one item whole, or a full-text search.",
    )
    actions = content.add_subparsers(dest="action", required=True, metavar="ACTION")
    where = "it reads the local content store (SURREALDB_URL)"

    listing = actions.add_parser("list", help="items, newest first")
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=20, help="items a page (default 20)")
    listing.add_argument("--cursor", help="continue after a page (its 'more: --cursor …')")
    listing.add_argument("--json", action="store_true", help="print the page as JSON")
    add_server_options(listing, where)
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one item whole: its text, tags, summary, origin")
    show.add_argument("id", metavar="ID", help="e.g. video:Xk3fQ9pLm2A or article:<key>")
    show.add_argument("--json", action="store_true", help="print the item as JSON")
    add_server_options(show, where)
    show.set_defaults(handler=_show)

    search = actions.add_parser(
        "search", help="full-text search; each hit with its passage and the video's second"
    )
    search.add_argument("query", metavar="QUERY", help="words to find (all of them)")
    _add_filters(search)
    search.add_argument("--limit", type=int, default=10, help="hits to show (default 10)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_server_options(search, where)
    search.set_defaults(handler=_search)
