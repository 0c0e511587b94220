"""The content store: ingested videos, channels and articles as SurrealDB records.

Records are ``video:<video_id>``, ``channel:<channel_id>`` and ``article:<url hash>``. Every
statement addresses them through ``RecordID`` values and query parameters: the SDK pastes a
string resource into the statement unescaped, so a key is never formatted into SurrealQL.
Opening the store defines its schema (:mod:`app.content.schema`). Storing a video or an
article writes its search document in the same transaction, and a record stored with an
``ingested_at`` gets its place in the listing there too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from surrealdb import Duration, RecordID, ServerError, Table

from app.config import ContentSettings
from app.content._connection import (
    CONFLICT_ATTEMPTS,
    STORE_ERRORS,
    Connection,
    ContentStoreLocked,
    ContentUnavailable,
    PathLock,
    close_connection,
    connect,
    is_conflict,
    local_path,
    lock_local_path,
    redacted,
    retry_delay,
    run_statements,
    statements,
)
from app.content.schema import DOCUMENT, LISTING, SEARCHABLE, listing_key

__all__ = [
    "TABLES",
    "ContentStore",
    "ContentStoreLocked",
    "ContentUnavailable",
    "article_key",
    "normalize_article_url",
]

TABLES: Final = frozenset({"video", "channel", "article"})

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_HEALTH_TIMEOUT_SECONDS: Final = 5.0
# A lost connection (a server restarted) is opened again on the next call, at most this often.
_RECONNECT_SECONDS: Final = 1.0


def normalize_article_url(url: str) -> str:
    """``url`` without surrounding blanks or ``#fragment``, with scheme and host in lower case.

    Path and query keep their case: servers may treat them as case-sensitive.
    """
    parts = urlsplit(url.strip())
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{hostport.lower()}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, parts.query, ""))


def article_key(url: str) -> str:
    """The record key of an article: the first 32 hex digits of sha256(normalized URL)."""
    normalized = normalize_article_url(url)
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:32]


def _check_table(table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"unknown content table {table!r}; expected one of {sorted(TABLES)}")
    return table


def _record_id(table: str, key: str) -> RecordID:
    _check_table(table)
    if not isinstance(key, str) or not key:
        raise ValueError(f"a record key must be a non-empty string, got {key!r}")
    return RecordID(table, key)


def _to_plain(value: Any) -> Any:
    """SurrealDB values as JSON-able Python: record ids as ``table:key``, times as ISO 8601."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(name): _to_plain(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(item) for item in value]
    if isinstance(value, RecordID):
        key = value.id if isinstance(value.id, str) else _to_plain(value.id)
        return f"{value.table_name}:{key}"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Duration):
        return value.to_string()
    if isinstance(value, Table):
        return value.table_name
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _one(result: Any) -> dict[str, Any] | None:
    if isinstance(result, list):
        result = result[0] if result else None
    if isinstance(result, dict):
        plain: dict[str, Any] = _to_plain(result)
        return plain
    return None


def _content(record: dict[str, Any]) -> dict[str, Any]:
    # The record id is the address; a stored copy's "id" (a string after _to_plain) would
    # contradict it and make SurrealDB refuse the statement.
    return {name: value for name, value in record.items() if name != "id"}


