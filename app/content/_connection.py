"""Connections to SurrealDB for the content store: the lock on an embedded path, opening a
connection with its schema in place, and running statements.

SurrealKV takes no lock of its own, so two processes opening one path would each write their
own view of it and silently diverge: an embedded path is locked for its one opener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import websockets.exceptions
from surrealdb import (
    AsyncEmbeddedSurrealConnection,
    AsyncHttpSurrealConnection,
    AsyncSurreal,
    AsyncWsSurrealConnection,
    ServerError,
    SurrealError,
)
from surrealdb.errors import parse_query_error, parse_rpc_error

from app.config import ContentSettings
from app.content.schema import SCHEMA

__all__ = [
    "CONFLICT_ATTEMPTS",
    "STORE_ERRORS",
    "Connection",
    "ContentStoreLocked",
    "ContentUnavailable",
    "PathLock",
    "close_connection",
    "connect",
    "is_conflict",
    "local_path",
    "lock_local_path",
    "redacted",
    "retry_delay",
    "run_statements",
    "statements",
]

# Engines that keep their data in a local path.
_LOCAL_SCHEMES: Final = ("surrealkv://", "surrealkv+versioned://", "file://")
_REMOTE_SCHEMES: Final = ("ws://", "wss://", "http://", "https://")
CONFLICT_ATTEMPTS: Final = 10
_CONFLICT_BASE_SECONDS: Final = 0.002

# What a broken connection or a failed statement raises, from the SDK, the network or the
# embedded engine.
STORE_ERRORS: Final = (
    SurrealError,
    OSError,
    websockets.exceptions.WebSocketException,
    aiohttp.ClientError,
)

Connection = AsyncEmbeddedSurrealConnection | AsyncWsSurrealConnection | AsyncHttpSurrealConnection


class ContentStoreLocked(RuntimeError):
    """Another process (or another store in this one) holds the local content store path."""


class ContentUnavailable(RuntimeError):
    """The content store cannot be reached or did not answer."""


@dataclass
class PathLock:
    path: Path
    fd: int

    def release(self) -> None:
        try:
            # A later holder writes its own pid; an empty file never names a stale one.
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def local_path(url: str) -> str | None:
    for scheme in _LOCAL_SCHEMES:
        if url.startswith(scheme):
            path = url[len(scheme) :].split("?", 1)[0]
            if not path:
                raise ValueError(f"SURREALDB_URL {url!r} names no path")
            return path
    return None


def _lock_path(path: str) -> PathLock:
    """Take an exclusive, non-blocking lock on ``<path>.lock`` and write our pid into it.

    ``flock`` locks belong to the open file, so a second opener in this same process is
    refused too, and the kernel drops the lock when the holder dies, however it dies.
    """
    data_path = Path(path)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = data_path.with_name(data_path.name + ".lock")
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise ContentStoreLocked(_locked_message(path, holder)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return PathLock(lock_file, fd)


def lock_local_path(url: str) -> PathLock | None:
    """The lock on ``url``'s local path, None for a store that has no path."""
    path = local_path(url)
    if path is None:
        return None
    # A non-blocking flock and a few bytes on a local file: no thread needed, and none
    # that could take the lock after a cancelled open() stopped waiting for it.
    try:
        return _lock_path(path)
    except OSError as exc:
        raise ContentUnavailable(f"content store {path} cannot be opened: {exc}") from exc


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _locked_message(path: str, pid: int | None) -> str:
    if pid == os.getpid():
        holder = f"is already open in this process (pid {pid})"
        advice = "close the other store first or set SURREALDB_URL to another path"
    else:
        who = f" (pid {pid})" if pid is not None else ""
        holder = f"is in use by another process{who}"
        advice = "stop it or set SURREALDB_URL to another path"
    return f"content store {path} {holder}; {advice}"


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


async def connect(settings: ContentSettings) -> Connection:
    """A connection, signed in when a user and password are set, with namespace, database
    and schema in place; :class:`ContentUnavailable` when the database cannot be reached."""
    url = settings.surrealdb_url
    db: Connection | None = None
    try:
        db = AsyncSurreal(url)
        if not isinstance(db, AsyncHttpSurrealConnection):
            await db.connect()
        if url.startswith(_REMOTE_SCHEMES) and settings.user and settings.password:
            await db.signin({"username": settings.user, "password": settings.password})
        await db.use(settings.namespace, settings.database)
        await _define_schema(db)
    except BaseException as exc:
        if db is not None:
            with contextlib.suppress(*STORE_ERRORS, NotImplementedError):
                await close_connection(db)
        if isinstance(exc, STORE_ERRORS):
            raise ContentUnavailable(
                f"content store {redacted(url)} is unavailable: {exc}"
            ) from exc
        raise
    return db


async def _define_schema(db: Connection) -> None:
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            await run_statements(db, SCHEMA, {})
            return
        except ServerError as exc:
            # Instances starting together define the same things at once; one wins.
            if attempt == CONFLICT_ATTEMPTS or not is_conflict(exc):
                raise
            await asyncio.sleep(retry_delay(attempt))


def statements(statement: str, variables: dict[str, Any]) -> Callable[[Connection], Awaitable[Any]]:
    """An operation for :meth:`ContentStore._call` that runs ``statement``."""
    return lambda db: run_statements(db, statement, variables)


async def run_statements(
    db: Connection, statement: str, variables: dict[str, Any], *, every: bool = False
) -> Any:
    """Run every statement of ``statement``, raising the first error of any of them (the
    SDK's ``query`` reports only the first); the last one's result, or each one's."""
    response = await db.query_raw(statement, variables)
    if response.get("error") is not None:
        raise parse_rpc_error(response["error"])
    results = response.get("result")
    if not isinstance(results, list):
        raise SurrealError(f"no result for a query: {response!r}")
    for result in results:
        if isinstance(result, dict) and result.get("status") == "ERR":
            raise parse_query_error(result)
    values = [result.get("result") if isinstance(result, dict) else None for result in results]
    if every:
        return values
    return values[-1] if values else None


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ServerError) and "can be retried" in str(exc)


async def close_connection(db: Connection) -> None:
    # The HTTP client opens a session per request and has nothing to close.
    if not isinstance(db, AsyncHttpSurrealConnection):
        await db.close()


def retry_delay(attempt: int) -> float:
    """How long to wait before repeating a statement that lost a write conflict."""
    return random.uniform(0, _CONFLICT_BASE_SECONDS * 2**attempt)
