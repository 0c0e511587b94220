"""``agents run AGENT… --scope …``: a coordinator run, followed to its end."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from app.cli.common import CliError, add_server_options, open_local_services, print_line
from app.client import ActivityClient, ActivityError, Reset

__all__ = ["register"]

ENDINGS = ("complete", "failed")


def _scope(values: list[str]) -> str | list[str]:
    if len(values) == 1 and values[0] in ("untagged", "all"):
        return values[0]
    return values


def _show(envelope: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_line(msgspec.json.encode(envelope).decode())
        return
    if envelope["event"] == "heartbeat":
        return
    payload = envelope.get("payload") or {}
    progress = payload.get("progress")
    mark = f"[{progress:>4.0%}]" if isinstance(progress, (int, float)) else "[    ]"
    print_line(f"{mark} {envelope['event']}: {payload.get('message', '')}")


def _outcome(envelope: dict[str, Any]) -> int:
    """0 when the run completed and no item failed; 1 otherwise."""
    if envelope["event"] != "complete":
        return 1
    result = (envelope.get("payload") or {}).get("result") or {}
    return 1 if result.get("failed") else 0


async def _run_remote(args: argparse.Namespace, scope: str | list[str]) -> int:
    async with ActivityClient(args.server, args.token) as client:
        try:
            run = await client.start_run(args.agents, scope)
            print_line(f"run {run['source_id']}")
            async for item in client.stream(run["stream_url"]):
                if isinstance(item, Reset):
                    continue
                _show(item.data, args.json)
                if item.event in ENDINGS and item.data["source_id"] == run["source_id"]:
                    return _outcome(item.data)
        except ActivityError as exc:
            raise CliError(exc.message) from None
    raise CliError("the run's stream ended before the run did")


async def _local_events(services: Any, run_id: str) -> AsyncIterator[dict[str, Any]]:
    from app.eventlog import EventFilter, replay_then_tail

    only = EventFilter(streams=("agent",), source_ids=(run_id,))
    async for entries in replay_then_tail(services.store, 0, only):
        for entry in entries:
            yield msgspec.json.decode(entry.envelope_json())


async def _run_local(args: argparse.Namespace, scope: str | list[str]) -> int:
    from app.agents.coordinator import InvalidRun

    async with open_local_services() as services:
        try:
            run_id = await services.runs.start_run(args.agents, scope, {"requested": "cli"})
        except InvalidRun as exc:
            raise CliError(str(exc), code=2) from None
        services.jobs.wake()
        print_line(f"run {run_id}")
        async for envelope in _local_events(services, run_id):
            _show(envelope, args.json)
            if envelope["event"] in ENDINGS:
                return _outcome(envelope)
    raise AssertionError("unreachable: a tail never ends")


def _agents_run(args: argparse.Namespace) -> int:
    scope = _scope(args.scope)
    return asyncio.run(_run_remote(args, scope) if args.server else _run_local(args, scope))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agents = commands.add_parser(
        "agents", help="run agents over stored content", description="Agent runs."
    )
    agent_commands = agents.add_subparsers(dest="agents_command", required=True, metavar="COMMAND")
    run = agent_commands.add_parser(
        "run",
        help="run agents over stored content and follow the run",
        description="Start a coordinator run of the named agents (tagger, summarizer) over "
        "the scope and follow it to its end. Exit status 0 when every item was processed or "
        "skipped, 1 when the run or any item failed.",
    )
    run.add_argument("agents", nargs="+", metavar="AGENT", help="e.g. tagger, summarizer")
    run.add_argument(
        "--scope",
        nargs="+",
        default=["untagged"],
        metavar="SCOPE",
        help="untagged (default: content the agents have not processed), all, or content "
        "ids like video:<id> article:<key>",
    )
    run.add_argument("--json", action="store_true", help="print the run's events as JSON lines")
    add_server_options(run, "the run executes in this process on the local database")
    run.set_defaults(handler=_agents_run)
