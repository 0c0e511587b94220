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
copy what is left itself between two of its transactions. The next transaction then starts
the WAL over, unless a reader still reads from it (as before: a reader's snapshot keeps its
frames).

What the writer copies, appends wait for. Under a purge, whose deletes write hundreds of
frames a transaction, the frames committed since the last round are thousands, and copying
and syncing them from the writer held appends up for tens of milliseconds. So from the
moment the WAL crosses the mark until the writer has copied (:meth:`Checkpointer.restarting`),
the writer holds back background writes that yield (app/backends/sqlite/serve.py), and the
checkpointer copies again, round after round, each copying only what was committed during
the one before, until that is at most :data:`RESIDUE_FRAMES`: the writer's copy is then what
a few appends wrote.

SQLite syncs the database file only after a copy that reached the end of the WAL, which under
steady appends only the writer's copy does: that sync then wrote out every page the rounds
before it had copied, megabytes under a purge, while appends waited. So the checkpointer
syncs the database file itself after each round, and the writer's sync finds little left to
write. (Durability does not rest on this sync: SQLite's own syncs are all still made.)

Durability is unchanged: a commit is on disk once its WAL frames are synced, whoever copies
them into the database file later.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

__all__ = [
    "CATCH_UP_ROUNDS",
    "CHECKPOINT_SECONDS",
    "RESIDUE_FRAMES",
    "RESTART_FRAMES",
    "Checkpointer",
]

logger = logging.getLogger(__name__)

#: Seconds between two copies of the WAL into the database file.
CHECKPOINT_SECONDS = 0.5
#: Frames (pages) in the WAL beyond which the writer is asked to let it start over: about
#: 40 MiB of WAL at SQLite's default page size, SQLite's own mark as the pool sets it.
RESTART_FRAMES = 10_000
#: Frames committed during the checkpointer's last round, at most, when it asks the writer to
#: copy the rest (or it asks after :data:`CATCH_UP_ROUNDS` rounds, however many there are).
RESIDUE_FRAMES = 256
CATCH_UP_ROUNDS = 8


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
        #: Set from the moment the WAL crosses the mark until the writer has copied the rest.
        self._restarting = threading.Event()
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

    def restarting(self) -> bool:
        """Whether the WAL is to start over once the writer has copied the rest of it: until
        then, writes that can wait should."""
        return self._restarting.is_set()

    def copied(self) -> None:
        """The writer has copied the rest of the WAL (or tried to)."""
        self._restarting.clear()

    def _run(self) -> None:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        database = os.open(self._path, os.O_RDONLY)
        try:
            # A checkpoint that finds another one running gives up at once: it is the next
            # round's work.
            connection.execute("PRAGMA busy_timeout=0")
            while not self._stopping.wait(self._interval):
                self._copy(connection, database)
        finally:
            os.close(database)
            connection.close()

    def _copy(self, connection: sqlite3.Connection, database: int) -> None:
        found = self._checkpoint(connection, database)
        if found is None or found[0] < self._restart_frames:
            return
        # From here the writer holds back what can wait, so each round copies less.
        self._restarting.set()
        for _ in range(CATCH_UP_ROUNDS):
            before = found[0]
            found = self._checkpoint(connection, database)
            if found is None:
                self._restarting.clear()
                return
            if found[0] - before <= RESIDUE_FRAMES or self._stopping.is_set():
                break
        self._due.set()

    def _checkpoint(self, connection: sqlite3.Connection, database: int) -> tuple[int, int] | None:
        """One PASSIVE copy, and the database file synced: the WAL's frames and how many are
        in the database now, or None if there is no WAL (yet) or the copy failed."""
        try:
            _busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if copied > 0:
                _sync(database)
        except (sqlite3.Error, OSError) as exc:
            # The writer reports a database that cannot be written; here it only means the
            # WAL is copied at a later round.
            logger.debug("WAL checkpoint failed: %s", exc)
            return None
        if frames < 0:  # not in WAL mode (yet)
            return None
        self.last = (frames, copied)
        return frames, copied


def _sync(descriptor: int) -> None:
    # The file's data, not its times: what the writer's own sync would otherwise write.
    getattr(os, "fdatasync", os.fsync)(descriptor)
