from __future__ import annotations

import httpx

from tests.support import InProcessServer, agent_event, read_frames


async def test_append_then_stream(server: InProcessServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        response = await client.post("/agents/a1/events", json=agent_event("started", progress=0))
        assert response.status_code == 201, response.text
        assert response.json()["position"] == 1
        async with client.stream("GET", "/events/stream", params={"last_event_id": 0}) as stream:
            frames = read_frames(stream)
            first = await anext(frames)
            assert first.retry == 3000
            frame = await anext(frames)
            assert frame.id == "1"
            assert frame.json()["payload"]["agent_name"] == "tagger"
