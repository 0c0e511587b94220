"""A purge run in a process of its own that kills itself (SIGKILL) at a named step:
``python -m tests.faults.purge_child DATABASE_URL ARCHIVE_DIR STEP``. The rules are those of
tests/faults/test_purge_kill.py, applied eight days from now."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.config import DatabaseSettings
from app.config.retention import parse_rule
from app.eventlog import EventStore
from app.eventlog.retention import Retention
from app.runtime import files
from tests.support import open_store

RULES = [parse_rule(rule) for rule in ("agent/heartbeat=7d", "agent=90d")]
BATCH = 40
#: Rows removed per transaction: a segment's rows go in three (15, 15, 10).
DELETE_ROWS = 15


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(module: Any, name: str, call: int, *, after: bool = False) -> None:
    """Kill the process at the ``call``-th call of ``module.name`` (before it, or after)."""
    original = getattr(module, name)
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call and not after:
            die()
        result = original(*args, **kwargs)
        if calls == call and after:
            die()
        return result

    setattr(module, name, wrapped)


def arm(step: str) -> None:
    # Each batch writes two files (segment, manifest): write_atomically's calls (and
    # os.replace's) 1 and 2 are the first batch's, 3 and 4 the second's; os.fsync is called
    # twice a file (the file, its directory).
    if step == "segment-unsynced":  # the second batch's segment, written but not synced
        kill_on_call(files.os, "fsync", 5)
    elif step == "segment-unrenamed":  # synced under its temporary name
        kill_on_call(files.os, "replace", 3)
    elif step == "manifest-missing":  # the segment in place, its manifest not yet written
        kill_on_call(files, "write_atomically", 4)
    elif step == "manifest-unrenamed":
        kill_on_call(files.os, "replace", 4)
    # A segment's rows go in three transactions (write_guarded calls): the second batch's
    # are calls 4, 5 and 6; the first of them records the segment, the last marks it done.
    elif step == "rows-not-removed":  # both files complete, the removal not yet asked for
        original = EventStore.write_guarded
        calls = 0

        async def before(self: EventStore, write: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 4:
                die()
            return await original(self, write)

        EventStore.write_guarded = before  # type: ignore[method-assign]
    elif step == "removal-in-flight":  # asked for, not answered
        original_in_flight = EventStore.write_guarded
        calls_in_flight = 0

        async def during(self: EventStore, write: Any) -> bool:
            nonlocal calls_in_flight
            calls_in_flight += 1
            if calls_in_flight == 4:
                in_flight = asyncio.ensure_future(original_in_flight(self, write))
                await asyncio.sleep(0.005)
                die()
                await in_flight  # never reached
            return await original_in_flight(self, write)

        EventStore.write_guarded = during  # type: ignore[method-assign]
    elif step.startswith("rows-removed-"):  # after the second batch's Nth removal committed
        original_after = EventStore.write_guarded
        calls_after = 0
        last = 3 + int(step.removeprefix("rows-removed-"))

        async def after(self: EventStore, write: Any) -> bool:
            nonlocal calls_after
            calls_after += 1
            written = await original_after(self, write)
            if calls_after == last:
                die()
            return written

        EventStore.write_guarded = after  # type: ignore[method-assign]
    elif step != "none":
        raise SystemExit(f"unknown step {step}")


async def main(url: str, directory: str, step: str) -> None:
    # ``files`` is looked up by the archive module at each call: patching it here reaches it.
    arm(step)
    async with open_store(DatabaseSettings(url=url)) as store:
        retention = Retention(
            store,
            RULES,
            Path(directory),
            batch_events=BATCH,
            delete_rows=DELETE_ROWS,
            clock=lambda: datetime.now(UTC) + timedelta(days=8),
        )
        result = await retention.purge()
    print(result.removed, flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
