"""The command line's ingest, tail, replay, export, import and agents commands, run as real
processes against real databases, content stores and servers (only the web is a local site)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import responses
from sqlalchemy import select

from app.cli import main
from app.config import get_settings
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent, canonical_payload
from app.eventlog.tables import events as events_table
from app.ingest.pipeline import STEPS
from app.projections import all_projections
from tests.fakes.youtube import (
    OEMBED,
    player,
    read_fixture,
    serve_player,
    serve_timedtext,
    serve_watch_page,
)
from tests.support import ROOT, LocalSite, ServerProcess, eventually
from tests.test_cli import SETTING_VARIABLES, Finished

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "articles"
ARTICLE = (FIXTURES / "fog_signals.html").read_bytes()
DURATION = re.compile(r"\d+ ms|\d+\.\d{3} s")


async def run_cli(*args: str, env: dict[str, str], stdin: bytes | None = None) -> Finished:
    """``python -m app ARGS`` in a real process, with exactly the given settings."""
    environ = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        cwd=ROOT,
        env={**environ, **env},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite(
        {
            "/fog": (200, "text/html; charset=utf-8", ARTICLE),
            "/mist": (200, "text/html; charset=utf-8", ARTICLE.replace(b"Fog", b"Mist")),
        }
    ) as running:
        yield running


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Settings shared by the commands of one test: its database, a content store on disk
    (so that what one process stores, the next one finds) and fast timings."""
    return {
        "DATABASE_URL": database_url,
        "SURREALDB_URL": f"surrealkv://{tmp_path / 'content'}",
        "ARCHIVE_DIR": str(tmp_path / "archive"),
        "INGEST_ALLOW_PRIVATE_URLS": "true",
        "HEARTBEAT_SECONDS": "1",
        "TAIL_POLL_SECONDS": "0.2",
        "SSE_RETRY_MS": "100",
    }


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], **overrides: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess({**env, **overrides})
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ndjson_lines(output)]


def ndjson_lines(output: str) -> list[str]:
    # Not str.splitlines(): that also splits at U+2028, which JSON strings may hold as is.
    return [line for line in output.split("\n") if line.strip()]


def progress_steps(lines: Sequence[dict[str, Any]]) -> list[str]:
    return [line["data"]["step"] for line in lines if line["event"] == "progress"]


HELP = [
    ("ingest", ["--channel-limit", "--json", "--server", "URL"]),
    ("tail", ["--stream", "--source-id", "--event", "--agent-name", "--from", "--server"]),
    ("replay", ["INGEST_ID", "--server"]),
    ("export", ["--after", "--until", "--include-archives", "--stream", "--server"]),
    ("import", ["FILE", "EMPTY"]),
    ("agents", ["run"]),
    ("agents run", ["AGENT", "--scope", "untagged", "--server"]),
    ("log status", ["--json", "archived"]),
    ("log purge", ["RETENTION_RULES", "--max-batches"]),
    ("projections rebuild", ["--from-archives", "snapshot"]),
    ("projections snapshot", ["rebuilds"]),
]


