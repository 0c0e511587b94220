"""Several instances on one PostgreSQL: every event reaches every tail, every job runs on one
instance at a time and survives the loss of the instance running it, and a database restart
costs the tails nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL
from tests.support import LocalSite, ServerProcess, agent_event, read_frames

pytestmark = pytest.mark.postgres

ARTICLE = Path(__file__).resolve().parent / "fixtures" / "articles" / "fog_signals.html"


def cluster_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": url,
        "SURREALDB_URL": "mem://",
        "HEARTBEAT_SECONDS": "1",
        # Slow fallback poll: cross-instance delivery must come from LISTEN/NOTIFY.
        "TAIL_POLL_SECONDS": "5",
        **extra,
    }


async def start_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.start()
    await asyncio.gather(*(server.wait_ready() for server in servers))


@pytest.fixture
async def cluster(postgres_url: str) -> AsyncIterator[list[ServerProcess]]:
    servers = [ServerProcess(cluster_env(postgres_url)) for _ in range(3)]
    try:
        await start_all(servers)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def follow(base_url: str, count: int, within: float = 90) -> list[dict[str, Any]]:
    """Read ``count`` events from /events/stream from the start, reconnecting with
    Last-Event-ID whenever the stream ends."""
    seen: list[dict[str, Any]] = []
    last = 0
    async with asyncio.timeout(within), httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        while len(seen) < count:
            try:
                async with client.stream(
                    "GET", "/events/stream", headers={"Last-Event-ID": str(last)}
                ) as response:
                    async for frame in read_frames(response):
                        if frame.id is None:
                            continue
                        envelope = frame.json()
                        seen.append(envelope)
                        last = envelope["position"]
                        if len(seen) >= count:
                            break
            except httpx.TransportError:
                await asyncio.sleep(0.2)
    return seen


async def test_every_tail_on_every_instance_sees_every_event_once_in_order(
    cluster: list[ServerProcess],
) -> None:
    per_writer = 100
    total = 3 * 4 * per_writer
    tails = [asyncio.create_task(follow(server.base_url, total)) for server in cluster]

    async def write(base_url: str, writer: int) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            for n in range(per_writer):
                answer = await client.post(
                    f"/agents/w{writer}/events", json=agent_event(message=f"{writer}:{n}")
                )
                assert answer.status_code == 201, answer.text

    await asyncio.gather(
        *(
            write(server.base_url, index * 4 + writer)
            for index, server in enumerate(cluster)
            for writer in range(4)
        )
    )
    seen = await asyncio.gather(*tails)
    async with httpx.AsyncClient(base_url=cluster[0].base_url) as client:
        log: list[dict[str, Any]] = []
        after = 0
        while True:
            page = (await client.get("/events", params={"after": after, "limit": 1000})).json()
            log.extend(page["events"])
            if not page["events"]:
                break
            after = page["next_after"]
    assert [e["position"] for e in log] == list(range(1, total + 1))
    for tail in seen:
        assert tail == log
    # Each writer's own events kept their order and their per-source versions.
    for writer in range(12):
        mine = [e for e in log if e["source_id"] == f"w{writer}"]
        assert [e["version"] for e in mine] == list(range(1, per_writer + 1))
        assert [e["payload"]["message"] for e in mine] == [
            f"{writer}:{n}" for n in range(per_writer)
        ]


@pytest.fixture
def site() -> Iterator[LocalSite]:
    body = ARTICLE.read_bytes()
    routes = {f"/a{n}": (200, "text/html; charset=utf-8", body) for n in range(20)}
    with LocalSite(routes) as running:
        for n in range(20):
            running.delays[f"/a{n}"] = 1.5
        yield running


async def test_ingests_run_once_each_and_a_killed_instance_s_work_is_taken_over(
    postgres_url: str, site: LocalSite
) -> None:
    env = cluster_env(
        postgres_url,
        INGEST_ALLOW_PRIVATE_URLS="true",
        INGEST_LEASE_SECONDS="3",
        INGEST_CONCURRENCY="3",
        AGENTS_AUTO_RUN="false",
    )
    servers = [ServerProcess(env) for _ in range(3)]
    try:
        await start_all(servers)
        ids = []
        async with httpx.AsyncClient(timeout=30) as client:
            for n in range(20):
                server = servers[n % 3]
                answer = await client.post(
                    f"{server.base_url}/ingests", json={"url": f"{site.base_url}/a{n}"}
                )
                assert answer.status_code == 202
                ids.append(answer.json()["ingest_id"])
            victim = servers[0]
            assert victim.process is not None
            victim_pid = victim.process.pid
            # Wait until the victim is in the middle of some ingests, then kill it.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                running = (
                    await client.get(f"{servers[1].base_url}/ingests", params={"status": "running"})
                ).json()
                if running:
                    break
                await asyncio.sleep(0.05)
            victim.kill()

            survivor = servers[1].base_url
            deadline = time.monotonic() + 120
            rows: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                rows = [(await client.get(f"{survivor}/ingests/{i}")).json() for i in ids]
                if all(row["status"] == "success" for row in rows):
                    break
                await asyncio.sleep(0.2)
            assert [row["status"] for row in rows] == ["success"] * 20

            taken_over = 0
            for ingest_id in ids:
                events = (await client.get(f"{survivor}/ingests/{ingest_id}/events")).json()[
                    "events"
                ]
                names = [e["event"] for e in events]
                assert names.count("complete") == 1
                starts = [e["payload"]["instance"] for e in events if e["event"] == "started"]
                if len(starts) == 1:
                    continue
                # Taken over: the first run was the killed instance's, the second another's.
                taken_over += 1
                assert len(starts) == 2
                assert f":{victim_pid}:" in starts[0]
                assert f":{victim_pid}:" not in starts[1]
                assert names[names.index("interrupted") + 1] == "started"
            assert taken_over >= 1
    finally:
        for server in servers:
            server.stop()
    # Each page was fetched once per run: 20, plus one per run that was taken over.
    assert sum(site.hits.values()) <= 20 + taken_over


async def database_away(url: str, seconds: float) -> None:
    """What a restart of the database server looks like to the service, done to its database
    alone (other tests share the server): every connection dropped, and for ``seconds`` no
    new one taken."""
    import asyncpg

    from app.backends.postgres.appender import postgres_dsn

    name = make_url(url).database
    admin = await asyncpg.connect(postgres_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await asyncio.sleep(seconds)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()


async def test_a_database_restart_costs_a_tail_no_event(postgres_url: str) -> None:
    # Heartbeats far apart: the watchdog's "stalled" must not come between the agent's events.
    server = ServerProcess(cluster_env(postgres_url, TAIL_POLL_SECONDS="1", HEARTBEAT_SECONDS="60"))
    server.start()
    try:
        await server.wait_ready()
        total = 400
        tail = asyncio.create_task(follow(server.base_url, total, within=120))
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:

            async def post(n: int) -> None:
                for _ in range(600):
                    try:
                        answer = await client.post(
                            "/agents/pg_restart/events",
                            json={**agent_event(message=str(n)), "event_id": _uuid(n)},
                        )
                        if answer.status_code == 201:
                            return
                        assert answer.status_code == 503, answer.text
                        assert "unavailable" in answer.json()["detail"]
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                raise AssertionError(f"event {n} was never accepted")

            for n in range(total // 2):
                await post(n)
            await database_away(postgres_url, 3.0)
            for n in range(total // 2, total):
                await post(n)
        seen = await tail
    finally:
        server.stop()
    assert [e["position"] for e in seen] == list(range(1, total + 1))
    assert [e["payload"]["message"] for e in seen] == [str(n) for n in range(total)]


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"
