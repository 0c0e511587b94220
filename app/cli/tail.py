"""``tail``: follow the log, one line per event, resuming across disconnects and restarts."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec

from app.cli.common import (
    CliError,
    add_filter_options,
    add_server_options,
    describe_payload,
    open_local_store,
    print_line,
)
from app.client import ActivityClient, ActivityError, Reset, Truncated

__all__ = ["format_envelope", "register"]


def format_envelope(envelope: dict[str, Any]) -> str:
    payload = envelope.get("payload") or {}
    return (
        f"{envelope['position']:>8} {envelope['timestamp']} "
        f"{envelope['stream']}/{envelope['source_id']} v{envelope['version']} "
        f"{envelope['event']}  {describe_payload(payload)}"
    ).rstrip()


def _filters(args: argparse.Namespace) -> dict[str, list[str]]:
    found = {
        "stream": args.stream,
        "source_id": args.source_id,
        "event": args.event,
        "agent_name": args.agent_name,
    }
    if args.agent_name:
        if any(stream != "agent" for stream in args.stream):
            raise CliError("--agent-name follows the agent stream only", code=2)
        if args.event:
            raise CliError("--agent-name cannot be combined with --event", code=2)
    return {name: values for name, values in found.items() if values}


def _print(envelope: dict[str, Any], raw: bytes | None, as_json: bool) -> None:
    if as_json:
        print_line((raw or msgspec.json.encode(envelope)).decode())
    else:
        print_line(format_envelope(envelope))


def _print_truncated(count: int, first: int, last: int, segment: str) -> None:
    print(
        f"truncated: {count} events in positions {first}-{last} were removed by retention; "
        f"they are in archive segment {segment}",
        file=sys.stderr,
        flush=True,
    )


async def _tail_remote(args: argparse.Namespace) -> None:
    async with ActivityClient(args.server, args.token) as client:
        start = args.start
        try:
            if start is None:
                start = (await client.request("GET", "/events", params={"limit": 1})).json()["head"]
            async for item in client.stream(
                _filters(args), last_event_id=start, report_truncated=True
            ):
                if isinstance(item, Truncated):
                    _print_truncated(item.count, item.first, item.last, item.segment)
                    continue
                if isinstance(item, Reset):
                    print(
                        f"reset: the server's log ends at {item.head}; following from there",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                _print(item.data, None, args.json)
        except ActivityError as exc:
            raise CliError(exc.message) from None


async def _tail_local(args: argparse.Namespace) -> None:
    from app.eventlog import EventFilter, Truncated, replay_then_tail

    filters = _filters(args)
    agent_names = tuple(filters.get("agent_name", ()))
    event_filter = EventFilter(
        streams=tuple(filters.get("stream", ("agent",) if agent_names else ())),
        source_ids=tuple(filters.get("source_id", ())),
        events=tuple(filters.get("event", ())),
        agent_names=agent_names,
    )
    async with open_local_store() as store:
        start = await store.head() if args.start is None else args.start
        async for entries in replay_then_tail(store, start, event_filter, report_truncated=True):
            if isinstance(entries, Truncated):
                for segment in entries.segments:
                    _print_truncated(
                        segment.count, segment.first_position, segment.last_position, segment.name
                    )
                continue
            for entry in entries:
                raw = entry.envelope_json()
                _print(msgspec.json.decode(raw), raw, args.json)


def _tail(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_tail_remote(args) if args.server else _tail_local(args))
    except KeyboardInterrupt:
        return 130
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tail = commands.add_parser(
        "tail",
        help="follow the event log",
        description="Print events as they are appended, one line each (or JSON), resuming "
        "where it was across disconnects and server restarts. Ctrl-C stops.",
    )
    add_filter_options(tail)
    tail.add_argument(
        "--agent-name",
        action="append",
        default=[],
        metavar="NAME",
        help="only agent events of this agent (repeatable)",
    )
    tail.add_argument(
        "--from",
        dest="start",
        type=int,
        metavar="N",
        help="start after position N (0: the whole log); default: the current head",
    )
    tail.add_argument("--json", action="store_true", help="print each envelope as a JSON line")
    add_server_options(tail, "it reads the local database")
    tail.set_defaults(handler=_tail)
