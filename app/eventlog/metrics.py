"""What the append path counts as it runs, for ``GET /metrics`` and ``/health``."""

from __future__ import annotations

import time
from bisect import bisect_left

from app.observability import Histogram

__all__ = ["AppendFailure", "AppendMetrics"]

# Seconds from an append's arrival to its acknowledgement (group-commit wait + write + fsync).
_LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Events per group-committed transaction.
_BATCH_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class _Buckets(Histogram):
    """The same buckets, found by bisection: this one is observed once per append request."""

    __slots__ = ()

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        index = bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1


class AppendFailure:
    """The newest failed transaction, until a later one commits."""

    __slots__ = ("at", "detail")

    def __init__(self, detail: str) -> None:
        self.detail = detail
        self.at = time.time()


class AppendMetrics:
    def __init__(self) -> None:
        #: Append requests by outcome: ok, conflict (409, nothing written), unavailable (503).
        self.requests = {"ok": 0, "conflict": 0, "unavailable": 0}
        #: Events written (duplicates of an earlier event_id are not written again).
        self.events = 0
        self.transactions = 0
        self.failed_transactions = 0
        self.latency: Histogram = _Buckets(_LATENCY_BOUNDS)
        self.batch_events: Histogram = _Buckets(_BATCH_BOUNDS)
        self.commit_seconds: Histogram = _Buckets(_LATENCY_BOUNDS)
        self.last_failure: AppendFailure | None = None
