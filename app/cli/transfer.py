"""``export`` and ``import``: the log as NDJSON envelopes, out and (into an empty log) in.

Export streams page by page, so its memory does not grow with the log; it stops at the head
it saw when it started, so it is a consistent prefix of the log even while appends go on.
An exported file imported into an empty database gives the same log: the same positions,
event ids, versions, timestamps and payload bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec

from app.cli.common import (
    CliError,
    add_filter_options,
    add_server_options,
    check_local_database,
    print_line,
)
from app.cli.service import rebuild_projections
from app.client import ActivityClient, ActivityError
from app.config import get_settings

if TYPE_CHECKING:
    from app.eventlog import Event

__all__ = ["register"]

PAGE = 5000


def _filters(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        name: values
        for name, values in (
            ("stream", args.stream),
            ("source_id", args.source_id),
            ("event", args.event),
        )
        if values
    }


async def _export_local(args: argparse.Namespace, out: BinaryIO) -> None:
    from sqlalchemy import func, select

    from app.database import create_engine
    from app.eventlog import EventFilter, encode_event
    from app.eventlog.store import read_page
    from app.eventlog.tables import events

    url = get_settings().database.url
    check_local_database(url)
    filters = _filters(args)
    event_filter = EventFilter(
        streams=tuple(filters.get("stream", ())),
        source_ids=tuple(filters.get("source_id", ())),
        events=tuple(filters.get("event", ())),
    )
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            head = (
                await connection.execute(select(func.coalesce(func.max(events.c.position), 0)))
            ).scalar_one()
            until = head if args.until is None else min(args.until, head)
            if args.include_archives:
                await _export_history(connection, args.after, until, event_filter, out)
                return
            after = args.after
            while after < until:
                page = await read_page(connection, after, event_filter, limit=PAGE)
                # One short read transaction per page: a long one would keep SQLite from
                # checkpointing its WAL (and PostgreSQL from vacuuming) for the whole export.
                await connection.rollback()
                lines = [encode_event(e) for e in page.events if e.position <= until]
                if lines:
                    lines.append(b"")
                    out.write(b"\n".join(lines))
                if page.scanned_to <= after:
                    break
                after = page.scanned_to
    finally:
        await engine.dispose()


async def _export_history(
    connection: Any, after: int, until: int, event_filter: Any, out: BinaryIO
) -> None:
    """The events above ``after`` up to ``until``, archived ones included, in position
    order."""
    from pathlib import Path

    from app.eventlog import encode_event
    from app.eventlog.archives import ArchiveDamaged, history

    directory = Path(get_settings().retention.archive_dir)
    try:
        async for found in history(connection, directory, after, event_filter, through=until):
            lines = [encode_event(event) for event in found]
            lines.append(b"")
            out.write(b"\n".join(lines))
    except ArchiveDamaged as exc:
        raise CliError(f"export stopped: {exc}") from None


async def _export_remote(args: argparse.Namespace, out: BinaryIO) -> None:
    encoder = msgspec.json.Encoder()
    lines: list[bytes] = []
    async with ActivityClient(args.server, args.token) as client:
        try:
            async for envelope in client.events(args.after, _filters(args), until=args.until):
                lines.append(encoder.encode(envelope))
                if len(lines) >= 1000:
                    out.write(b"\n".join(lines) + b"\n")
                    lines.clear()
        except ActivityError as exc:
            raise CliError(exc.message) from None
    if lines:
        out.write(b"\n".join(lines) + b"\n")


def _export(args: argparse.Namespace) -> int:
    if args.include_archives and args.server:
        raise CliError("--include-archives reads the archive directory: not with --server", 2)
    out = sys.stdout.buffer
    try:
        asyncio.run(_export_remote(args, out) if args.server else _export_local(args, out))
        out.flush()
    except BrokenPipeError:
        # The reader stopped early (| head): not an error, and nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _read_envelopes(source: BinaryIO) -> Iterator[Event]:
    from app.eventlog import ImportRefused
    from app.events.envelope import decode_event

    for number, line in enumerate(source, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            yield decode_event(line)
        except msgspec.MsgspecError as exc:
            raise ImportRefused(f"line {number} is not an exported envelope: {exc}") from None


async def _import_file(source: BinaryIO) -> tuple[int, int, list[tuple[str, int]]]:
    from app.database import create_engine, upgrade_database
    from app.eventlog import import_events

    url = get_settings().database.url
    await upgrade_database(url)
    engine = create_engine(url, pool_size=2)
    try:
        result = await import_events(engine, _read_envelopes(source))
    finally:
        await engine.dispose()
    return result.imported, result.head, await rebuild_projections(url)


def _import(args: argparse.Namespace) -> int:
    from app.eventlog import ImportRefused

    try:
        if args.file == "-":
            imported, head, rebuilt = asyncio.run(_import_file(sys.stdin.buffer))
        else:
            with open(args.file, "rb") as source:
                imported, head, rebuilt = asyncio.run(_import_file(source))
    except ImportRefused as exc:
        raise CliError(f"import refused, nothing was written: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    print_line(f"imported {imported} events, head {head}")
    for name, position in rebuilt:
        print_line(f"rebuilt {name} up to position {position}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="write the log as NDJSON envelopes to stdout",
        description="Write the log (or the events matching the filters) to stdout, one "
        "envelope per line, in position order, streaming: memory stays flat however long "
        "the log. Stops at the head seen at the start.",
    )
    export.add_argument(
        "--after", type=int, default=0, metavar="N", help="events above position N (default 0)"
    )
    export.add_argument("--until", type=int, metavar="M", help="events at or below position M")
    export.add_argument(
        "--include-archives",
        action="store_true",
        help="with the events retention moved to archive segments (LOG_ARCHIVE_DIR), in "
        "position order: the whole history, which import restores",
    )
    add_filter_options(export)
    add_server_options(export, "it reads the local database")
    export.set_defaults(handler=_export)

    load = commands.add_parser(
        "import",
        help="load an exported NDJSON file into an empty log",
        description="Load envelopes written by export into an EMPTY log (DATABASE_URL), "
        "keeping positions, event ids, versions, timestamps and payloads as they are, all "
        "or nothing; then rebuild every projection. A log that holds events is refused.",
    )
    load.add_argument("file", metavar="FILE", help="the NDJSON file, or - for stdin")
    load.set_defaults(handler=_import)
