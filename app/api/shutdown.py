"""Graceful shutdown: open SSE streams end with a ``retry`` hint as soon as the process is
asked to stop, instead of holding the shutdown until uvicorn's graceful timeout cuts them.

uvicorn stops accepting connections on SIGTERM/SIGINT and then waits for every open response
to finish; an SSE response never does by itself. The ASGI protocol has no "server is stopping"
message for HTTP, so the signal is observed where uvicorn observes it: its handler is wrapped
(and called as before), and the wrapper sets :attr:`ShutdownSignal.draining`, which every
:class:`app.api.sse.EventStreamResponse` watches. After the streams end, uvicorn runs the
lifespan shutdown, where the job runner releases its leases so another instance, or the next
start, takes the jobs over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["ShutdownSignal"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownSignal:
    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Wrap the server's signal handlers (only a server's: a default or ignored handler,
        or a thread other than the main one, is left alone)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if callable(previous):
                self._previous[sig] = previous
                signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        # The loop may be gone when servers stopped out of order left this handler in place.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.draining.set)
        previous = self._previous.get(sig)
        if previous is not None:
            previous(sig, frame)
