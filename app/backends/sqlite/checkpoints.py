"""WAL checkpoints made beside the log's writer, not inside its commits.

SQLite's automatic checkpoint runs inside the commit that crosses its mark: that commit copies
the WAL's pages into the database file and syncs it before it returns, and every append
waiting for the next transaction waits for the copy too. A purge, whose deletes touch a page
of every index per row, crosses the mark often, and those commits were the slowest appends
of all.

So the writer's connection never checkpoints by itself (``wal_autocheckpoint=0``), and a
:class:`Checkpointer` thread with a connection of its own copies the WAL into the database
every :data:`CHECKPOINT_SECONDS` with a PASSIVE checkpoint, which takes no lock the writer
needs: commits go on while it copies and syncs.

What a thread beside the writer cannot do is let the WAL start over. SQLite writes the WAL
from its beginning again only when a write transaction starts with every frame copied, and
under steady appends a frame committed during the copy is always left. So once the WAL holds
:data:`RESTART_FRAMES` frames, the checkpointer asks the writer (:meth:`Checkpointer.due`) to
copy what is left itself between two of its transactions: a few frames, where SQLite's own
mark would have copied all of them. The next transaction then starts the WAL over, unless a
reader still reads from it (as before: a reader's snapshot keeps its frames).

Durability is unchanged: a commit is on disk once its WAL frames are synced, whoever copies
them into the database file later.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

__all__ = ["CHECKPOINT_SECONDS", "RESTART_FRAMES", "Checkpointer"]

logger = logging.getLogger(__name__)

#: Seconds between two copies of the WAL into the database file.
CHECKPOINT_SECONDS = 0.5
#: Frames (pages) in the WAL beyond which the writer is asked to let it start over: about
#: 40 MiB of WAL at SQLite's default page size, SQLite's own mark as the pool sets it.
RESTART_FRAMES = 10_000


class Checkpointer:
    """A thread that copies ``path``'s WAL into the database every ``interval`` seconds,
    until :meth:`stop`."""

    def __init__(
        self,
        path: Path,
        *,
        interval: float | None = None,
        restart_frames: int | None = None,
    ) -> None:
        self._path = path
        self._interval = CHECKPOINT_SECONDS if interval is None else interval
        self._restart_frames = RESTART_FRAMES if restart_frames is None else restart_frames
        self._stopping = threading.Event()
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        #: The WAL's frames and how many of them were in the database after the last copy.
        self.last: tuple[int, int] = (0, 0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def due(self) -> bool:
        """Whether the writer should copy the rest of the WAL itself now (once per ask)."""
        if not self._due.is_set():
            return False
        self._due.clear()
        return True

    def _run(self) -> None:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            # A checkpoint that finds another one running gives up at once: it is the next
            # round's work.
            connection.execute("PRAGMA busy_timeout=0")
            while not self._stopping.wait(self._interval):
                self._copy(connection)
        finally:
            connection.close()

    def _copy(self, connection: sqlite3.Connection) -> None:
        try:
            _busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            # The writer reports a database that cannot be written; here it only means the
            # WAL is copied at a later round.
            logger.debug("WAL checkpoint failed: %s", exc)
            return
        if frames < 0:  # not in WAL mode (yet)
            return
        self.last = (frames, copied)
        if frames >= self._restart_frames:
            self._due.set()
