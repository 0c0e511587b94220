"""``content list|show|search`` as real processes: on the local content store, and with
``--server`` against a real server that ingested the recorded video and the fog article."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import responses

from tests.fakes.youtube import VIDEO, recorded_video
from tests.support import InProcessServer, LocalSite, make_settings, running_server
from tests.test_cli_commands import run_cli

ARTICLE = (
    Path(__file__).resolve().parent / "fixtures" / "articles" / "fog_signals.html"
).read_bytes()
TITLE = "How Lighthouse Keepers Listened to the Fog"


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE)}) as running:
        yield running


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "SURREALDB_URL": f"surrealkv://{tmp_path / 'content'}",
        "ARCHIVE_DIR": str(tmp_path / "archive"),
        "INGEST_ALLOW_PRIVATE_URLS": "true",
        "AGENTS_AUTO_RUN": "false",
    }


async def test_content_commands_read_the_local_store(env: dict[str, str], site: LocalSite) -> None:
    none_yet = await run_cli("content", "list", env=env)
    assert none_yet.code == 1
    assert none_yet.stderr.startswith("error: no content store at ")
    assert "--server URL" in none_yet.stderr
    ingested = await run_cli("ingest", f"{site.base_url}/fog", env=env)
    assert ingested.code == 0, ingested.stderr

    listed = await run_cli("content", "list", env=env)
    found = await run_cli("content", "search", "fog signals", env=env)
    as_json = await run_cli("content", "search", "keepers", "--json", env=env)

    assert listed.code == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    item_id = line.split()[1]
    assert item_id.startswith("article:")
    assert line.endswith(TITLE)
    assert found.code == 0, found.stderr
    lines = found.stdout.splitlines()
    assert lines[0].startswith(f"1. {TITLE}  ({item_id}, score ")
    assert "*fog*" in lines[1].lower()
    assert lines[2] == f"   {site.base_url}/fog"
    hits = json.loads(as_json.stdout)["hits"]
    assert [hit["id"] for hit in hits] == [item_id]
    assert "<mark>keepers</mark>" in hits[0]["snippet"].lower()

    shown = await run_cli("content", "show", item_id, env=env)
    assert shown.code == 0, shown.stderr
    text = shown.stdout
    assert text.startswith(f"{TITLE}\n  id:        {item_id} (article)\n")
    assert f"  url:       {site.base_url}/fog\n" in text
    assert "\nText\n" in text
    whole = json.loads((await run_cli("content", "show", item_id, "--json", env=env)).stdout)
    assert whole["text"] in text
    assert whole["ingest_id"] in text


async def test_content_commands_refuse_bad_input_clearly(
    env: dict[str, str], site: LocalSite
) -> None:
    await run_cli("ingest", f"{site.base_url}/fog", env=env)

    unknown = await run_cli("content", "show", "video:nope", env=env)
    bad_type = await run_cli("content", "list", "--type", "podcast", env=env)
    empty = await run_cli("content", "search", "  ", env=env)
    nothing = await run_cli("content", "search", "zeppelin", env=env)

    assert (unknown.code, unknown.stderr) == (1, "error: no content 'video:nope'\n")
    assert bad_type.code == 2, bad_type.stderr
    assert bad_type.stderr.startswith("error: type: must be one of article, channel, video")
    assert (empty.code, empty.stderr) == (2, "error: q: must not be empty\n")
    assert (nothing.code, nothing.stdout) == (0, "no content matches 'zeppelin'\n")


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with recorded_video() as mock:
        yield mock


@pytest.fixture
async def server(
    database_url: str, tmp_path: Path, youtube: responses.RequestsMock
) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url, ARCHIVE_DIR=str(tmp_path / "archive"), AGENTS_AUTO_RUN="false"
    )
    async with running_server(settings) as running:
        async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
            url = f"https://www.youtube.com/watch?v={VIDEO}"
            done = await client.post("/ingest", json={"url": url})
            assert done.json()["status"] == "success", done.text
        yield running


async def test_a_search_through_a_server_opens_the_video_at_the_matched_second(
    server: InProcessServer, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"}
    remote = ("--server", server.base_url)

    found = await run_cli("content", "search", "Vignelli", *remote, env=env)
    shown = await run_cli("content", "show", f"video:{VIDEO}", *remote, env=env)
    listed = await run_cli("content", "list", "--type", "video", *remote, env=env)

    assert found.code == 0, found.stderr
    lines = found.stdout.splitlines()
    assert lines[0].startswith(f"1. How Transit Maps Lie to You & Why It Works  (video:{VIDEO}")
    assert "Massimo *Vignelli*'s 1972 map" in lines[1]
    assert lines[2] == f"   at 0:08: https://www.youtube.com/watch?v={VIDEO}&t=8s"
    assert shown.code == 0, shown.stderr
    assert "\nTranscript\n  [0:00] Every subway map you've used is lying to you.\n" in shown.stdout
    assert "  [0:08] Massimo Vignelli's 1972 map" in shown.stdout
    assert "  channel:   Lines & Stations\n" in shown.stdout
    assert listed.code == 0, listed.stderr
    assert f"video:{VIDEO}" in listed.stdout
    unknown = await run_cli("content", "show", "video:nope", *remote, env=env)
    assert unknown.code == 1
    assert unknown.stderr.endswith("answered 404: no content 'video:nope'\n")
    assert not (tmp_path / "unused.db").exists()