async def test_every_new_command_has_help(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"}
    results = await asyncio.gather(*(run_cli(*c.split(), "--help", env=env) for c, _ in HELP))
    for (command, words), result in zip(HELP, results, strict=True):
        assert result.code == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: python -m app {command}"), result.stdout
        for word in words:
            assert word in result.stdout, (command, word)
    assert not (tmp_path / "cli.db").exists()


async def test_ingest_in_process_shows_each_step_and_exits_by_outcome(
    env: dict[str, str], site: LocalSite
) -> None:
    plain = await run_cli("ingest", f"{site.base_url}/fog", env=env)
    assert plain.code == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("ingest ing_")
    assert lines[1] == f"requested: article {site.base_url}/fog"
    shown = [line.split(":")[0] for line in lines if line.split(":")[0] in STEPS["article"]]
    assert shown == list(STEPS["article"])
    assert lines[-1] == "success: Ingested How Lighthouse Keepers Listened to the Fog"

    as_json = await run_cli("ingest", "--json", f"{site.base_url}/mist", env=env)
    assert as_json.code == 0, as_json.stderr
    events = json_lines(as_json.stdout)
    assert events[0]["event"] == "requested"
    assert progress_steps(events) == list(STEPS["article"])
    assert events[-1]["event"] == "complete"
    assert events[-1]["data"]["status"] == "success"
    assert len({e["ingest_id"] for e in events}) == 1
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))

    again = await run_cli("ingest", "--json", f"{site.base_url}/fog", env=env)
    assert again.code == 0, again.stderr
    assert json_lines(again.stdout)[-1]["data"]["status"] == "skipped"

    missing = await run_cli("ingest", f"{site.base_url}/gone", env=env)
    assert missing.code == 1
    assert missing.stderr.strip() == f"error: {site.base_url}/gone answered HTTP 404 Not Found."
    assert "Traceback" not in missing.stderr

    invalid = await run_cli("ingest", "ftp://example.com/file", env=env)
    assert invalid.code == 1
    assert invalid.stderr.startswith("error: ")
    assert "Traceback" not in invalid.stderr


async def test_ingest_through_a_server_exits_by_outcome(
    env: dict[str, str], site: LocalSite
) -> None:
    async with serving(env, SURREALDB_URL="mem://") as server:
        ok = await run_cli(
            "ingest", "--json", "--server", server.base_url, f"{site.base_url}/fog", env=env
        )
        failed = await run_cli(
            "ingest", "--server", server.base_url, f"{site.base_url}/gone", env=env
        )
        refused = await run_cli("ingest", "--server", server.base_url, "ftp://x.org/f", env=env)

    assert ok.code == 0, ok.stderr
    events = json_lines(ok.stdout)
    assert progress_steps(events) == list(STEPS["article"])
    assert events[-1]["data"]["status"] == "success"
    assert failed.code == 1
    assert "404" in failed.stderr
    assert failed.stdout.splitlines()[-1].startswith("error: ")
    assert refused.code == 1
    assert "400" in refused.stderr
    assert "Traceback" not in failed.stderr + refused.stderr


async def test_ingest_in_process_next_to_a_server_on_the_same_content_store_points_to_it(
    env: dict[str, str], site: LocalSite
) -> None:
    async with serving(env):  # the server holds env's surrealkv path
        result = await run_cli("ingest", f"{site.base_url}/fog", env=env)
    assert result.code == 1
    assert "in use by another process" in result.stderr
    assert "--server" in result.stderr
    assert "Traceback" not in result.stderr


