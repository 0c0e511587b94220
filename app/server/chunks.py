"""A streamed response's body chunks written straight to its connection, without an ASGI
``send``: what lets the SSE fan-out (:mod:`app.api.sse.fanout`) hand a committed batch to a
thousand subscribers in one pass, with no task switch per subscriber.

:class:`ChunkWriter` does exactly what uvicorn's ``send`` of an ``http.response.body``
message with ``more_body`` does on a chunked response (it writes ``size CRLF body CRLF`` to
the transport), and only when that ``send`` would not wait: the response has started with
chunked framing and is not complete, the peer is connected, and the transport is below its
high-water mark. Otherwise it refuses, and the caller goes through ``send``, which waits.

It relies on uvicorn's ``RequestResponseCycle`` beyond the ASGI interface: its ``scope``,
``transport``, ``flow`` (``write_paused``), ``response_started``, ``response_complete``,
``chunked_encoding`` and ``disconnected`` attributes, and the framing its ``send`` writes.
``tests/server/test_chunks.py`` fails loudly if an upgrade changes any of them; until this
module is mended, ``SSE_FANOUT=0`` serves every subscriber through ``send``. Under a server
that offers no cycle (granian), there is no writer and ``send`` serves everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ChunkWriter", "chunked"]


def chunked(body: bytes) -> bytes:
    """``body`` as one chunk of a chunked HTTP/1.1 response (never empty: an empty chunk
    ends the response)."""
    return b"%x\r\n%s\r\n" % (len(body), body)


class ChunkWriter:
    """Writes whole chunks (:func:`chunked`) to one response's connection while ``send``
    would write them at once; see the module's docstring."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow
        self._transport = cycle.transport

    @classmethod
    def of(cls, cycle: Any, scope: Mapping[str, Any]) -> ChunkWriter | None:
        """A writer for the response to ``scope`` if ``cycle`` is its uvicorn cycle and the
        response is a started chunked body (not a ``HEAD``); None otherwise."""
        if (
            cycle is None
            or getattr(cycle, "scope", None) is not scope
            or scope.get("method") == "HEAD"
            or getattr(cycle, "chunked_encoding", None) is not True
            or getattr(cycle, "response_started", False) is not True
            or getattr(cycle, "response_complete", True) is not False
        ):
            return None
        return cls(cycle)

    def write(self, chunk: bytes) -> bool:
        """Write ``chunk`` now, as ``send`` would; False (nothing written) when ``send``
        would wait for the peer or write nothing."""
        cycle = self._cycle
        if (
            self._flow.write_paused
            or cycle.disconnected
            or cycle.response_complete
            or self._transport.is_closing()
        ):
            return False
        self._transport.write(chunk)
        return True
