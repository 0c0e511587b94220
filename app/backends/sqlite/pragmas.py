"""The settings of every SQLite connection: the service's pool and the log's writer.

Apart from the engines (``app.database``), so that the log's writer process starts without
importing SQLAlchemy.
"""

from __future__ import annotations

__all__ = ["SQLITE_PRAGMAS"]

# WAL lets readers run beside the single writer; synchronous=FULL makes every commit durable
# (acknowledged = on disk). busy_timeout makes a second writer wait instead of failing at once.
SQLITE_PRAGMAS = (
    # First, so that the pragmas after it wait too (switching a new file to WAL needs a lock).
    "PRAGMA busy_timeout=10000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # The log's writer turns this off and checkpoints beside its commits
    # (app/backends/sqlite/checkpoints.py); for any other connection that writes:
    # checkpoint once the WAL holds 10,000 pages (about 40 MiB), not SQLite's 1,000: the
    # commit that crosses the mark copies the WAL into the database file and syncs it, and a
    # hot index page rewritten by many commits is copied once per checkpoint rather than
    # once per thousand pages. Durability is unchanged: a commit is on disk once its WAL
    # frames are synced.
    "PRAGMA wal_autocheckpoint=10000",
)
