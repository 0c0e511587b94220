"""The lean SSE transport (``SSE_LEAN_STREAMS``, the default): an idle subscriber is its
request's suspended task and two pending futures (the feed's wake-up and the receive
channel's disconnect), with no helper task, timer or buffer of its own; a write that the
transport takes at once arms no timer.

What it saves is the plain transport's (:class:`~app.api.sse.transport.TaskGroupSubscriber`)
two more tasks per subscriber and a timer per write: memory and CPU per idle connection, which
a server holding thousands of dashboards open pays for every one of them. It answers byte for
byte as the plain one does (``tests/api/test_sse.py`` runs on both), and
``SSE_LEAN_STREAMS=0`` turns it off.

It relies on three things of CPython's asyncio beyond the public API, each checked by
``tests/api/test_sse_lean_internals.py``, which fails loudly if an upgrade changes them:

- a coroutine can be stepped by hand (``send(None)``), and what it yields when it waits is
  the future it waits on, with ``_asyncio_future_blocking`` set, which the stepper must clear
  before waiting on the future itself (:meth:`_StreamEnd._advance`, :class:`_Resumed`);
- ``Task.uncancel()`` counts the cancellations asked of a task, so that the stream can tell
  the one it asked for (a disconnect, a drain) from any other (:meth:`_StreamEnd.taken`);
- a done callback on a future runs on the loop that owns it, after it resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Coroutine, Generator
from types import CoroutineType
from typing import Any, TypeVar

from litestar.types import HTTPResponseBodyEvent, Receive, ReceiveMessage, Send

from app.api.sse.transport import End, SubscriberResponse

__all__ = ["LeanSubscriber"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _StreamEnd:
    """How a stream is ended from outside its task: the peer disconnects, or the process
    starts draining. Either cancels the stream's task; the stream tells that cancellation from
    any other by :meth:`taken`.

    The disconnect is watched on the receive channel without a task of its own: the pending
    ``receive()`` is resumed from its future's done callback, as a task would resume it, so an
    idle stream costs its own task's suspended stack and that one pending call.
    """

    __slots__ = ("_receive", "_receiving", "pending", "reason", "task")

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task = task
        self.reason: str | None = None
        #: Cancelled for this end, and the cancellation not yet taken.
        self.pending = False
        self._receive = receive
        self._receiving: Coroutine[Any, Any, ReceiveMessage] | None = None
        self._call()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.pending = True
            self.task.cancel()

    def taken(self) -> bool:
        """Whether the cancellation being handled is this end's alone (it is consumed)."""
        if not self.pending:
            return False
        self.pending = False
        return self.task.uncancel() == 0

    async def close(self) -> str | None:
        """No end from outside from now on; returns what ended the stream (None: nothing).
        A cancellation asked for but not delivered yet is taken here, not at the caller's
        next await."""
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            receiving.close()
        if self.reason is None:
            self.reason = _ENDED
            return None
        if self.pending:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            if not self.taken():
                raise asyncio.CancelledError
        return None if self.reason == _ENDED else self.reason

    def _call(self) -> None:
        while self._receiving is None and self.reason is None:
            self._receiving = _as_coroutine(self._receive())
            if self._advance():
                return

    def _advance(self) -> bool:
        """Run the pending receive to its next suspension; False when it has returned."""
        receiving = self._receiving
        assert receiving is not None
        try:
            awaited = receiving.send(None)
        except StopIteration as returned:
            self._receiving = None
            if returned.value["type"] == "http.disconnect":
                self.stop("disconnect")
                return True
            return False  # request body: receive again
        except (Exception, asyncio.CancelledError):
            # A receive channel that fails has no peer left to stream to either.
            self._receiving = None
            logger.debug("SSE receive failed; ending the stream", exc_info=True)
            self.stop("disconnect")
            return True
        if asyncio.isfuture(awaited):
            awaited._asyncio_future_blocking = False
            awaited.add_done_callback(self._resume)
        else:  # a bare yield: asks to be resumed on the next loop iteration
            asyncio.get_running_loop().call_soon(self._resume, None)
        return True

    def _resume(self, _awaited: object) -> None:
        if self._receiving is not None and not self._advance():
            self._call()


