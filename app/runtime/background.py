"""A long-lived task a part of the service runs while it is open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

__all__ = ["Background"]


class Background:
    """The one task of a part that works in the background (a watchdog's loop, a listener):
    started with the part, and on :meth:`stop` cancelled and awaited, so that nothing of it
    runs once the part is closed."""

    __slots__ = ("_name", "_task")

    def __init__(self, name: str) -> None:
        self._name = name
        self._task: asyncio.Task[Any] | None = None

    def start(self, work: Coroutine[Any, Any, Any]) -> None:
        if self._task is not None:
            work.close()
            raise RuntimeError(f"{self._name} is already running")
        self._task = asyncio.create_task(work, name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
