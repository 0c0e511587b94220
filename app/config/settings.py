"""Configuration, read once from the environment (and an optional ``.env`` file).

One settings class per concern; :func:`load_settings` builds them all from a mapping so that
tests and the command line can pass their own environment without touching ``os.environ``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Literal

import msgspec
from sqlalchemy.exc import ArgumentError

from app.backends import check_database
from app.config.retention import RetentionRule, parse_rule

__all__ = [
    "AgentSettings",
    "AuditSettings",
    "ContentSettings",
    "DatabaseSettings",
    "IngestSettings",
    "LimitsSettings",
    "RetentionSettings",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "get_settings",
    "load_settings",
    "read_env_file",
]


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""


class DatabaseSettings(msgspec.Struct, frozen=True):
    url: str = "sqlite+aiosqlite:///./data/events.db"
    # Connections per process for reads and projections; the append path uses its own.
    pool_size: int = 10
    # The longest a group-committed batch may grow, in events.
    max_batch_events: int = 2000
    # How long an append waits for SQLite's write lock (held by another process) before it
    # is refused with a 503.
    busy_timeout_seconds: float = 10.0
    # Where a SQLite log's appends are written: "process" (a child process of their own) or
    # "thread" (a thread of the service's process, sharing its GIL).
    sqlite_appender: str = "process"
    # Every append carries its chain value (app/events/chain.py); off only to measure what
    # the chain costs. Events appended with it off get theirs when an appender with it on
    # next appends.
    audit_chain: bool = True
    # PostgreSQL: a commit's rows travel in its NOTIFY, so other instances' feeds take them
    # without reading the table (app/backends/postgres/notifications.py); off: the NOTIFY
    # only names the newest position, and they read the table.
    notify_events: bool = True


class ServerSettings(msgspec.Struct, frozen=True):
    heartbeat_seconds: float = 15.0
    # The first SSE frame's ``retry:`` hint, in milliseconds.
    retry_ms: int = 3000
    # A write to an SSE subscriber that takes longer than this ends the stream.
    write_timeout_seconds: float = 5.0
    # How often a tail re-reads the table when no wake-up arrives (lost NOTIFY, other writers).
    poll_seconds: float = 1.0
    # "text": readable lines; "json": one JSON object per line (for log collectors).
    log_format: Literal["text", "json"] = "text"
    # The HTTP server ``serve`` runs the application under (``serve --server`` overrides it).
    http_server: Literal["uvicorn", "granian"] = "uvicorn"
    # Answer the append endpoints in front of the router (app/api/direct.py); off: routed.
    direct_appends: bool = True
    # Write SSE streams with the lean transport (app/api/sse/lean.py); off: a task group.
    lean_streams: bool = True
    # Write caught-up SSE subscribers' frames in one pass per commit, straight to their
    # connections (app/api/sse/fanout.py); off: each subscriber's task writes its own.
    fanout: bool = True
    # A connection must send a complete request head within this long of opening (or of
    # its previous response), or it is closed.
    header_timeout_seconds: float = 10.0
    # A keep-alive connection idle this long after a response is closed.
    keepalive_timeout_seconds: float = 5.0
    # Open connections per process; None: the descriptor limit less a reserve
    # (app/server/connections.py says what happens at the ceiling).
    max_connections: int | None = None


class SecuritySettings(msgspec.Struct, frozen=True):
    # Bearer tokens for every write endpoint; none: writes are open.
    api_tokens: tuple[str, ...] = ()
    # Bearer tokens for every read endpoint (an API token reads too); none: reads are open.
    read_tokens: tuple[str, ...] = ()
    # Origins allowed to call the API from a browser; none: same-origin only; "*": any.
    cors_origins: tuple[str, ...] = ()


class LimitsSettings(msgspec.Struct, frozen=True):
    # A request body larger than this is refused with 413.
    max_body_bytes: int = 1024 * 1024
    # One event's payload (compact JSON) larger than this is refused with 413.
    max_payload_bytes: int = 64 * 1024
    # Concurrent SSE connections per instance; one more gets 503 with Retry-After.
    sse_max_connections: int = 10_000


class IngestSettings(msgspec.Struct, frozen=True):
    # Ingest jobs run at once per instance.
    concurrency: int = 4
    # Allow article URLs that resolve to loopback/private/link-local addresses.
    allow_private_urls: bool = False
    youtube_proxy_url: str | None = None
    # Transcript language preference, most wanted first; any other language comes last.
    transcript_languages: tuple[str, ...] = ("en",)
    # Per HTTP request (connect, read) to YouTube or an article site.
    http_timeout_seconds: float = 15.0
    # A whole transcript fetch, retries excluded.
    transcript_timeout_seconds: float = 60.0
    max_article_bytes: int = 10 * 1024 * 1024
    # Attempts at a transcript, channel listing or article whose failure is retryable
    # (blocked, request failed, timeout), with exponential backoff.
    retry_attempts: int = 3
    retry_base_seconds: float = 2.0
    # A job's claim expires this long after its last renewal; another instance may then take
    # the job over.
    lease_seconds: float = 30.0
    # A whole channel listing: yt-dlp gets this long, then the RSS fallback as long again.
    channel_timeout_seconds: float = 120.0
    # A whole article fetch, redirects included; text extraction gets as long again.
    article_timeout_seconds: float = 60.0


class ContentSettings(msgspec.Struct, frozen=True):
    surrealdb_url: str = "surrealkv://./data/content"
    namespace: str = "activity"
    database: str = "activity"
    user: str | None = None
    password: str | None = None
    archive_dir: str = "./data/archive"


class AgentSettings(msgspec.Struct, frozen=True):
    # Run the tagger and summarizer over each successfully ingested video or article.
    auto_run: bool = True
    # Coordinator runs executed at once per instance.
    run_concurrency: int = 2


class RetentionSettings(msgspec.Struct, frozen=True):
    # STREAM[/EVENT]=AGE rules (app/config/retention.py); none: every event is kept.
    rules: tuple[str, ...] = ()
    # Where expired events are archived (segments and their manifests) before they are
    # removed from the table.
    archive_dir: str = "./data/log-archive"
    # How often the rules are applied.
    interval_seconds: float = 60.0
    # Events archived per segment (one file, one manifest).
    batch_events: int = 10_000
    # A segment's rows are removed this many at a time, each few in a short transaction of
    # the log's writer: appends wait for one of them at most.
    delete_rows: int = 100
    # A projection snapshot is taken once its checkpoint has moved this many events past its
    # newest snapshot (and after a purge removed events it has folded); 0: only on demand.
    snapshot_every_events: int = 100_000
    # Snapshots kept per projection, newest first.
    snapshots_kept: int = 3

    def parsed_rules(self) -> list[RetentionRule]:
        return [parse_rule(rule) for rule in self.rules]


class AuditSettings(msgspec.Struct, frozen=True):
    # The Ed25519 key checkpoints are signed with (app/audit/keys.py says the forms); none:
    # no checkpoints are written.
    signing_key: str | None = None
    # How often a signed checkpoint of the head is appended.
    checkpoint_seconds: float = 3600.0


class Settings(msgspec.Struct, frozen=True):
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    ingest: IngestSettings = msgspec.field(default_factory=IngestSettings)
    content: ContentSettings = msgspec.field(default_factory=ContentSettings)
    agents: AgentSettings = msgspec.field(default_factory=AgentSettings)
    security: SecuritySettings = msgspec.field(default_factory=SecuritySettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    retention: RetentionSettings = msgspec.field(default_factory=RetentionSettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)


# Environment variable -> (section, field). Unlisted variables are ignored.
_ENV_FIELDS: dict[str, tuple[str, str]] = {
    "DATABASE_URL": ("database", "url"),
    "DATABASE_POOL_SIZE": ("database", "pool_size"),
    "APPEND_MAX_BATCH": ("database", "max_batch_events"),
    "SQLITE_BUSY_TIMEOUT_SECONDS": ("database", "busy_timeout_seconds"),
    "SQLITE_APPENDER": ("database", "sqlite_appender"),
    "AUDIT_CHAIN": ("database", "audit_chain"),
    "NOTIFY_EVENTS": ("database", "notify_events"),
    "HEARTBEAT_SECONDS": ("server", "heartbeat_seconds"),
    "SSE_RETRY_MS": ("server", "retry_ms"),
    "SSE_WRITE_TIMEOUT_SECONDS": ("server", "write_timeout_seconds"),
    "TAIL_POLL_SECONDS": ("server", "poll_seconds"),
    "LOG_FORMAT": ("server", "log_format"),
    "HTTP_SERVER": ("server", "http_server"),
    "DIRECT_APPENDS": ("server", "direct_appends"),
    "SSE_LEAN_STREAMS": ("server", "lean_streams"),
    "SSE_FANOUT": ("server", "fanout"),
    "REQUEST_HEADER_TIMEOUT_SECONDS": ("server", "header_timeout_seconds"),
    "KEEPALIVE_TIMEOUT_SECONDS": ("server", "keepalive_timeout_seconds"),
    "MAX_CONNECTIONS": ("server", "max_connections"),
    "INGEST_CONCURRENCY": ("ingest", "concurrency"),
    "INGEST_ALLOW_PRIVATE_URLS": ("ingest", "allow_private_urls"),
    "YOUTUBE_PROXY_URL": ("ingest", "youtube_proxy_url"),
    "TRANSCRIPT_LANGUAGES": ("ingest", "transcript_languages"),
    "INGEST_HTTP_TIMEOUT_SECONDS": ("ingest", "http_timeout_seconds"),
    "TRANSCRIPT_TIMEOUT_SECONDS": ("ingest", "transcript_timeout_seconds"),
    "INGEST_MAX_ARTICLE_BYTES": ("ingest", "max_article_bytes"),
    "INGEST_RETRY_ATTEMPTS": ("ingest", "retry_attempts"),
    "INGEST_RETRY_BASE_SECONDS": ("ingest", "retry_base_seconds"),
    "INGEST_LEASE_SECONDS": ("ingest", "lease_seconds"),
    "CHANNEL_TIMEOUT_SECONDS": ("ingest", "channel_timeout_seconds"),
    "ARTICLE_TIMEOUT_SECONDS": ("ingest", "article_timeout_seconds"),
    "SURREALDB_URL": ("content", "surrealdb_url"),
    "SURREALDB_NAMESPACE": ("content", "namespace"),
    "SURREALDB_DATABASE": ("content", "database"),
    "SURREALDB_USER": ("content", "user"),
    "SURREALDB_PASS": ("content", "password"),
    "ARCHIVE_DIR": ("content", "archive_dir"),
    "AGENTS_AUTO_RUN": ("agents", "auto_run"),
    "AGENT_RUN_CONCURRENCY": ("agents", "run_concurrency"),
    "API_TOKENS": ("security", "api_tokens"),
    "READ_TOKENS": ("security", "read_tokens"),
    "CORS_ORIGINS": ("security", "cors_origins"),
    # The contract's name for it; when both are set, this one wins.
    "CORS_ALLOW_ORIGINS": ("security", "cors_origins"),
    "REQUEST_MAX_BODY_BYTES": ("limits", "max_body_bytes"),
    "EVENT_MAX_PAYLOAD_BYTES": ("limits", "max_payload_bytes"),
    "SSE_MAX_CONNECTIONS": ("limits", "sse_max_connections"),
    "RETENTION_RULES": ("retention", "rules"),
    "LOG_ARCHIVE_DIR": ("retention", "archive_dir"),
    "RETENTION_INTERVAL_SECONDS": ("retention", "interval_seconds"),
    "RETENTION_BATCH_EVENTS": ("retention", "batch_events"),
    "RETENTION_DELETE_ROWS": ("retention", "delete_rows"),
    "SNAPSHOT_EVERY_EVENTS": ("retention", "snapshot_every_events"),
    "SNAPSHOTS_KEPT": ("retention", "snapshots_kept"),
    "AUDIT_SIGNING_KEY": ("audit", "signing_key"),
    "AUDIT_CHECKPOINT_SECONDS": ("audit", "checkpoint_seconds"),
}

# Comma-separated variables, read as tuples.
_LIST_FIELDS = {
    "TRANSCRIPT_LANGUAGES",
    "API_TOKENS",
    "READ_TOKENS",
    "CORS_ORIGINS",
    "CORS_ALLOW_ORIGINS",
    "RETENTION_RULES",
}

# A token travels in an Authorization header or a query string: printable ASCII, no blanks.
_TOKEN = re.compile(r"[\x21-\x7e]+")
# What a browser sends as Origin: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines of a ``.env`` file; ``#`` comments and blank lines are skipped."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``environ`` (default: ``.env`` overlaid by the process environment)."""
    if environ is None:
        environ = {**read_env_file(Path(".env")), **os.environ}
    sections: dict[str, dict[str, str | list[str]]] = {}
    for name, (section, field) in _ENV_FIELDS.items():
        value = environ.get(name)
        if value is not None and value != "":
            parsed: str | list[str] = value
            if name in _LIST_FIELDS:
                parsed = [item.strip() for item in value.split(",") if item.strip()]
            sections.setdefault(section, {})[field] = parsed
    try:
        settings = msgspec.convert(sections, type=Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid configuration: {_env_name(str(exc))}") from exc
    _check(settings)
    return settings


def _check_audit(audit: AuditSettings) -> None:
    seconds = audit.checkpoint_seconds
    if not (math.isfinite(seconds) and seconds > 0):
        raise SettingsError(
            f"AUDIT_CHECKPOINT_SECONDS must be a number of seconds greater than 0, got {seconds}"
        )
    if audit.signing_key is not None:
        from app.audit.keys import InvalidKey, load_private_key

        try:
            load_private_key(audit.signing_key)
        except InvalidKey as exc:
            raise SettingsError(str(exc)) from None


def _env_name(message: str) -> str:
    # msgspec names the failing field as `$.section.field`; say which variable that is.
    for name, (section, field) in _ENV_FIELDS.items():
        message = message.replace(f"`$.{section}.{field}`", name)
    return message


def _check(settings: Settings) -> None:
    try:
        check_database(settings.database)
    except ArgumentError:
        # Not the URL itself in these messages: it may hold a password.
        raise SettingsError("DATABASE_URL is not a valid database URL") from None
    except ValueError as exc:
        raise SettingsError(_database_url_problem(exc)) from None
    server = settings.server
    # NaN and infinity parse as floats, but no period or timeout can be either.
    for name, seconds in (
        ("HEARTBEAT_SECONDS", server.heartbeat_seconds),
        ("SSE_WRITE_TIMEOUT_SECONDS", server.write_timeout_seconds),
        ("TAIL_POLL_SECONDS", server.poll_seconds),
        ("REQUEST_HEADER_TIMEOUT_SECONDS", server.header_timeout_seconds),
        ("KEEPALIVE_TIMEOUT_SECONDS", server.keepalive_timeout_seconds),
    ):
        if not (math.isfinite(seconds) and seconds > 0):
            raise SettingsError(f"{name} must be a number of seconds greater than 0, got {seconds}")
    if server.max_connections is not None and server.max_connections < 1:
        raise SettingsError(f"MAX_CONNECTIONS must be at least 1, got {server.max_connections}")
    if server.retry_ms < 0:
        raise SettingsError(f"SSE_RETRY_MS must be 0 or more, got {server.retry_ms}")
    if settings.database.pool_size < 1:
        raise SettingsError(
            f"DATABASE_POOL_SIZE must be at least 1, got {settings.database.pool_size}"
        )
    if settings.database.max_batch_events < 1:
        raise SettingsError("APPEND_MAX_BATCH must be at least 1")
    busy = settings.database.busy_timeout_seconds
    if not (math.isfinite(busy) and busy >= 0):
        raise SettingsError(f"SQLITE_BUSY_TIMEOUT_SECONDS must be 0 or more seconds, got {busy}")
    _check_security(settings.security)
    _check_retention(settings.retention)
    _check_audit(settings.audit)
    limits = settings.limits
    for name, value, least in (
        ("REQUEST_MAX_BODY_BYTES", limits.max_body_bytes, 1024),
        ("EVENT_MAX_PAYLOAD_BYTES", limits.max_payload_bytes, 256),
        ("SSE_MAX_CONNECTIONS", limits.sse_max_connections, 1),
    ):
        if value < least:
            raise SettingsError(f"{name} must be at least {least}, got {value}")


def _check_retention(retention: RetentionSettings) -> None:
    seen: dict[tuple[str, str], str] = {}
    for text in retention.rules:
        try:
            rule = parse_rule(text)
        except ValueError as exc:
            raise SettingsError(f"RETENTION_RULES: {exc}") from None
        key = (rule.stream, rule.event)
        if key in seen:
            raise SettingsError(f"RETENTION_RULES: {text!r} and {seen[key]!r} name the same events")
        seen[key] = text
    seconds = retention.interval_seconds
    if not (math.isfinite(seconds) and seconds > 0):
        raise SettingsError(
            f"RETENTION_INTERVAL_SECONDS must be a number of seconds greater than 0, got {seconds}"
        )
    for name, value, least in (
        ("RETENTION_BATCH_EVENTS", retention.batch_events, 1),
        ("RETENTION_DELETE_ROWS", retention.delete_rows, 1),
        ("SNAPSHOT_EVERY_EVENTS", retention.snapshot_every_events, 0),
        ("SNAPSHOTS_KEPT", retention.snapshots_kept, 1),
    ):
        if value < least:
            raise SettingsError(f"{name} must be at least {least}, got {value}")


def _database_url_problem(exc: ValueError) -> str:
    message = str(exc)
    # make_url's words for a port that is not a number, say.
    if message.startswith("DATABASE_URL"):
        return message
    return f"DATABASE_URL is not a valid database URL: {message}"


def _check_security(security: SecuritySettings) -> None:
    # Never the token itself in these messages: they end up in logs.
    for name, tokens in (
        ("API_TOKENS", security.api_tokens),
        ("READ_TOKENS", security.read_tokens),
    ):
        for index, token in enumerate(tokens, start=1):
            if not _TOKEN.fullmatch(token):
                raise SettingsError(
                    f"{name}: token {index} holds a character other than printable ASCII "
                    "(no spaces)"
                )
    for origin in security.cors_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise SettingsError(
                "CORS_ORIGINS must hold * or origins like https://example.com[:port] "
                f"(no path, no trailing slash), got {origin!r}"
            )


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
