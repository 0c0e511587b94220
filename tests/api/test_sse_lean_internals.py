"""What the lean SSE transport (app/api/sse/lean.py) relies on in CPython's asyncio beyond its
public API. If one of these fails after a Python upgrade, the lean transport is broken: run
with ``SSE_LEAN_STREAMS=0`` (the task-group transport) until app/api/sse/lean.py is mended."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from app.api.sse.lean import _as_coroutine, _Resumed


async def _waits_on(future: asyncio.Future[int]) -> int:
    return await future


async def test_a_coroutine_stepped_by_hand_yields_the_future_it_waits_on_marked_blocking() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    coroutine = _waits_on(future)
    yielded: Any = coroutine.send(None)
    assert yielded is future, f"stepping yielded {yielded!r} (Python {sys.version})"
    assert asyncio.isfuture(yielded)
    assert yielded._asyncio_future_blocking is True
    # Cleared, as a task clears it before it waits on the future itself.
    yielded._asyncio_future_blocking = False
    resumed: list[int] = []
    yielded.add_done_callback(lambda _: resumed.append(1))
    future.set_result(7)
    await asyncio.sleep(0)  # done callbacks run on the loop, after the result is set
    assert resumed == [1]
    with pytest.raises(StopIteration) as finished:
        coroutine.send(None)
    assert finished.value.value == 7


async def test_a_task_counts_the_cancellations_asked_of_it_and_uncancel_takes_one_back() -> None:
    started = asyncio.Event()

    async def sleeper() -> tuple[int, int]:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            asked = task.cancelling()
            return asked, task.uncancel()
        raise AssertionError("not cancelled")

    task = asyncio.create_task(sleeper())
    await started.wait()
    task.cancel()
    assert await task == (1, 0)


async def test_a_hand_started_coroutine_is_awaited_to_its_end_with_cancellation_passed_in() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    coroutine = _as_coroutine(_waits_on(future))
    awaited = coroutine.send(None)

    async def finish() -> None:
        await _Resumed(coroutine, awaited)  # type: ignore[arg-type]

    finishing = asyncio.create_task(finish())
    await asyncio.sleep(0)
    future.set_result(1)
    await asyncio.wait_for(finishing, 5)

    other: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    coroutine = _as_coroutine(_waits_on(other))
    awaited = coroutine.send(None)
    waiting = asyncio.create_task(finish())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert other.cancelled(), "the cancellation was not passed into the coroutine"
