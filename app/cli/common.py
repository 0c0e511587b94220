"""What the commands share: errors, output, server options and the local database."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import msgspec

from app.config import get_settings

if TYPE_CHECKING:
    from app.runtime.services import Services

__all__ = [
    "CliError",
    "add_filter_options",
    "add_server_options",
    "check_local_database",
    "content_store_in_use",
    "describe_payload",
    "open_local_services",
    "open_local_store",
    "print_error",
    "print_line",
    "redacted",
]


class CliError(Exception):
    """A failure to report in one line (``error: …``) with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def print_line(text: str) -> None:
    # Flushed per line: a pipe (a script, a test) sees each event as it happens.
    print(text, flush=True)


def print_error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


def redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def add_server_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help=f"use a running service at URL (e.g. http://127.0.0.1:8000); without it, {what}",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("ACTIVITY_TOKEN") or None,
        help="bearer token for --server (default: $ACTIVITY_TOKEN)",
    )


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    for option, meaning in (
        ("--stream", "only this stream (repeatable), e.g. agent, ingest"),
        ("--source-id", "only this source (repeatable)"),
        ("--event", "only this event name (repeatable)"),
    ):
        parser.add_argument(option, action="append", default=[], metavar="NAME", help=meaning)


def check_local_database(url: str) -> None:
    """Reading commands must not create an empty database where none was."""
    from app.backends import backend_for

    missing = backend_for(url).missing()
    if missing is not None:
        raise CliError(
            f"{missing}: set DATABASE_URL to the service's database, or use --server URL"
        )


@asynccontextmanager
async def open_local_store() -> AsyncIterator[Any]:
    """The local log (``DATABASE_URL``) as an :class:`~app.eventlog.EventStore`, to read."""
    from app.database import create_engine
    from app.eventlog import EventStore

    settings = get_settings()
    check_local_database(settings.database.url)
    engine = create_engine(settings.database.url, pool_size=2)
    try:
        # Read from, not appended to: an appender on a thread idles, where a process would
        # start.
        reading = msgspec.structs.replace(settings.database, sqlite_appender="thread")
        store = await EventStore.open(engine, reading, poll_seconds=settings.server.poll_seconds)
        try:
            yield store
        finally:
            await store.close()
    finally:
        await engine.dispose()


@contextmanager
def content_store_in_use(advice: str = "", code: int = 1) -> Iterator[None]:
    """A content store held by another process, reported in one line (``error: content
    store PATH is in use by another process (pid N); …``, then ``advice``) with exit
    status ``code``."""
    from app.content import ContentStoreLocked

    try:
        yield
    except ContentStoreLocked as exc:
        raise CliError(f"{exc}{advice}", code=code) from None


@asynccontextmanager
async def open_local_services() -> AsyncIterator[Services]:
    """The service's parts in this process, on the local settings (jobs run here). A content
    store held by a running server is reported as such, with the way out."""
    from app.runtime.services import open_services

    with content_store_in_use(
        ". If that is a running server, use it instead with --server URL "
        "(e.g. --server http://127.0.0.1:8000)"
    ):
        async with open_services(get_settings()) as services:
            yield services


def describe_payload(payload: dict[str, Any]) -> str:
    """A payload in a few words: step, status, progress and message."""
    parts = [str(payload[key]) for key in ("step", "status") if payload.get(key)]
    progress = payload.get("progress")
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        parts.append(f"{progress:.0%}")
    if payload.get("message"):
        parts.append(str(payload["message"]))
    return " ".join(parts)
