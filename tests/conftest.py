"""Fixtures: every database test runs on SQLite, and on PostgreSQL when TEST_DATABASE_URL is
set (each test gets a database of its own, created and dropped around it)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from app.config import DatabaseSettings, Settings
from app.eventlog import EventStore
from app.runtime.services import Services, open_services
from tests.support import (
    InProcessServer,
    make_settings,
    open_store,
    running_server,
    sqlite_settings,
)

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
NO_POSTGRES = "PostgreSQL suite skipped: set TEST_DATABASE_URL (postgresql+asyncpg://…) to run it"


def postgres_params() -> list[object]:
    return [pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=["sqlite", *postgres_params()])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "postgres" and not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    return name


@pytest.fixture
def postgres_only() -> None:
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)


async def _admin(sql: str) -> None:
    import asyncpg

    from app.backends.postgres.appender import postgres_dsn

    connection = await asyncpg.connect(postgres_dsn(POSTGRES_URL))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def fresh_postgres_url() -> tuple[str, str]:
    name = f"activity_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    return url, name


async def drop_postgres_database(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
        return
    url, name = await fresh_postgres_url()
    try:
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture
async def other_database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A second fresh database on the same backend as ``database_url`` (an import's target)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'imported.db'}"
        return
    url, name = await fresh_postgres_url()
    try:
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture
async def postgres_url(postgres_only: None) -> AsyncIterator[str]:
    url, name = await fresh_postgres_url()
    try:
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, ARCHIVE_DIR=str(tmp_path / "archive"))


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with open_services(settings) as opened:
        yield opened


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[InProcessServer]:
    async with running_server(settings) as running:
        yield running


@pytest.fixture(params=["process", "thread"])
def appender(request: pytest.FixtureRequest) -> str:
    """Each SQLite appender: in a process of its own (the default), on a thread."""
    return str(request.param)


#: Every backend, and every way it has of appending: the log's contract holds for each.
LOG_BACKENDS = [
    "sqlite-process",
    "sqlite-thread",
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=LOG_BACKENDS)
async def log_settings(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseSettings]:
    """A fresh log's settings, for each of :data:`LOG_BACKENDS`."""
    name: str = request.param
    if name.startswith("sqlite-"):
        yield sqlite_settings(tmp_path, name.removeprefix("sqlite-"))
        return
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    url, database = await fresh_postgres_url()
    try:
        yield DatabaseSettings(url=url)
    finally:
        await drop_postgres_database(database)


@pytest.fixture
async def store(log_settings: DatabaseSettings) -> AsyncIterator[EventStore]:
    """A store on a fresh log, for each of :data:`LOG_BACKENDS`."""
    async with open_store(log_settings) as opened:
        yield opened