class Tail:
    """``python -m app tail …`` running, its stdout read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def stop(self) -> str:
        if self.process.returncode is None:
            self.process.terminate()
        await self.process.wait()
        await self._reader
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


@contextlib.asynccontextmanager
async def tailing(*args: str, env: dict[str, str]) -> AsyncIterator[Tail]:
    environ = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "tail",
        *args,
        cwd=ROOT,
        env={**environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    tail = Tail(process)
    try:
        yield tail
    finally:
        await tail.stop()


@contextlib.asynccontextmanager
async def log_store(url: str) -> AsyncIterator[EventStore]:
    await upgrade_database(url)
    engine = create_engine(url, pool_size=2)
    store = await EventStore.open(engine, poll_seconds=0.2)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


async def append_load(store: EventStore, start: int, count: int) -> list[int]:
    results = await store.append(
        [
            NewEvent(
                "load", f"src-{n % 3}", "tick", canonical_payload({"n": n, "message": f"#{n}"})
            )
            for n in range(start, start + count)
        ]
    )
    return [result.position for result in results]


async def test_tail_through_a_server_prints_every_event_once_across_a_restart(
    env: dict[str, str],
) -> None:
    server = ServerProcess({**env, "SURREALDB_URL": "mem://"})
    server.start()
    await server.wait_ready()
    try:
        async with (
            log_store(env["DATABASE_URL"]) as store,
            tailing(
                "--server", server.base_url, "--stream", "load", "--from", "0", "--json", env=env
            ) as remote,
            tailing("--stream", "load", "--from", "0", env=env) as local,
        ):
            positions = await append_load(store, 0, 50)
            assert await eventually(lambda: len(remote.lines) >= 50, within=30)
            await asyncio.to_thread(server.stop)
            positions += await append_load(store, 50, 25)  # while the server is down
            server.start()
            positions += await append_load(store, 75, 25)
            await server.wait_ready()
            positions += await append_load(store, 100, 50)
            assert await eventually(lambda: len(remote.lines) >= 150, within=30), remote.lines[-3:]
            assert await eventually(lambda: len(local.lines) >= 150, within=30)
            await asyncio.sleep(0.5)  # anything repeated would show up by now
            remote_errors = await remote.stop()
    finally:
        await asyncio.to_thread(server.stop)

    printed = json_lines("\n".join(remote.lines))
    assert [line["position"] for line in printed] == positions
    assert [line["payload"]["n"] for line in printed] == list(range(150))
    assert "Traceback" not in remote_errors
    assert len(local.lines) == 150
    first = local.lines[0].split()
    assert first[0] == str(positions[0])
    assert first[2:5] == ["load/src-0", "v1", "tick"]
    assert local.lines[-1].endswith("#149")


async def test_replay_shows_every_step_with_its_duration(
    env: dict[str, str], site: LocalSite
) -> None:
    ingest = await run_cli("ingest", "--json", f"{site.base_url}/fog", env=env)
    assert ingest.code == 0, ingest.stderr
    ingest_id = json_lines(ingest.stdout)[0]["ingest_id"]

    local = await run_cli("replay", ingest_id, env=env)
    async with serving(env, SURREALDB_URL="mem://") as server:
        remote = await run_cli("replay", "--server", server.base_url, ingest_id, env=env)
        unknown = await run_cli("replay", "--server", server.base_url, "ing_nope", env=env)

    assert local.code == 0, local.stderr
    lines = local.stdout.splitlines()
    assert lines[0] == f"ingest {ingest_id}: article {site.base_url}/fog"
    assert re.fullmatch(r"success after (\d+ ms|\d+\.\d{3} s): Ingested .+", lines[1]), lines[1]
    rows = [line.split() for line in lines[3:]]
    labels = [row[3] for row in rows]  # "+0.042 s", position, step, …
    assert labels[:2] == ["requested", "started"]
    assert labels[2:-1] == list(STEPS["article"])
    assert lines[-1].split()[3:5] == ["complete", "(success)"]
    for line in lines[3:-1]:  # every step but the last event has a duration
        assert DURATION.search(line), line
    assert remote.code == 0, remote.stderr
    assert remote.stdout == local.stdout
    assert unknown.code == 1
    assert "404" in unknown.stderr


async def table_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the events table and of every projection table, in key order."""
    tables = [events_table] + [t for p in all_projections() for t in p.tables]
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            return {
                table.name: [
                    tuple(row)
                    for row in await connection.execute(
                        select(table).order_by(*table.primary_key.columns)
                    )
                ]
                for table in tables
            }
    finally:
        await engine.dispose()


