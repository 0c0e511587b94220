"""A short run of ``bench.connections`` (the 2,000-connection load test is a bench script: a
minute long): every held connection receives every event, and heartbeats in between."""

from __future__ import annotations

import pytest

from bench.connections import run


@pytest.mark.slow
async def test_many_held_connections_each_receive_every_event() -> None:
    result = await run(200, seconds=4, burst=5, every=1.5, heartbeat=0.5, quiet=True)
    assert result.errors == []
    assert result.events >= 10
    assert result.complete == 200
    assert result.heartbeats_min > 0
    assert result.kib_per_idle_connection < 512
