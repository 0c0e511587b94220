"""``python -m app serve --workers N``: N processes on one machine, each a full instance."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ROOT, agent_event, free_port, read_frames


def _children(pid: int) -> list[int]:
    found = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(line) for line in found.stdout.split()]


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
async def test_workers_share_the_log_and_every_stream_sees_every_event(
    postgres_url: str, tmp_path: Path, server: str
) -> None:
    if server == "granian":
        pytest.importorskip("granian")
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "SURREALDB_URL": "mem://",
        "ARCHIVE_DIR": str(tmp_path / "archive"),
        "HEARTBEAT_SECONDS": "1",
    }
    process = await asyncio.to_thread(
        subprocess.Popen,
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--http-server",
            server,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get("/health")).status_code == 200 and len(
                        _children(process.pid)
                    ) >= 2:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        assert len(_children(process.pid)) >= 2

        total = 120

        async def follow() -> list[int]:
            seen: list[int] = []
            # A client of its own per stream: a new connection the kernel may hand to either
            # worker.
            async with (
                httpx.AsyncClient(base_url=base, timeout=30) as client,
                client.stream("GET", "/events/stream", params={"last_event_id": 0}) as response,
            ):
                async for frame in read_frames(response):
                    if frame.id is not None:
                        seen.append(int(frame.id))
                        if len(seen) >= total:
                            return seen
            return seen

        tails = [asyncio.create_task(follow()) for _ in range(6)]

        async def write(n: int) -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                answer = await client.post(f"/agents/w{n % 4}/events", json=agent_event())
                assert answer.status_code == 201, answer.text
                body: dict[str, Any] = answer.json()
                return body

        acks = await asyncio.gather(*(write(n) for n in range(total)))
        assert sorted(ack["position"] for ack in acks) == list(range(1, total + 1))
        seen = await asyncio.wait_for(asyncio.gather(*tails), 60)
        for tail in seen:
            assert tail == list(range(1, total + 1))
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_workers_refuse_an_embedded_content_path(tmp_path: Path, server: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        "SURREALDB_URL": f"surrealkv://{tmp_path / 'content'}",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--port",
            str(free_port()),
            "--workers",
            "2",
            "--http-server",
            server,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "one owner" in done.stderr
    assert "SURREALDB_URL" in done.stderr
    assert "Traceback" not in done.stderr
