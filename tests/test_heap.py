"""The collector's settings while the service runs: start-up objects frozen, the young
generation collected less often, later cycles still collected, and all of it undone on stop."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import httpx

from app.runtime.heap import YOUNG_THRESHOLD, settled_heap
from tests.support import make_settings, running_server


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    return weakref.ref(first)


def test_settled_heap_freezes_what_is_alive_and_restores_the_collector() -> None:
    before = gc.get_threshold()
    alive = _Node()
    with settled_heap():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
        # A cycle made while the service runs is garbage the collector still finds.
        made_later = _cycle()
        gc.collect()
        assert made_later() is None
        assert alive.other is None
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


async def test_settled_heap_is_applied_while_the_app_runs(tmp_path: Path) -> None:
    before = gc.get_threshold()
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    async with running_server(settings) as server, httpx.AsyncClient() as client:
        assert (await client.get(f"{server.base_url}/health")).status_code == 200
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
