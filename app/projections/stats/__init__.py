"""Stats: a projection counting what would otherwise need a scan of the log (``events.total``
and per-stream counts) and keeping the feed of recently finished work, and the snapshot that
``GET /stats`` serves.

``events.total`` is counted rather than derived from positions: positions are gapless within
one log, but a log imported with an offset starts above 1, so its head is not a count. The
ingest and agent numbers are read from their own projections' tables, so ``/stats`` always
agrees with ``/ingests`` and ``/agents``.
"""

from __future__ import annotations

from app.projections.stats._projection import (
    EVENTS_TOTAL,
    RECENT_KEEP,
    STREAM_PREFIX,
    StatsProjection,
    stats_counters,
    stats_recent,
)
from app.projections.stats._snapshot import (
    SNAPSHOT_PROJECTIONS,
    ActiveIngest,
    AgentCounts,
    EventCounts,
    IngestCounts,
    RecentItem,
    Stats,
    read_stats,
)

__all__ = [
    "EVENTS_TOTAL",
    "RECENT_KEEP",
    "SNAPSHOT_PROJECTIONS",
    "STREAM_PREFIX",
    "ActiveIngest",
    "AgentCounts",
    "EventCounts",
    "IngestCounts",
    "RecentItem",
    "Stats",
    "StatsProjection",
    "read_stats",
    "stats_counters",
    "stats_recent",
]