class _RecordLocks:
    """One asyncio lock per record, held only while someone is waiting for or holding it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, record_id: RecordID) -> AsyncIterator[None]:
        key = (record_id.table_name, str(record_id.id))
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class ContentStore:
    """One connection to SurrealDB (embedded or a server) and, for a local path, its lock.

    Values of ``None`` are stored as SurrealDB ``NONE``, which means "no such field": a field
    put or merged as ``None`` is absent from what :meth:`get` returns, and
    ``query_table(where_missing=...)`` finds it.
    """

    def __init__(
        self,
        db: Connection,
        url: str,
        lock: PathLock | None,
        settings: ContentSettings | None = None,
    ) -> None:
        self._db: Connection | None = db
        self._url = url
        self._lock = lock
        self._settings = settings
        # Set when the connection failed (not a statement): the next call opens a new one.
        self._lost: str | None = None
        self._reconnected_at = 0.0
        self._reconnecting = asyncio.Lock()
        # Writes to one record wait for each other: with concurrent merges into one record,
        # the embedded SurrealKV engine (SDK 2.0) was seen to drop one that reported success.
        self._writing = _RecordLocks()

    @property
    def url(self) -> str:
        return redacted(self._url)

    @classmethod
    async def open(cls, settings: ContentSettings) -> ContentStore:
        """Connect, sign in when a user and password are set, and select namespace/database.

        Raises :class:`ContentStoreLocked` when another opener holds a local path, and
        :class:`ContentUnavailable` when the database cannot be reached.
        """
        url = settings.surrealdb_url
        lock = lock_local_path(url)
        try:
            db = await connect(settings)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        store = cls(db, url, lock, settings)
        try:
            await store._index_earlier_records()
        except BaseException:
            await store.close()
            raise
        return store

    async def _index_earlier_records(self) -> None:
        """List and index the records stored before the store kept a listing and search
        documents; once, then the schema version says it is done."""
        (version,) = await self.read("read the schema version", _VERSION_STATEMENT, {})
        if isinstance(version, int) and version >= _SCHEMA_VERSION:
            return
        if version == 1:
            await self._index_segments()
        else:
            await self._index_records()
        await self._call(
            "write the schema version",
            lambda db: db.query(
                "UPSERT content_meta:schema SET version = $version", {"version": _SCHEMA_VERSION}
            ),
        )

    async def _index_segments(self) -> None:
        """Version 2: each video's search document learns where its segments start."""
        (items,) = await self.read("list videos", "SELECT VALUE id FROM video", {})
        for item in items or []:
            key = str(item).partition(":")[2]
            record = await self.get("video", key)
            if record is None:
                continue
            variables = {
                "document": RecordID(DOCUMENT, ["video", key]),
                "index": _segment_index(record.get("segments")),
            }
            await self._call(
                f"index video {key!r}",
                statements("UPDATE $document SET segment_index = $index", variables),
            )

    async def _index_records(self) -> None:
        for table in sorted(TABLES):
            (items,) = await self.read(
                f"list {table} records",
                "SELECT VALUE id FROM type::table($table)",
                {"table": table},
            )
            for item in items or []:
                key = str(item).partition(":")[2]
                record = await self.get(table, key)
                if record is None:
                    continue
                content = _content(record)
                variables = {
                    "listed": _listing_id(content.get("ingested_at"), f"{table}:{key}"),
                    "entry": _entry(table, key, content),
                    **_document(table, key, content),
                }
                await self._call(f"index {table} {key!r}", statements(_INDEX_STATEMENT, variables))

    @staticmethod
    def missing(settings: ContentSettings) -> str | None:
        """The local path of an embedded store that has not been created yet, else None:
        reading commands must not create an empty store where none was."""
        path = local_path(settings.surrealdb_url)
        return path if path is not None and not Path(path).exists() else None

    @staticmethod
    def check_not_in_use(settings: ContentSettings) -> None:
        """Raise :class:`ContentStoreLocked` as :meth:`open` would, if another opener holds
        the local path now, without opening the database (the lock is taken and let go)."""
        lock = lock_local_path(settings.surrealdb_url)
        if lock is not None:
            lock.release()

    async def close(self) -> None:
        """Close the connection and release the path lock; closing twice is harmless."""
        db, self._db = self._db, None
        lock, self._lock = self._lock, None
        try:
            if db is not None:
                await close_connection(db)
        finally:
            if lock is not None:
                lock.release()

    async def health(self) -> None:
        """Raise :class:`ContentUnavailable` unless a trivial query answers in time."""
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_SECONDS):
                db = await self._connected()
                answer = await db.query("RETURN $probe", {"probe": 1})
        except TimeoutError:
            raise ContentUnavailable(
                f"content store {self.url} did not answer within {_HEALTH_TIMEOUT_SECONDS:g} s"
            ) from None
        except STORE_ERRORS as exc:
            self._note_lost(exc)
            raise ContentUnavailable(f"content store {self.url} failed: {exc}") from exc
        if answer != 1:
            raise ContentUnavailable(f"content store {self.url} answered {answer!r} to a probe")

    async def get(self, table: str, key: str) -> dict[str, Any] | None:
        record_id = _record_id(table, key)
        result = await self._call(f"read {_describe(record_id)}", lambda db: db.select(record_id))
        return _one(result)

    async def exists(self, table: str, key: str) -> bool:
        record_id = _record_id(table, key)
        # Only the id, so that a large transcript is not shipped just to be discarded.
        result = await self._call(
            f"read {_describe(record_id)}",
            lambda db: db.query("SELECT VALUE id FROM $record", {"record": record_id}),
        )
        return bool(result)

    async def put(self, table: str, key: str, record: dict[str, Any]) -> dict[str, Any]:
        """Create or replace the whole record; returns it as stored.

        A record with an ``ingested_at`` (ISO 8601) is listed under that time, in the same
        transaction that writes it; its place under an earlier time is let go.
        """
        record_id = _record_id(table, key)
        content = _content(record)
        item = f"{table}:{key}"
        listed = _listing_id(content.get("ingested_at"), item)
        async with self._writing.hold(record_id):
            previous = await self._call(
                f"read {_describe(record_id)}",
                lambda db: db.query("SELECT VALUE ingested_at FROM $record", {"record": record_id}),
            )
            earlier = previous[0] if isinstance(previous, list) and previous else None
            unlisted = _listing_id(earlier, item)
            variables = {
                "record": record_id,
                "content": content,
                "unlisted": unlisted if unlisted != listed else None,
                "listed": listed,
                "entry": _entry(table, key, content),
                **_document(table, key, content),
            }
            result = await self._call(
                f"write {_describe(record_id)}",
                lambda db: run_statements(db, _PUT_STATEMENT, variables),
            )
        stored = _one(result)
        if stored is None:
            raise ContentUnavailable(
                f"content store {self.url} stored nothing for {_describe(record_id)}"
            )
        return stored

    async def merge(self, table: str, key: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Set ``fields`` on an existing record (``None`` removes a field) and return it;
        ``None`` if the record does not exist, which is then not created."""
        record_id = _record_id(table, key)
        content = _content(fields)
        async with self._writing.hold(record_id):
            result = await self._call(
                f"write {_describe(record_id)}", lambda db: db.merge(record_id, content)
            )
        return _one(result)

    async def query_table(
        self, table: str, *, where_missing: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` records of ``table``; with ``where_missing``, only those that lack
        that field (e.g. videos without ``tags``)."""
        _check_table(table)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        variables: dict[str, Any] = {"table": table, "limit": limit}
        statement = "SELECT * FROM type::table($table)"
        if where_missing is not None:
            if not _FIELD.fullmatch(where_missing):
                raise ValueError(
                    f"where_missing must be a field name like 'tags' or 'meta.summary', "
                    f"got {where_missing!r}"
                )
            variables["field"] = where_missing
            statement += " WHERE type::field($field) IS NONE"
        statement += " LIMIT $limit"
        result = await self._call(f"query {table}", lambda db: db.query(statement, variables))
        rows = result if isinstance(result, list) else []
        return [plain for plain in (_one(row) for row in rows) if plain is not None]

    async def read(self, action: str, statement: str, variables: dict[str, Any]) -> list[Any]:
        """The result of each statement of a read-only ``statement``, values made plain.

        ``statement`` is fixed text; everything a caller was given goes in ``variables``.
        """
        results = await self._call(
            action, lambda db: run_statements(db, statement, variables, every=True)
        )
        plain: list[Any] = _to_plain(results)
        return plain

    async def _connected(self) -> Connection:
        if self._db is None:
            raise ContentUnavailable(f"content store {self.url} is closed")
        if self._lost is not None:
            await self._reconnect()
        return self._db

    def _note_lost(self, exc: BaseException) -> None:
        # A statement the database refused leaves the connection as good as it was.
        if self._settings is not None and not isinstance(exc, ServerError):
            self._lost = str(exc) or type(exc).__name__

    async def _reconnect(self) -> None:
        """Open a new connection in place of a lost one, at most every _RECONNECT_SECONDS."""
        assert self._settings is not None
        async with self._reconnecting:
            if self._lost is None or self._db is None:
                return
            loop = asyncio.get_running_loop()
            wait = self._reconnected_at + _RECONNECT_SECONDS - loop.time()
            if wait > 0:
                raise ContentUnavailable(
                    f"content store {self.url} is unavailable: {self._lost}; "
                    f"reconnecting in {wait:.1f} s"
                )
            self._reconnected_at = loop.time()
            # The old connection goes first: an embedded path has one opener at a time.
            with contextlib.suppress(*STORE_ERRORS, NotImplementedError):
                await close_connection(self._db)
            try:
                self._db = await connect(self._settings)
            except ContentUnavailable as exc:
                self._lost = str(exc.__cause__ or exc)
                raise
            self._lost = None

    async def _call(self, action: str, operation: Callable[[Connection], Awaitable[Any]]) -> Any:
        db = await self._connected()
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await operation(db)
            except STORE_ERRORS as exc:
                if attempt < CONFLICT_ATTEMPTS and is_conflict(exc):
                    # Optimistic transactions: two writes to one record (or the first writes
                    # to a new table) at once make all but one fail; each is safe to repeat.
                    await asyncio.sleep(retry_delay(attempt))
                    continue
                self._note_lost(exc)
                raise ContentUnavailable(
                    f"content store {self.url} failed to {action}: {exc}"
                ) from exc
        raise AssertionError("unreachable")


# Writing a record and its listing entry is one transaction: a listed id always names a
# stored record, and a record is listed once, under its latest ingest time.
_PUT_STATEMENT: Final = """
BEGIN TRANSACTION;
IF $unlisted != NONE { DELETE $unlisted; };
IF $listed != NONE { UPSERT $listed CONTENT $entry; };
IF $document != NONE { UPSERT $document CONTENT $searchable; };
UPSERT ONLY $record CONTENT $content;
COMMIT TRANSACTION;
"""


# Records stored before version 1 have no listing entry or search document yet; search
# documents of version 1 have no segment index.
_SCHEMA_VERSION: Final = 2
_VERSION_STATEMENT: Final = "RETURN content_meta:schema.version"
_INDEX_STATEMENT: Final = """
BEGIN TRANSACTION;
IF $listed != NONE { UPSERT $listed CONTENT $entry; };
IF $document != NONE { UPSERT $document CONTENT $searchable; };
COMMIT TRANSACTION;
"""


def _entry(table: str, key: str, content: dict[str, Any]) -> dict[str, Any]:
    """A record's listing entry: the record, its type and when it was ingested."""
    return {"item": RecordID(table, key), "type": table, "ingested_at": content.get("ingested_at")}


def _document(table: str, key: str, content: dict[str, Any]) -> dict[str, Any]:
    """The search document of a record of a searchable table: its title and text."""
    field = SEARCHABLE.get(table)
    if field is None:
        return {"document": None, "searchable": None}
    title, body = content.get("title"), content.get(field)
    return {
        "document": RecordID(DOCUMENT, [table, key]),
        "searchable": {
            "item": RecordID(table, key),
            "type": table,
            "title": title if isinstance(title, str) else None,
            "body": body if isinstance(body, str) else None,
            "ingested_at": content.get("ingested_at"),
            "segment_index": _segment_index(content.get("segments")),
        },
    }


def _segment_index(segments: Any) -> str | None:
    """Where each transcript segment starts in the text and in the video, as one string of
    ``position:start:duration`` entries: a search hit finds its segment from it without
    reading (and decoding) the segments themselves. The text is the segments' texts joined
    by single spaces, empty ones left out."""
    if not isinstance(segments, list):
        return None
    entries = []
    position = 0
    for segment in segments:
        if not isinstance(segment, dict) or not isinstance(segment.get("text"), str):
            continue
        if not segment["text"] or not isinstance(segment.get("start"), int | float):
            continue
        duration = segment.get("duration") or 0
        entries.append(f"{position}:{segment['start']}:{duration}")
        position += len(segment["text"]) + 1
    return " ".join(entries)


def _listing_id(ingested_at: Any, item: str) -> RecordID | None:
    if not isinstance(ingested_at, str):
        return None
    try:
        return RecordID(LISTING, listing_key(ingested_at, item))
    except ValueError:
        return None


def _describe(record_id: RecordID) -> str:
    return f"{record_id.table_name} {record_id.id!r}"