async def test_export_then_import_gives_the_same_log_and_projections(
    env: dict[str, str], site: LocalSite, other_database_url: str, tmp_path: Path
) -> None:
    ingest = await run_cli("ingest", f"{site.base_url}/fog", env=env)  # with its agent runs
    assert ingest.code == 0, ingest.stderr
    async with log_store(env["DATABASE_URL"]) as store:
        # Payload bytes as the log keeps them: non-ASCII, escapes, big and small numbers.
        odd = {"agent_name": "odd", "message": 'naïve ☃ \u2028 "q" \\ 😀', "x": 1.5e300, "y": -0}
        await store.append([NewEvent("agent", "odd_1", "progress", canonical_payload(odd))])
        await append_load(store, 0, 3000)
    exported = await run_cli("export", "--after", "0", env=env)
    assert exported.code == 0, exported.stderr
    dump = tmp_path / "log.ndjson"
    dump.write_text(exported.stdout)
    lines = ndjson_lines(exported.stdout)
    assert len(lines) > 3000
    assert [json.loads(line)["position"] for line in lines] == list(range(1, len(lines) + 1))

    target = {**env, "DATABASE_URL": other_database_url}
    imported = await run_cli("import", str(dump), env=target)
    assert imported.code == 0, imported.stderr
    assert imported.stdout.splitlines()[0] == f"imported {len(lines)} events, head {len(lines)}"
    # The source's read models, folded from the same log (the appends above bypassed them).
    assert (await run_cli("projections", "rebuild", env=env)).code == 0
    assert await table_rows(other_database_url) == await table_rows(env["DATABASE_URL"])
    again = await run_cli("export", env=target)
    assert again.stdout == exported.stdout  # byte for byte

    refused = await run_cli("import", str(dump), env=target)
    assert refused.code == 1
    assert "not empty" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (await table_rows(other_database_url))["events"] == (
        await table_rows(env["DATABASE_URL"])
    )["events"]


async def test_export_narrows_by_range_and_filters_locally_and_through_a_server(
    env: dict[str, str],
) -> None:
    async with log_store(env["DATABASE_URL"]) as store:
        await append_load(store, 0, 40)
        await store.append([NewEvent("other", "o", "tock", canonical_payload({"n": -1}))])
        await append_load(store, 40, 10)
    whole = ndjson_lines((await run_cli("export", env=env)).stdout)
    narrowed = await run_cli(
        "export", "--after", "10", "--until", "45", "--source-id", "src-1", env=env
    )
    async with serving(env, SURREALDB_URL="mem://") as server:
        remote_whole = await run_cli("export", "--server", server.base_url, env=env)
        remote_narrowed = await run_cli(
            "export",
            "--server",
            server.base_url,
            "--after",
            "10",
            "--until",
            "45",
            "--source-id",
            "src-1",
            env=env,
        )
    expected = [
        line
        for line in whole
        if 10 < json.loads(line)["position"] <= 45 and json.loads(line)["source_id"] == "src-1"
    ]
    assert len(whole) == 51
    assert ndjson_lines(narrowed.stdout) == expected
    assert ndjson_lines(remote_whole.stdout) == whole
    assert ndjson_lines(remote_narrowed.stdout) == expected


def _tampered(line: str, **changes: Any) -> str:
    envelope = json.loads(line)
    envelope.update(changes)
    return json.dumps(envelope)


async def test_import_refuses_a_log_that_could_not_have_been_appended(
    env: dict[str, str], other_database_url: str, tmp_path: Path
) -> None:
    async with log_store(env["DATABASE_URL"]) as store:
        await append_load(store, 0, 6)
    lines = ndjson_lines((await run_cli("export", env=env)).stdout)
    fresh = {**env, "DATABASE_URL": other_database_url}
    cases = {
        "version": [*lines[:3], _tampered(lines[3], version=3), *lines[4:]],
        "position": [lines[1], lines[0], *lines[2:]],
        "event_id": [*lines[:5], _tampered(lines[5], event_id=json.loads(lines[0])["event_id"])],
        "line 2": [lines[0], "{not json", *lines[2:]],
    }
    results: dict[str, Finished] = {}
    for name, content in cases.items():
        path = tmp_path / f"{name}.ndjson"
        path.write_text("\n".join(content) + "\n")
        results[name] = await run_cli("import", str(path), env=fresh)
    for name, result in results.items():
        assert result.code == 1, name
        assert result.stderr.startswith("error: import refused, nothing was written:"), name
        assert name.split()[0] in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
    # Nothing was written: the whole file still imports.
    path = tmp_path / "good.ndjson"
    path.write_text("\n".join(lines) + "\n")
    good = await run_cli("import", "-", env=fresh, stdin=path.read_bytes())
    assert good.code == 0, good.stderr
    assert good.stdout.startswith("imported 6 events, head 6")


