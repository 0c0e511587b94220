"""The cyclic garbage collector's settings while the service runs.

Python's collector, left at its defaults, collects the young generation every 700 net
allocations and, every hundred of those, walks every tracked object in the process: the
framework, SQLAlchemy, the routes, all of it. The service's hot paths allocate in bursts (a
replayed page is a few thousand events, each with its entry and frames; a batch append
builds its rows, results and feed entries), so at the defaults a replay spent more time in the
collector than in building frames.

While the service runs, what was alive when it started stays alive until it stops. It is
frozen (set aside from every collection), and the young generation is collected every
:data:`YOUNG_THRESHOLD` allocations instead of 700. Reference cycles made later are still
collected. ``python -m bench.run --only replay,http`` measures what it buys.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["YOUNG_THRESHOLD", "settled_heap"]

#: Net allocations between two collections of the young generation (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


@contextmanager
def settled_heap() -> Iterator[None]:
    """Freeze what is alive now and collect the young generation less often, until exit."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, previous[1], previous[2])
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
