"""A short run of ``bench.connections`` (the 5,000-connection load test is a bench script,
minutes long): every held connection receives every event in order, heartbeats in between,
and the shutdown frame when the server stops."""

from __future__ import annotations

import pytest

from bench.connections import hold_service


@pytest.mark.slow
async def test_many_held_connections_each_receive_every_event() -> None:
    result = await hold_service(200, window=2.0, heartbeat="0.5", deliver_seconds=3.0)
    assert result.failures == []
    assert result.events >= 10
    assert result.complete == 200
    assert result.heartbeats_min > 0
    assert result.shutdown_frames == 200
    assert result.kib_per_connection < 512
