"""The coordinator runs the real agents over stored content as jobs, after each ingest and
on demand; a run survives its process and never redoes finished items."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import responses

from app.agents.coordinator import AgentRuns
from app.agents.tracker import Activity
from app.agents.workers import AgentContext
from app.content import article_key
from app.runtime.services import Services, open_services
from tests.fakes.youtube import OEMBED, VIDEO, player, read_fixture, serve_video
from tests.support import (
    InProcessServer,
    LocalSite,
    SseFrame,
    make_settings,
    read_frames,
    running_server,
)

ARTICLE = Path(__file__).resolve().parent.parent / "fixtures" / "articles" / "fog_signals.html"


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
        serve_video(mock, VIDEO, player("player_manual_and_generated.json"))
        yield mock


@pytest.fixture
def site() -> Iterator[LocalSite]:
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE.read_bytes())}) as running:
        yield running


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        database_url,
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_ALLOW_PRIVATE_URLS="true",
    )
    async with running_server(settings) as running:
        yield running


async def agent_frames_until_run_completes(
    client: httpx.AsyncClient, within: float = 60
) -> list[SseFrame]:
    frames: list[SseFrame] = []
    async with asyncio.timeout(within), client.stream("GET", "/agents/stream") as response:
        async for frame in read_frames(response):
            if frame.id is None:
                continue
            frames.append(frame)
            envelope = frame.json()
            if envelope["source_id"].startswith("coordinator_") and frame.event == "complete":
                return frames
    raise AssertionError("the stream ended before the run completed")


async def test_an_ingested_video_is_tagged_and_summarised_by_a_coordinator_run(
    server: InProcessServer, youtube: responses.RequestsMock
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        result = (await client.post("/ingest", json={"url": f"https://youtu.be/{VIDEO}"})).json()
        assert result["status"] == "success"
        frames = await agent_frames_until_run_completes(client)

    envelopes = [frame.json() for frame in frames]
    runs = [e for e in envelopes if e["source_id"].startswith("coordinator_")]
    assert runs[0]["event"] == "started"
    assert runs[0]["payload"]["run"]["trigger"] == {"ingest_id": result["ingest_id"]}
    assert runs[0]["payload"]["run"]["scope"] == [f"video:{VIDEO}"]
    assert runs[-1]["event"] == "complete"
    assert runs[-1]["payload"]["result"] == {"processed": 2, "failed": 0, "skipped": 0}
    progress = [e["payload"]["progress"] for e in runs if "progress" in e["payload"]]
    assert progress == sorted(progress)
    assert progress[-1] == 1.0
    messages = [e["payload"].get("message", "") for e in runs]
    assert "Processing video 1/1 (tagger)" in messages
    assert "Processing video 1/1 (summarizer)" in messages

    for agent in ("tagger", "summarizer"):
        child = [e for e in envelopes if e["payload"]["agent_name"] == agent]
        assert child[0]["event"] == "started"
        assert child[-1]["event"] == "complete"
        assert child[-1]["payload"]["progress"] == 1.0
        assert len({e["source_id"] for e in child}) == 1

    record = await server.services.content.get("video", VIDEO)
    assert record is not None
    assert record["tags"]
    assert all(isinstance(tag, str) for tag in record["tags"])
    assert record["summary"]
    assert record["summary_sentences"][0] in record["summary"]


async def test_a_run_on_demand_processes_untagged_content_once(
    database_url: str, tmp_path: Path, site: LocalSite
) -> None:
    settings = make_settings(
        database_url,
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_ALLOW_PRIVATE_URLS="true",
        AGENTS_AUTO_RUN="false",
    )
    url = f"{site.base_url}/fog"
    async with (
        running_server(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=60) as client,
    ):
        assert (await client.post("/ingest", json={"url": url})).json()["status"] == "success"
        key = article_key(url)
        stored = await server.services.content.get("article", key)
        assert stored is not None
        assert "tags" not in stored  # no automatic run when AGENTS_AUTO_RUN is off

        accepted = await client.post("/agents/runs", json={"agent": "tagger", "scope": "untagged"})
        assert accepted.status_code == 202
        run_id = accepted.json()["source_id"]
        assert run_id.startswith("coordinator_")
        row = await wait_for_run(client, run_id)
        assert row["status"] == "completed"
        assert row["result"] == {"processed": 1, "failed": 0, "skipped": 0}
        tagged = await server.services.content.get("article", key)
        assert tagged is not None
        assert "fog" in " ".join(tagged["tags"]).lower()
        assert "summary" not in tagged

        again = await client.post("/agents/runs", json={"agent": "tagger", "scope": "untagged"})
        row = await wait_for_run(client, again.json()["source_id"])
        assert row["result"] == {"processed": 0, "failed": 0, "skipped": 0}

        listed = await client.post(
            "/agents/runs",
            json={"agents": ["summarizer"], "scope": [f"article:{key}", "video:nosuchvideo"]},
        )
        row = await wait_for_run(client, listed.json()["source_id"])
        assert row["result"] == {"processed": 1, "failed": 0, "skipped": 1}


async def wait_for_run(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row: dict[str, Any] = (await client.get(f"/agents/{run_id}")).json()
        if row["status"] in ("completed", "failed"):
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"agent": "poet", "scope": "all"}, "agent"),
        ({"scope": "all"}, "agent"),
        ({"agent": "tagger", "scope": "everything"}, "scope"),
        ({"agent": "tagger", "scope": []}, "scope"),
        ({"agent": "tagger", "scope": ["podcast:1"]}, "scope"),
    ],
)
async def test_bad_run_requests_name_the_field(
    server: InProcessServer, body: dict[str, Any], field: str
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        head = (await client.get("/events")).json()["head"]
        answer = await client.post("/agents/runs", json=body)
        assert answer.status_code == 422
        assert answer.json()["extra"]["field"] == field
        assert (await client.get("/events")).json()["head"] == head


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    settings = make_settings(
        database_url, ARCHIVE_DIR=str(tmp_path / "archive"), HEARTBEAT_SECONDS="5"
    )
    async with open_services(settings, run_jobs=False) as opened:
        yield opened


async def test_a_crashed_run_resumes_without_redoing_finished_items(services: Services) -> None:
    items = []
    for n in range(3):
        key = f"doc{n}"
        await services.content.put("article", key, {"text": f"Lighthouse number {n} stands."})
        items.append(f"article:{key}")
    run_id = await services.runs.start_run(["tagger"], items)

    calls: list[str] = []
    stuck = asyncio.Event()

    async def stalling_tagger(
        _: AgentContext, activity: Activity, record: Mapping[str, Any]
    ) -> dict[str, Any]:
        calls.append(record["text"])
        if "number 1" in record["text"]:
            stuck.set()
            await asyncio.Event().wait()  # the process dies here
        return {"tags": ["lighthouse"]}

    first = AgentRuns(
        services.store,
        services.engine,
        services.tracker,
        services.content,
        agents={"tagger": stalling_tagger},
    )
    crashed = asyncio.create_task(first.run(run_id))
    await asyncio.wait_for(stuck.wait(), 30)
    crashed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await crashed

    async def counting_tagger(
        _: AgentContext, activity: Activity, record: Mapping[str, Any]
    ) -> dict[str, Any]:
        calls.append(record["text"])
        return {"tags": ["lighthouse"]}

    second = AgentRuns(
        services.store,
        services.engine,
        services.tracker,
        services.content,
        agents={"tagger": counting_tagger},
    )
    await second.run(run_id)

    assert calls == [
        "Lighthouse number 0 stands.",
        "Lighthouse number 1 stands.",
        "Lighthouse number 1 stands.",
        "Lighthouse number 2 stands.",
    ]
    events = await services.store.read_source("agent", run_id)
    payloads = [event.payload_dict() for event in events]
    assert any("Resuming after an interruption: 1/3" in p.get("message", "") for p in payloads)
    assert events[-1].event == "complete"
    assert payloads[-1]["result"] == {"processed": 3, "failed": 0, "skipped": 0}
    interrupted = next(p["child"] for p in payloads if p.get("item") == items[1])
    child_events = await services.store.read_source("agent", interrupted)
    assert child_events[-1].event == "failed"
    assert "Interrupted" in child_events[-1].payload_dict()["message"]
    for item in items:
        record = await services.content.get("article", item.partition(":")[2])
        assert record is not None
        assert record["tags"] == ["lighthouse"]
