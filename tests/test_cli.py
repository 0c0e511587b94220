from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from sqlalchemy import delete, select, update

from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.projections import ProjectionRunner, all_projections
from app.projections.agents import agent_activities
from tests.support import ROOT, free_port

SETTING_VARIABLES = (
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "APPEND_MAX_BATCH",
    "HEARTBEAT_SECONDS",
    "SSE_RETRY_MS",
    "SSE_WRITE_TIMEOUT_SECONDS",
    "TAIL_POLL_SECONDS",
)


class Finished(NamedTuple):
    code: int
    stdout: str
    stderr: str


async def run_cli(*args: str, env: dict[str, str], cwd: Path = ROOT) -> Finished:
    """``python -m app ARGS`` in a real process, with exactly the given settings."""
    environ = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        cwd=cwd,
        env={**environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"


HELP_COMMANDS: list[Sequence[str]] = [
    (),
    ("serve",),
    ("db",),
    ("db", "upgrade"),
    ("projections",),
    ("projections", "rebuild"),
]


async def test_help_works_for_every_command(tmp_path: Path) -> None:
    env = {"DATABASE_URL": sqlite_url(tmp_path)}
    results = await asyncio.gather(*(run_cli(*c, "--help", env=env) for c in HELP_COMMANDS))

    for command, result in zip(HELP_COMMANDS, results, strict=True):
        assert result.code == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: python -m app {' '.join(command)}".rstrip())
        assert result.stderr == ""
    top, serve, db, _, projections, rebuild = (result.stdout for result in results)
    for name in ("serve", "db", "projections"):
        assert name in top
    for option in ("--host", "--port", "--workers", "--log-level", "--http-server"):
        assert option in serve
    assert "upgrade" in db
    assert "rebuild" in projections
    assert "name" in rebuild
    # Asking for help touches no database.
    assert not (tmp_path / "cli.db").exists()


async def test_a_missing_command_is_a_usage_error(tmp_path: Path) -> None:
    result = await run_cli(env={"DATABASE_URL": sqlite_url(tmp_path)})
    assert result.code == 2
    assert "usage: python -m app" in result.stderr
    assert "Traceback" not in result.stderr


def console_script(name: str) -> Path:
    """The console script ``[project.scripts]`` installs, beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{path}: install the package (pip install -e .) for its scripts"
    return path


async def test_usage_lines_name_the_program_as_it_was_invoked(tmp_path: Path) -> None:
    script = console_script("activity")
    # The installed script imports this checkout's app, as `python -m app` here does.
    env = {"DATABASE_URL": sqlite_url(tmp_path), "PYTHONPATH": str(ROOT)}
    environ = {**{k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}, **env}

    async def run(*argv: str) -> Finished:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return Finished(process.returncode, stdout.decode(), stderr.decode())

    module = (sys.executable, "-m", "app")
    top, serve, missing = await asyncio.gather(
        run(str(script), "--help"), run(str(script), "serve", "--help"), run(str(script))
    )
    module_top, module_missing = await asyncio.gather(run(*module, "--help"), run(*module))

    assert top.code == serve.code == module_top.code == 0
    assert top.stdout.startswith("usage: activity [-h] COMMAND"), top.stdout
    assert serve.stdout.startswith("usage: activity serve [-h]"), serve.stdout
    assert module_top.stdout.startswith("usage: python -m app [-h] COMMAND"), module_top.stdout
    assert missing.code == module_missing.code == 2
    assert missing.stderr.startswith("usage: activity [-h] COMMAND"), missing.stderr
    assert "activity: error: the following arguments are required" in missing.stderr
    assert module_missing.stderr.startswith("usage: python -m app [-h]"), module_missing.stderr


async def test_db_upgrade_creates_a_schema_without_drift(database_url: str) -> None:
    env = {"DATABASE_URL": database_url}
    upgraded = await run_cli("db", "upgrade", env=env)
    assert upgraded.code == 0, upgraded.stderr
    assert "latest revision" in upgraded.stdout

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "alembic",
        "check",
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    assert "No new upgrade operations detected" in stdout.decode() + stderr.decode()

    again = await run_cli("db", "upgrade", env=env)
    assert again.code == 0, again.stderr


async def test_db_upgrade_does_not_print_the_password(tmp_path: Path) -> None:
    # Nothing listens on this port: the upgrade fails, but the output must not leak.
    url = f"postgresql+asyncpg://svc:hunter2@127.0.0.1:{free_port()}/activity"
    result = await run_cli("db", "upgrade", env={"DATABASE_URL": url})
    assert result.code != 0
    assert "hunter2" not in result.stdout + result.stderr


async def _log_with_projection(url: str) -> tuple[int, list[dict[str, Any]]]:
    """Append a log of agent events (and some of another stream), project it in-process, and
    return the head and the projected rows."""
    await upgrade_database(url)
    engine = create_engine(url, pool_size=2)
    try:
        store = await EventStore.open(engine)
        try:
            for round_ in range(5):
                batch = []
                for source in range(6):
                    kind = ("started", "progress", "heartbeat", "progress", "complete")[round_]
                    if source == 5 and round_ == 4:
                        kind = "failed"
                    payload: dict[str, Any] = {
                        "agent_name": f"agent-{source % 3}",
                        "message": f"step {round_} of {source}",
                    }
                    if kind == "progress":
                        payload["progress"] = round_ / 4
                    if kind == "failed":
                        payload["error"] = "out of memory"
                    batch.append(
                        NewEvent("agent", f"run-{source}", kind, canonical_payload(payload))
                    )
                batch.append(
                    NewEvent("ingest", "run-0", "progress", canonical_payload({"step": "x"}))
                )
                await store.append(batch)
            head = await store.head()
        finally:
            await store.close()
        runner = ProjectionRunner(engine, all_projections())
        assert await runner.rebuild("agents") == head
        return head, await _rows(url)
    finally:
        await engine.dispose()


async def _rows(url: str) -> list[dict[str, Any]]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                select(agent_activities).order_by(agent_activities.c.source_id)
            )
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


async def _damage(url: str) -> None:
    """Make the read model wrong, so that only a real rebuild can put it right."""
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                delete(agent_activities).where(agent_activities.c.source_id == "run-1")
            )
            await connection.execute(
                update(agent_activities)
                .where(agent_activities.c.source_id == "run-2")
                .values(status="bogus", progress=0.123)
            )
    finally:
        await engine.dispose()


@pytest.mark.parametrize("args", [(), ("agents",)], ids=["all", "named"])
async def test_projections_rebuild_restores_the_rows(
    database_url: str, args: tuple[str, ...]
) -> None:
    head, before = await _log_with_projection(database_url)
    assert len(before) == 6
    assert {row["status"] for row in before} == {"completed", "failed"}
    await _damage(database_url)
    assert await _rows(database_url) != before

    result = await run_cli("projections", "rebuild", *args, env={"DATABASE_URL": database_url})

    assert result.code == 0, result.stderr
    names = [args[0]] if args else sorted(p.name for p in all_projections())
    assert result.stdout.splitlines() == [f"rebuilt {n} up to position {head}" for n in names]
    assert await _rows(database_url) == before


async def test_projections_rebuild_of_an_unknown_name_lists_the_known_ones(
    tmp_path: Path,
) -> None:
    result = await run_cli(
        "projections", "rebuild", "nope", env={"DATABASE_URL": sqlite_url(tmp_path)}
    )

    assert result.code != 0
    assert "nope" in result.stderr
    assert "agents" in result.stderr
    assert "Traceback" not in result.stderr
    assert "rebuilt" not in result.stdout


BAD_SETTINGS = [
    ("DATABASE_URL", "mysql://root@localhost/activity"),
    ("DATABASE_URL", "postgresql+asyncpg://svc@127.0.0.1:port/db"),
    ("DATABASE_URL", "sqlite+aiosqlite://"),
    ("HEARTBEAT_SECONDS", "abc"),
    ("HEARTBEAT_SECONDS", "inf"),
]


@pytest.mark.parametrize(
    ("command", "cases"),
    [
        pytest.param(("db", "upgrade"), BAD_SETTINGS, id="db-upgrade"),
        pytest.param(("serve", "--port", "0"), BAD_SETTINGS[1:4], id="serve"),
        pytest.param(("projections", "rebuild"), BAD_SETTINGS[1:4], id="rebuild"),
    ],
)
async def test_bad_configuration_exits_2_naming_the_variable(
    tmp_path: Path, command: tuple[str, ...], cases: list[tuple[str, str]]
) -> None:
    envs = [{"DATABASE_URL": sqlite_url(tmp_path), variable: value} for variable, value in cases]
    results = await asyncio.gather(*(run_cli(*command, env=env) for env in envs))

    for (variable, value), result in zip(cases, results, strict=True):
        assert result.code == 2, (variable, value, result.stderr)
        assert result.stderr.startswith("error: "), (variable, value, result.stderr)
        assert variable in result.stderr, (variable, value, result.stderr)
        assert "Traceback" not in result.stderr, (variable, value, result.stderr)
    # Refused before touching anything.
    assert not (tmp_path / "cli.db").exists()
