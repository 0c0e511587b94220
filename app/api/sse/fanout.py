"""The SSE fan-out (``SSE_FANOUT``, the default): the frames of a committed batch written to
every caught-up subscriber in one pass, with no task switch per subscriber.

Through the plain path, every committed batch wakes every idle subscriber's task, which
takes the batch from the feed's ring, frames it and sends it through the ASGI ``send``
chain: a task step, a few generator resumptions and a ``send`` per subscriber per batch,
most of the CPU a busy fan-out costs and, with a thousand subscribers, most of its latency.
Here a caught-up subscriber is *parked* with the feed (:meth:`~app.eventlog.notify.LogFeed.
wait`) with a :class:`FanoutSink`, and the feed's fan-out pass hands each sink the batch:
the sinks of one filter and frame kind share the batch's chunk, encoded once (frames, then
HTTP chunk framing), and each writes it straight to its connection
(:class:`~app.server.chunks.ChunkWriter`). The subscriber's task stays asleep; it wakes only
for a heartbeat, a disconnect, a drain, or a batch its sink refused:

- its connection's buffer is over the high-water mark (a subscriber that is not reading):
  its task takes the batch, and what commits meanwhile, and writes them as the plain path
  does, waiting within ``SSE_WRITE_TIMEOUT_SECONDS`` (so one that stopped reading is still
  dropped, and nobody waits for it);
- the batch's frames are larger than one write (:data:`~app.api.sse.framing.
  MAX_WRITE_BYTES`): its task writes them in pieces.

The bytes are the plain path's, chunk for chunk: ``tests/api/test_sse.py`` runs every test
with the fan-out, without it, and on the task-group transport, and compares the streams.
``SSE_FANOUT=0`` turns it off; a server without a chunk writer (granian) never takes it.
``/metrics`` counts the frames it wrote (``activity_sse_fanout_frames_total``) and the
batches it handed back to a subscriber's task (``activity_sse_fanout_deferred_total``).
"""

from __future__ import annotations

from typing import Protocol

from app.api.sse.framing import MAX_WRITE_BYTES, FrameBuilder
from app.eventlog.filters import EventFilter
from app.eventlog.notify import FanoutBatch, LogEntry
from app.eventlog.tail import entry_matches
from app.server.chunks import ChunkWriter, chunked

__all__ = ["FanoutCounts", "FanoutSink"]


class FanoutCounts(Protocol):
    """Where the frames the fan-out wrote are counted (for ``/metrics``)."""

    fanout_frames: int


class _Uncounted:
    __slots__ = ("fanout_frames",)

    def __init__(self) -> None:
        self.fanout_frames = 0


#: A batch's chunk for one filter and frame kind, and how many frames it holds (no chunk:
#: nothing matched, or too large for one write).
_Rendered = tuple[bytes | None, int]


class FanoutSink:
    """One SSE stream's sink (:class:`~app.eventlog.notify.Sink`): the stream's filter and
    frame kind, and, once its response has started on a connection that offers one, the
    writer of its chunks (:meth:`bind`)."""

    __slots__ = ("_build", "_counts", "_filter", "_key", "_write")

    def __init__(self, event_filter: EventFilter, build: FrameBuilder) -> None:
        self._filter = None if event_filter.is_empty else event_filter
        self._build = build
        # Sinks with the same key share a batch's chunk.
        self._key = (event_filter, build)
        self._write: ChunkWriter | None = None
        self._counts: FanoutCounts = _Uncounted()

    def if_bound(self) -> FanoutSink | None:
        """This sink, if it has a writer (see :func:`~app.api.sse.framing.event_stream`)."""
        return self if self._write is not None else None

    def bind(self, writer: ChunkWriter, counts: FanoutCounts | None) -> None:
        self._write = writer
        if counts is not None:
            self._counts = counts

    def deliver(self, batch: FanoutBatch) -> bool:
        shared = batch.shared
        rendered: _Rendered | None = shared.get(self._key)
        if rendered is None:
            rendered = shared[self._key] = _render(batch.entries, self._filter, self._build)
        chunk, frames = rendered
        if not frames:
            return True
        writer = self._write
        if chunk is None or writer is None or not writer.write(chunk):
            return False
        self._counts.fanout_frames += frames
        return True


def _render(
    entries: list[LogEntry], event_filter: EventFilter | None, build: FrameBuilder
) -> _Rendered:
    """The chunk the plain path writes for ``entries``: the frames of those the filter
    wants, joined (one write, as :func:`~app.api.sse.framing.event_stream` joins a batch up
    to :data:`MAX_WRITE_BYTES`)."""
    if event_filter is not None:
        entries = [entry for entry in entries if entry_matches(event_filter, entry)]
        if not entries:
            return None, 0
    body = build(entries[0]) if len(entries) == 1 else b"".join(map(build, entries))
    if len(body) > MAX_WRITE_BYTES:
        return None, len(entries)
    return chunked(body), len(entries)