async def test_agents_run_follows_a_run_to_its_end_in_process_and_through_a_server(
    env: dict[str, str], site: LocalSite
) -> None:
    env = {**env, "AGENTS_AUTO_RUN": "false"}
    ingest = await run_cli("ingest", f"{site.base_url}/fog", env=env)
    assert ingest.code == 0, ingest.stderr

    first = await run_cli("agents", "run", "tagger", "--scope", "untagged", env=env)
    second = await run_cli("agents", "run", "tagger", env=env)  # untagged is the default
    unknown = await run_cli("agents", "run", "translator", env=env)
    async with serving(env) as server:
        remote = await run_cli(
            "agents",
            "run",
            "tagger",
            "summarizer",
            "--scope",
            "all",
            "--json",
            "--server",
            server.base_url,
            env=env,
        )

    assert first.code == 0, first.stderr
    assert first.stdout.splitlines()[0].startswith("run coordinator_")
    assert "Processing article 1/1" in first.stdout
    assert first.stdout.splitlines()[-1].endswith("complete: Processed 1, failed 0, skipped 0")
    assert second.code == 0, second.stderr
    assert second.stdout.splitlines()[-1].endswith("Processed 0, failed 0, skipped 0")
    assert unknown.code == 2
    assert "translator" in unknown.stderr
    assert remote.code == 0, remote.stderr
    events = json_lines("\n".join(remote.stdout.splitlines()[1:]))
    assert events[-1]["event"] == "complete"
    assert events[-1]["payload"]["result"] == {"processed": 2, "failed": 0, "skipped": 0}


CHANNEL_VIDEOS = "https://www.youtube.com/@hollowpine/videos"
CHANNEL_VIDEO_IDS = [
    "Jq8vN2xLp4A",
    "Tz3kW9bRm1E",
    "hY6pC0sDf5U",
    "Lm4rX7eQa2O",
    "Bw1nH8uGk3I",
    "Pd5sV2yJc9Z",
]


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    """YouTube faked at the edge: ``responses`` patches requests in this process only, so
    this test runs the command's ``main`` here rather than as a child process."""
    data = player("player_manual_and_generated.json")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(
            CHANNEL_VIDEOS,
            body=(FIXTURES.parent / "channels" / "channel_videos.html").read_text(encoding="utf-8"),
            content_type="text/html; charset=utf-8",
        )
        mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
        for video_id in CHANNEL_VIDEO_IDS:
            serve_watch_page(mock, video_id)
            serve_player(mock, video_id, data)
        serve_timedtext(mock, data)
        yield mock


def test_ingest_in_process_of_a_channel_waits_for_its_videos_and_their_agent_runs(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    youtube: responses.RequestsMock,
) -> None:
    for name, value in {
        "DATABASE_URL": database_url,
        "SURREALDB_URL": "mem://",
        "ARCHIVE_DIR": str(tmp_path / "archive"),
        "HEARTBEAT_SECONDS": "1",
        "TAIL_POLL_SECONDS": "0.2",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        code = main(["ingest", "--json", "https://www.youtube.com/@hollowpine"])
    finally:
        get_settings.cache_clear()
    printed = json_lines(capsys.readouterr().out)

    assert code == 0
    parent = printed[0]["ingest_id"]
    own = [line for line in printed if line["ingest_id"] == parent]
    assert progress_steps(own) == list(STEPS["channel"])
    assert own[-1]["data"]["status"] == "queued"
    children = [line for line in printed if line["ingest_id"] != parent]
    assert {line["ingest_id"] for line in children} == set(own[-1]["data"]["details"]["ingest_ids"])
    assert [line["event"] for line in children] == ["complete"] * len(CHANNEL_VIDEO_IDS)
    assert {line["data"]["status"] for line in children} == {"success"}
    # Nothing it started was left half done: every agent run after a video completed too.
    rows = asyncio.run(table_rows(database_url))
    runs = [row for row in rows["agent_activities"] if row[1] == "coordinator"]
    assert len(runs) == len(CHANNEL_VIDEO_IDS)
    assert {row[2] for row in runs} == {"completed"}
