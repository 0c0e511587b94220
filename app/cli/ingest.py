"""``ingest URL``: start an ingest and show its progress until it completes.

With ``--server`` the running service does the work and this only follows its stream. Without
it, the ingest runs here, on the local database and content store: the job runner of this
process executes it (and, for a channel, its videos; then any agent runs it triggered), and
the command returns once that work is done.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from app.cli.common import CliError, add_server_options, open_local_services, print_error
from app.cli.progress import ProgressDisplay, choose_display
from app.client import ActivityClient, ActivityError, StreamEvent

__all__ = ["register"]

GOOD_ENDINGS = ("success", "skipped", "queued")
CHANNEL_LIMITS = ("month", "year", "50", "100", "all")


def _outcome(result: dict[str, Any] | None) -> int:
    if result is None:
        print_error("the ingest ended without a result")
        return 1
    if result.get("status") in GOOD_ENDINGS:
        return 0
    print_error(str(result.get("message") or result.get("status")))
    return 1


async def _ingest_remote(args: argparse.Namespace, display: ProgressDisplay) -> int:
    async with ActivityClient(args.server, args.token) as client:
        progress = client.ingest(args.url, args.channel_limit)
        try:
            async for event in progress:
                assert progress.ingest_id is not None
                display.show(progress.ingest_id, event)
        except ActivityError as exc:
            raise CliError(exc.message) from None
        return _outcome(progress.result)


def _to_stream_event(entry: Any) -> StreamEvent:
    return StreamEvent(entry.event.position, entry.event.event, entry.payload())


async def _follow_local(services: Any, ingest_id: str, display: ProgressDisplay) -> dict[str, Any]:
    from app.eventlog import EventFilter, replay_then_tail

    only = EventFilter(streams=("ingest",), source_ids=(ingest_id,))
    async for entries in replay_then_tail(services.store, 0, only):
        for entry in entries:
            event = _to_stream_event(entry)
            display.show(ingest_id, event)
            if event.event == "complete":
                result: dict[str, Any] = event.payload
                return result
    raise AssertionError("unreachable: a tail never ends")


async def _follow_children(services: Any, children: list[str], display: ProgressDisplay) -> None:
    """A channel's videos are ingests of their own, run by this process's job runner."""
    from app.eventlog import EventFilter, replay_then_tail

    display.note(f"ingesting {len(children)} video(s) of the channel here")
    waiting = set(children)
    only = EventFilter(streams=("ingest",), source_ids=tuple(children))
    async for entries in replay_then_tail(services.store, 0, only):
        for entry in entries:
            if entry.event.event == "complete" and entry.event.source_id in waiting:
                waiting.discard(entry.event.source_id)
                done = len(children) - len(waiting)
                display.child(entry.event.source_id, _to_stream_event(entry), done, len(children))
        if not waiting:
            return


async def _drain(services: Any, display: ProgressDisplay) -> None:
    """Let the work this ingest triggered (agent runs) finish before the process exits;
    otherwise it would wait, half done, for the next process to take it over."""
    said = False
    quiet_rounds = 0
    while quiet_rounds < 3:
        head = await services.store.head()
        for name in ("ingests", "agents"):
            await services.projections.wait_for(name, head, within=2.0)
        services.jobs.wake()
        await asyncio.sleep(0.2)
        if services.jobs.running_count:
            if not said:
                display.note("finishing the agent runs this ingest started")
                said = True
            quiet_rounds = 0
        else:
            quiet_rounds += 1


async def _ingest_local(args: argparse.Namespace, display: ProgressDisplay) -> int:
    from app.ingest.urls import InvalidUrl

    async with open_local_services() as services:
        try:
            ingest_id, _ = await services.ingest.start(args.url, args.channel_limit)
        except InvalidUrl as exc:
            raise CliError(str(exc)) from None
        services.jobs.wake()
        result = await _follow_local(services, ingest_id, display)
        children = (result.get("details") or {}).get("ingest_ids") or []
        if result.get("status") == "queued" and children:
            await _follow_children(services, list(children), display)
        await _drain(services, display)
    return _outcome(result)


def _ingest(args: argparse.Namespace) -> int:
    display = choose_display(args.json)
    if args.server:
        return asyncio.run(_ingest_remote(args, display))
    return asyncio.run(_ingest_local(args, display))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = commands.add_parser(
        "ingest",
        help="ingest a video, channel or article URL and show its progress",
        description="Ingest a YouTube video or channel, or an article, showing each step. "
        "Exit status 0 when it ends with success, skipped or queued, 1 on error.",
    )
    ingest.add_argument("url", help="a YouTube video or channel URL, or an article URL")
    ingest.add_argument(
        "--channel-limit",
        choices=CHANNEL_LIMITS,
        default="all",
        help="for a channel: the 50 or 100 newest videos, this month's or year's, or all",
    )
    ingest.add_argument("--json", action="store_true", help="print the events as JSON lines")
    add_server_options(ingest, "the ingest runs in this process on the local database")
    ingest.set_defaults(handler=_ingest)
