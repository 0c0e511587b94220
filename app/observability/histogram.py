"""Histograms the code updates as it runs and ``GET /metrics`` renders in the Prometheus
text format (:mod:`app.api.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Histogram"]


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus' histogram)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ``+Inf`` last."""
        found, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            found.append((bound, running))
        found.append((float("inf"), self.count))
        return found
