"""One request's outcome that the writer process cannot send back (a number past 64 bits)
answers that request alone, and takes neither the writer down nor anybody else's commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.eventlog import AppendError, EventIdReused, LogUnavailable, NewEvent, VersionConflict
from app.events.plan import AppendResult
from tests.eventlog.test_store import table_contents
from tests.eventlog.test_writer_process import new, writer_pid
from tests.support import open_store, sqlite_settings


def overflowing(source_id: str) -> NewEvent:
    # The API refuses such a request where it is parsed; the store itself is given it here,
    # as a request that slipped past every check would reach it.
    event = new(source_id)
    return NewEvent(event.stream, source_id, event.event, event.payload, None, 2**64)


async def test_innocent_commits_beside_an_unencodable_conflict_are_all_acknowledged(
    tmp_path: Path,
) -> None:
    async with open_store(sqlite_settings(tmp_path, "process")) as store:
        await store.append_one(new("victim"))
        pid = writer_pid(store)
        acknowledged: list[AppendResult] = []
        refused: list[BaseException] = []

        async def innocent(writer: int) -> None:
            for n in range(20):
                try:
                    acknowledged.append(await store.append_one(new(f"w{writer}", n)))
                except (AppendError, LogUnavailable) as exc:
                    refused.append(exc)

        async def hostile() -> BaseException:
            # Beside the innocent writers, so that it shares their transactions.
            await asyncio.sleep(0)
            with pytest.raises(AppendError) as caught:
                await store.append_one(overflowing("victim"))
            return caught.value

        *_, error = await asyncio.gather(*(innocent(w) for w in range(20)), hostile())
        assert not isinstance(error, (VersionConflict, EventIdReused))
        assert "could not be reported" in str(error)
        assert refused == []
        assert len(acknowledged) == 400
        assert writer_pid(store) == pid, "the writer process died"
        # The writer goes on.
        after = await store.append_one(new("after"))
        assert writer_pid(store) == pid
    rows = await table_contents(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    in_table = {row[0] for row in rows}
    assert in_table == {1, after.position} | {result.position for result in acknowledged}
    assert len(rows) == 402
