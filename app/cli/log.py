"""``log status`` and ``log purge``: what the log holds, what retention archived, what it
removes next; and a purge now."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec

from app.cli.common import CliError, check_local_database, open_local_store, print_line
from app.config import get_settings

__all__ = ["register"]

#: Archived ranges listed one a line; beyond this, the oldest and newest are.
_LISTED = 20


async def _status() -> dict[str, Any]:
    from sqlalchemy import func, select

    from app.backends import backend_of
    from app.database import create_engine
    from app.eventlog.archives import list_segments
    from app.eventlog.retention import pending_by_rule
    from app.eventlog.tables import events
    from app.projections import all_projections
    from app.projections.snapshots import newest_snapshot

    settings = get_settings()
    url = settings.database.url
    check_local_database(url)
    rules = settings.retention.parsed_rules()
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            size = await backend_of(connection).database_bytes(connection)
            streams = (
                await connection.execute(
                    select(events.c.stream, func.min(events.c.position), func.count())
                    .group_by(events.c.stream)
                    .order_by(events.c.stream)
                )
            ).all()
            head = (
                await connection.execute(select(func.coalesce(func.max(events.c.position), 0)))
            ).scalar_one()
            segments = await list_segments(connection)
            pending = await pending_by_rule(connection, rules, datetime.now(UTC))
            snapshots = {
                projection.name: await newest_snapshot(connection, projection.name)
                for projection in all_projections()
            }
    finally:
        await engine.dispose()
    return {
        "database_bytes": size,
        "head": int(head),
        "events": sum(int(count) for _, _, count in streams),
        "streams": [
            {"stream": stream, "oldest_position": int(oldest), "events": int(count)}
            for stream, oldest, count in streams
        ],
        "archive_dir": settings.retention.archive_dir,
        "archived": [
            {**segment.describe(), "bytes": segment.bytes, "archived_at": segment.archived_at}
            for segment in segments
        ],
        "rules": [rule.label for rule in rules],
        "next_removal": [{"rule": rule.label, "events": count} for rule, count in pending],
        "snapshots": {
            name: None if found is None else {"position": found.position, "at": found.created_at}
            for name, found in snapshots.items()
        },
    }


def _size(count: int | None) -> str:
    if count is None:
        return "unknown"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    raise AssertionError


def _print_status(status: dict[str, Any]) -> None:
    print_line(
        f"log: {status['events']} events, head {status['head']}, database "
        f"{_size(status['database_bytes'])}"
    )
    for stream in status["streams"]:
        print_line(
            f"  {stream['stream']}: {stream['events']} events, oldest retained position "
            f"{stream['oldest_position']}"
        )
    archived = status["archived"]
    total = sum(segment["count"] for segment in archived)
    print_line(
        f"archived: {total} events in {len(archived)} segments under {status['archive_dir']}"
    )
    shown = (
        archived
        if len(archived) <= _LISTED
        else archived[: _LISTED // 2] + archived[-_LISTED // 2 :]
    )
    for index, segment in enumerate(shown):
        if len(archived) > _LISTED and index == _LISTED // 2:
            print_line(f"  … {len(archived) - _LISTED} more")
        print_line(
            f"  positions {segment['first']}-{segment['last']}: {segment['count']} events in "
            f"{segment['segment']}"
        )
    if not status["rules"]:
        print_line("retention: no rules (RETENTION_RULES): every event is kept")
    else:
        print_line(f"retention: {', '.join(status['rules'])}; next removal:")
        for item in status["next_removal"]:
            print_line(f"  {item['rule']}: {item['events']} events")
    for name, snapshot in status["snapshots"].items():
        where = "none" if snapshot is None else f"at position {snapshot['position']}"
        print_line(f"snapshot {name}: {where}")


def _log_status(args: argparse.Namespace) -> int:
    status = asyncio.run(_status())
    if args.json:
        print_line(msgspec.json.encode(status).decode())
    else:
        _print_status(status)
    return 0


async def _purge(max_batches: int | None) -> tuple[int, int]:
    from pathlib import Path

    from app.eventlog.retention import LEASE, Retention
    from app.jobs import Leases, new_instance_id

    settings = get_settings()
    rules = settings.retention.parsed_rules()
    if not rules:
        raise CliError("no retention rules (RETENTION_RULES): nothing to purge", code=2)
    async with open_local_store() as store:
        leases = Leases(store.engine, new_instance_id(), 300.0)
        if not await leases.claim(LEASE, "maintenance"):
            raise CliError("another process is purging the log now; try again later")
        try:
            retention = Retention(
                store,
                rules,
                Path(settings.retention.archive_dir),
                batch_events=settings.retention.batch_events,
                delete_rows=settings.retention.delete_rows,
            )
            result = await retention.purge(
                max_batches=max_batches, between_batches=lambda: leases.renew(LEASE)
            )
        finally:
            await leases.release([LEASE])
    return result.removed, len(result.segments)


def _log_purge(args: argparse.Namespace) -> int:
    removed, segments = asyncio.run(_purge(args.max_batches))
    print_line(f"archived and removed {removed} events in {segments} segments")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    log = commands.add_parser(
        "log", help="the log's size, retention and archives", description="The log's upkeep."
    )
    log_commands = log.add_subparsers(dest="log_command", required=True, metavar="COMMAND")
    status = log_commands.add_parser(
        "status",
        help="size, oldest retained position per stream, archived ranges, next removals",
        description="Show the log's size, the oldest retained position of each stream, the "
        "ranges archived by retention (and their segments), and how many events each "
        "retention rule would remove now.",
    )
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(handler=_log_status)
    purge = log_commands.add_parser(
        "purge",
        help="archive and remove expired events now",
        description="Apply RETENTION_RULES now: archive expired events under LOG_ARCHIVE_DIR, "
        "then remove them from the log (as the running service does every "
        "RETENTION_INTERVAL_SECONDS).",
    )
    purge.add_argument("--max-batches", type=int, metavar="N", help="stop after N segments")
    purge.set_defaults(handler=_log_purge)
