"""``replay INGEST_ID``: the timeline of a past ingest, with how long each step took."""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime
from typing import Any

from app.cli.common import CliError, add_server_options, open_local_store, print_line
from app.client import ActivityClient, ActivityError

__all__ = ["format_timeline", "register"]


def _moment(timestamp: str) -> datetime:
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.3f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _label(event: str, payload: dict[str, Any]) -> str:
    if event == "progress":
        return str(payload.get("step", "progress"))
    if event == "complete":
        return f"complete ({payload.get('status', '?')})"
    return event


def format_timeline(ingest_id: str, envelopes: list[dict[str, Any]]) -> list[str]:
    """One line per event: time since the start, the step, how long until the next event
    (the step's duration: a step is reported before it runs), and its message."""
    first = envelopes[0]["payload"]
    moments = [_moment(e["timestamp"]) for e in envelopes]
    lines = [f"ingest {ingest_id}: {first.get('type', '?')} {first.get('url', '')}"]
    last = envelopes[-1]
    if last["event"] == "complete":
        total = (moments[-1] - moments[0]).total_seconds()
        outcome = last["payload"]
        lines.append(
            f"{outcome.get('status', '?')} after {_duration(total)}: {outcome.get('message', '')}"
        )
    else:
        lines.append(f"not complete: last event {last['event']} at {last['timestamp']}")
    lines.append(f"  {'at':>10}  {'position':>8}  {'step':<24} {'took':>10}  message")
    for index, envelope in enumerate(envelopes):
        payload = envelope["payload"]
        offset = (moments[index] - moments[0]).total_seconds()
        took = ""
        if index + 1 < len(moments):
            took = _duration((moments[index + 1] - moments[index]).total_seconds())
        lines.append(
            f"  {'+' + format(offset, '.3f') + ' s':>10}  {envelope['position']:>8}  "
            f"{_label(envelope['event'], payload):<24} {took:>10}  {payload.get('message', '')}"
        )
    return lines


async def _read_remote(args: argparse.Namespace) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async with ActivityClient(args.server, args.token) as client:
        after = 0
        try:
            while True:
                response = await client.request(
                    "GET",
                    f"/ingests/{args.ingest_id}/events",
                    params={"after": after, "limit": 1000},
                )
                page = response.json()
                found.extend(page["events"])
                if len(page["events"]) < 1000:
                    return found
                after = page["next_after"]
        except ActivityError as exc:
            raise CliError(exc.message) from None


async def _read_local(args: argparse.Namespace) -> list[dict[str, Any]]:
    async with open_local_store() as store:
        events = await store.read_source("ingest", args.ingest_id)
    return [
        {
            "position": e.position,
            "event": e.event,
            "timestamp": e.timestamp,
            "payload": e.payload_dict(),
        }
        for e in events
    ]


def _replay(args: argparse.Namespace) -> int:
    envelopes = asyncio.run(_read_remote(args) if args.server else _read_local(args))
    if not envelopes:
        raise CliError(f"no ingest {args.ingest_id!r}")
    for line in format_timeline(args.ingest_id, envelopes):
        print_line(line)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="show the timeline of a past ingest",
        description="Every event of one ingest from the log, with the time each step took.",
    )
    replay.add_argument("ingest_id", metavar="INGEST_ID", help="e.g. ing_0123abcd…")
    add_server_options(replay, "it reads the local database")
    replay.set_defaults(handler=_replay)
