"""The SQLite appender in a process of its own: what happens when that process dies, when the
service dies, and the framing between the two."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from app.backends import GuardedWrite
from app.backends.sqlite.process import _ChildInbox, _frame
from app.backends.sqlite.serve import Ask
from app.eventlog import EventStore, LogUnavailable, NewEvent, canonical_payload
from tests.eventlog.test_store import table_contents, write_lock_held_elsewhere
from tests.support import alive, open_store, sqlite_settings


def new(source_id: str, n: int = 0) -> NewEvent:
    return NewEvent("agents", source_id, "progress", canonical_payload({"n": n}))


def writer_pid(store: EventStore) -> int:
    appender: Any = store._appender
    return int(appender._process.pid)


def gone(pid: int, timeout: float) -> bool:
    """True once process ``pid`` has exited (or is a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def test_a_writer_that_dies_refuses_what_it_held_and_the_next_append_restarts_it(
    tmp_path: Path,
) -> None:
    async with open_store(sqlite_settings(tmp_path, "process")) as store:
        await store.append([new("s", n) for n in range(3)])
        first = writer_pid(store)
        with write_lock_held_elsewhere(tmp_path / "events.db"):
            # Handed over, and waiting for SQLite's lock inside the writer when it dies.
            in_flight = asyncio.create_task(store.append_one(new("s", 3)))
            await asyncio.sleep(0.2)
            os.kill(first, signal.SIGKILL)
            with pytest.raises(LogUnavailable, match="writer process stopped before answering"):
                await asyncio.wait_for(in_flight, 5)
        assert await store.probe() == (
            "the event log's writer process is not running (the next append starts it)"
        )

        # A new writer: positions and the source's versions go on from the table.
        result = await asyncio.wait_for(store.append_one(new("s", 4)), 10)
        assert writer_pid(store) != first
        assert (result.position, result.version) == (4, 4)
        assert await store.probe() is None
        assert store.metrics.failed_transactions == 1
    rows = await table_contents(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    assert [(row[0], row[3]) for row in rows] == [(1, 1), (2, 2), (3, 3), (4, 4)]


async def test_a_turn_waiting_on_a_dead_writer_is_let_go(tmp_path: Path) -> None:
    async with open_store(sqlite_settings(tmp_path, "process")) as store:
        entered = asyncio.Event()

        async def second_turn() -> None:
            async with store.write_turn():
                entered.set()

        async with store.write_turn():
            # The second turn waits behind the first; the writer dies meanwhile.
            waiting = asyncio.create_task(second_turn())
            await asyncio.sleep(0.1)
            assert not entered.is_set()
            os.kill(writer_pid(store), signal.SIGKILL)
            await asyncio.wait_for(waiting, 5)
        assert entered.is_set()
        assert (await asyncio.wait_for(store.append_one(new("after")), 10)).position == 1


async def test_a_guarded_write_after_the_writer_died_starts_a_new_one(tmp_path: Path) -> None:
    # Projection steps write through the writer too, and must not wait for an append.
    async with open_store(sqlite_settings(tmp_path, "process")) as store:
        first = writer_pid(store)
        os.kill(first, signal.SIGKILL)
        assert gone(first, 5)
        await asyncio.sleep(0.1)  # the service has seen its end of the socket close
        write = GuardedWrite("SELECT count(*) FROM events", [], [[0]], [])
        assert await asyncio.wait_for(store.write_guarded(write), 10) is True
        assert writer_pid(store) != first


SERVICE_THEN_CRASH = """
import asyncio, os, sys
from app.config import DatabaseSettings
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent, canonical_payload

async def main(url):
    await upgrade_database(url)
    store = await EventStore.open(create_engine(url), DatabaseSettings(sqlite_appender="process"))
    await store.append_one(NewEvent("agents", "s", "progress", canonical_payload({})))
    print(store._appender._process.pid, flush=True)
    os.kill(os.getpid(), 9)

asyncio.run(main(sys.argv[1]))
"""


def test_the_writer_exits_when_the_service_is_killed(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    crashed = subprocess.run(
        [sys.executable, "-c", SERVICE_THEN_CRASH, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    pid = int(crashed.stdout.split()[0])
    # Its end of the socket closed with the service: nothing is left writing to the log.
    assert gone(pid, 10), f"the writer process {pid} outlived the service"


UNGUARDED_SCRIPT = """
import asyncio, sys
from app.database import create_engine, upgrade_database
from app.eventlog import EventStore, NewEvent, canonical_payload

async def main(url):
    await upgrade_database(url)
    store = await EventStore.open(create_engine(url))
    result = await store.append_one(NewEvent("agents", "s", "progress", canonical_payload({})))
    await store.close()
    print("appended at", result.position)

asyncio.run(main(sys.argv[1]))  # no `if __name__ == "__main__":` around it
"""


def test_a_script_without_a_main_guard_can_append(tmp_path: Path) -> None:
    # The writer is a fresh interpreter running its own module: the script is not run again
    # in it (as multiprocessing's start methods would, starting a writer in the writer).
    script = tmp_path / "append.py"
    script.write_text(UNGUARDED_SCRIPT)
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    ran = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "appended at 1"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield ours, theirs


def test_frames_are_read_whole_however_they_arrive(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    frames = _ChildInbox(theirs)
    requests = [[new("s", n) for n in range(700)]]
    data = (
        _frame(Ask.APPEND, msgspec.json.encode(requests))
        + _frame(Ask.STOP)
        + _frame(Ask.HOLD, msgspec.msgpack.encode(7))
    )
    assert len(data) > 3 * 4096
    ours.sendall(data[:3])
    assert frames.next(0.05) is None  # not even a whole length yet
    for start in range(3, len(data), 4096):  # the rest in pieces that split every frame
        ours.sendall(data[start : start + 4096])
    assert frames.next(1.0) == (Ask.APPEND, requests)
    assert frames.next(0.0) == (Ask.STOP, None)
    assert frames.next(None) == (Ask.HOLD, 7)
    assert frames.next(0.0) is None
    ours.close()
    with pytest.raises(EOFError):
        frames.next(None)
