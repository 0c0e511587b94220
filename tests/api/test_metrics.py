"""``GET /metrics``: the Prometheus text format, with figures that follow what happened."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support import InProcessServer, agent_event, read_frames

SAMPLE = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{([a-z_]+="[^"]*",?)*\})? (-?[0-9.e+]+|\+Inf|NaN)$')


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


def parse(text: str) -> dict[str, float]:
    """Every sample by ``name{labels}``, checking the format strictly on the way."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed.add(name)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
        assert family in typed or match.group(1) in typed, f"no TYPE before {line!r}"
        key = line.rsplit(" ", 1)[0]
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(line.rsplit(" ", 1)[1])
    return samples


def check_histogram(samples: dict[str, float], name: str) -> None:
    buckets = [(k, v) for k, v in samples.items() if k.startswith(f"{name}_bucket")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets[-1][0] == f'{name}_bucket{{le="+Inf"}}'
    assert buckets[-1][1] == samples[f"{name}_count"]


async def test_metrics_follow_appends_subscribers_and_projections(
    client: httpx.AsyncClient,
) -> None:
    first = parse((await client.get("/metrics")).text)
    assert first['activity_append_requests_total{outcome="ok"}'] == 0
    for n in range(3):
        assert (await client.post(f"/agents/a{n}/events", json=agent_event())).status_code == 201
    batch = {"events": [{"source_id": "b", **agent_event()} for _ in range(4)]}
    assert (await client.post("/agents/events", json=batch)).status_code == 201
    conflict = await client.post("/agents/b/events", json={**agent_event(), "expected_version": 1})
    assert conflict.status_code == 409
    # /metrics shows the projections as they are (lag included); a read of /agents waits for
    # them to reach the head, so the gauges below are settled.
    assert (await client.get("/agents")).status_code == 200

    response = await client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse(response.text)
    assert samples['activity_append_requests_total{outcome="ok"}'] == 4
    assert samples['activity_append_requests_total{outcome="conflict"}'] == 1
    assert samples["activity_appended_events_total"] == 7
    assert samples["activity_log_head"] == 7
    # Only this instance appended: nothing came from another one's notifications.
    assert samples["activity_feed_notified_events_total"] == 0
    assert samples["activity_append_latency_seconds_count"] == 4
    assert samples["activity_append_batch_events_sum"] == 8  # the refused one was planned too
    for name in (
        "activity_append_latency_seconds",
        "activity_append_batch_events",
        "activity_append_commit_seconds",
    ):
        check_histogram(samples, name)
    assert samples["activity_jobs_running_local"] == 0
    for projection in ("agents", "ingests"):
        assert f'activity_projection_checkpoint{{projection="{projection}"}}' in samples
        assert f'activity_projection_lag_events{{projection="{projection}"}}' in samples
    assert samples['activity_agent_activities{status="running"}'] >= 1


async def test_subscribers_and_their_lag_are_counted(client: httpx.AsyncClient) -> None:
    for n in range(5):
        assert (await client.post(f"/agents/a{n}/events", json=agent_event())).status_code == 201
    async with (
        client.stream("GET", "/events/stream", params={"last_event_id": 0}) as stream,
        contextlib.aclosing(read_frames(stream)) as frames,  # type: ignore[type-var]
    ):
        async for frame in frames:
            if frame.id == "5":
                break
        samples = parse((await client.get("/metrics")).text)
        assert samples["activity_sse_connections"] == 1
        assert samples["activity_log_subscribers"] == 1
        assert await eventually_metric(client, "activity_log_subscriber_lag_max", 0)
    assert await eventually_metric(client, "activity_log_subscribers", 0)
    assert await eventually_metric(client, "activity_sse_connections", 0)


async def eventually_metric(client: httpx.AsyncClient, name: str, value: float) -> bool:
    for _ in range(200):
        if parse((await client.get("/metrics")).text)[name] == value:
            return True
        await asyncio.sleep(0.02)
    return False