_ENDED = "ended"


def _as_coroutine(awaitable: Awaitable[_T]) -> Coroutine[Any, Any, _T]:
    """The awaitable as a coroutine, to be stepped by hand."""
    if isinstance(awaitable, CoroutineType | Coroutine):
        return awaitable
    return _awaiting(awaitable)


async def _awaiting(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


async def _send_within(send: Send, message: HTTPResponseBodyEvent, seconds: float) -> None:
    """``await send(message)``, raising TimeoutError if it takes longer than ``seconds``.

    A send to a peer that keeps reading completes without waiting (the transport takes the
    bytes): the send is started by hand, and a timer is armed only if it has to wait. That
    spares a timer per frame, a tenth of a heartbeat's cost.
    """
    sending = _as_coroutine(send(message))
    try:
        awaited = sending.send(None)
    except StopIteration:
        return
    async with asyncio.timeout(seconds):
        await _Resumed(sending, awaited)


class _Resumed:
    """Awaits the rest of a coroutine that was started by hand and is suspended on
    ``awaited``: the task waits on what the coroutine waits on, and what the task is thrown
    (a cancellation) is thrown into the coroutine, as ``await`` would do."""

    __slots__ = ("_awaited", "_coroutine")

    def __init__(self, coroutine: Coroutine[Any, Any, None], awaited: Any) -> None:
        self._coroutine = coroutine
        self._awaited = awaited

    def __await__(self) -> Generator[Any, None, None]:
        coroutine, awaited = self._coroutine, self._awaited
        while True:
            try:
                yield awaited
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    awaited = coroutine.throw(error)
                except StopIteration:
                    return
                continue
            try:
                awaited = coroutine.send(None)
            except StopIteration:
                return


class _Drain:
    """The open streams of one application, all ended when its ``draining`` event is set: one
    task waits for the event while any stream is open, rather than one per stream."""

    __slots__ = ("_ends", "_waiting")

    def __init__(self) -> None:
        self._ends: set[_StreamEnd] = set()
        self._waiting: asyncio.Task[None] | None = None

    def add(self, end: _StreamEnd, draining: asyncio.Event) -> None:
        if draining.is_set():
            end.stop("drain")
            return
        self._ends.add(end)
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_task(
                self._wait(draining), name="sse-drain"
            )

    def discard(self, end: _StreamEnd) -> None:
        self._ends.discard(end)
        if not self._ends and self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    async def _wait(self, draining: asyncio.Event) -> None:
        await draining.wait()
        self._waiting = None
        ends, self._ends = self._ends, set()
        for end in ends:
            end.stop("drain")


#: Keyed by the application's ``draining`` event (one per application, and per event loop).
_drains: weakref.WeakKeyDictionary[asyncio.Event, _Drain] = weakref.WeakKeyDictionary()


class LeanSubscriber(SubscriberResponse):
    """Streams the iterator from the request's own task; a disconnect or a drain cancels it
    (see :class:`_StreamEnd`), and a send that does not complete in time ends it."""

    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        iterator = self.iterator
        task = asyncio.current_task()
        assert task is not None
        end = _StreamEnd(task, receive)
        drain = None
        if self.draining is not None:
            drain = _drains.get(self.draining)
            if drain is None:
                drain = _drains[self.draining] = _Drain()
            drain.add(end, self.draining)
        how: End = "ended"
        try:
            try:
                async for chunk in iterator:
                    body = chunk if isinstance(chunk, bytes) else chunk.encode()
                    await _send_within(
                        send,
                        {"type": "http.response.body", "body": body, "more_body": True},
                        self.write_timeout,
                    )
                    # Not held while the stream waits for its next frame.
                    chunk = body = b""
                    if end.reason is not None:
                        break  # its cancellation was swallowed on the way
            except asyncio.CancelledError:
                if not end.taken():
                    raise
            except TimeoutError:
                how = "timeout"
            reason = await end.close()
            if reason == "disconnect":
                how = "disconnect"
            elif reason == "drain":
                how = "drain"
        finally:
            if drain is not None:
                drain.discard(end)
            await end.close()
            await self.close_iterator()
        await self.finish(send, how)
