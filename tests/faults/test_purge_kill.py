"""A purge killed (SIGKILL) at each of its steps (its segment's rows removed in three
transactions): every event stays either in the table or in
a complete archive segment, never neither, and no segment that looks complete is not; the
next purge (after a restart) cleans up and finishes, leaving each event in exactly one place.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import msgspec

from app.eventlog import Event, EventStore, NewEvent, canonical_payload
from app.eventlog.archives import history, list_segments
from tests.faults.purge_child import BATCH
from tests.support import ROOT, open_store

STEPS = [
    "segment-unsynced",
    "segment-unrenamed",
    "manifest-missing",
    "manifest-unrenamed",
    "rows-not-removed",
    "removal-in-flight",
    "rows-removed-1",  # the segment recorded, its first rows removed, the rest still there
    "rows-removed-2",
    "rows-removed-3",  # all removed, the segment marked done
]


async def fill(store: EventStore) -> list[Event]:
    for round_ in range(60):
        batch = []
        for source in range(10):
            payload = canonical_payload({"agent_name": "a", "n": round_})
            batch.append(NewEvent("agent", f"run-{source}", "heartbeat", payload))
            if round_ % 20 == 0:
                batch.append(NewEvent("agent", f"run-{source}", "progress", payload))
        await store.append(batch)
    return (await store.read_after(0, limit=100_000)).events


async def run_child(url: str, directory: Path, step: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.purge_child",
        url,
        str(directory),
        step,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, (out + err).decode()


def complete_segments(directory: Path) -> dict[str, list[Event]]:
    """Every segment that looks complete (its manifest is there), checked against it: a
    segment whose manifest is there but which does not match it fails the test."""
    found: dict[str, list[Event]] = {}
    for manifest_path in sorted(directory.glob("*.manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        data = (directory / manifest["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["sha256"], manifest_path.name
        events = [
            msgspec.json.decode(line, type=Event) for line in gzip.decompress(data).splitlines()
        ]
        assert len(events) == manifest["count"]
        assert (events[0].position, events[-1].position) == (
            manifest["first_position"],
            manifest["last_position"],
        )
        found[manifest["name"]] = events
    return found


async def test_a_purge_killed_at_each_step_loses_nothing(database_url: str, tmp_path: Path) -> None:
    directory = tmp_path / "log-archive"
    async with open_store(database_url) as store:
        written = await fill(store)
    by_position = {event.position: event for event in written}

    for step in STEPS:
        code, output = await run_child(database_url, directory, step)
        assert code == -signal.SIGKILL, f"{step}: {code} {output}"
        # As found after the crash: each event in the table or in a complete segment.
        async with open_store(database_url) as store:
            table = {
                event.position: event for event in (await store.read_after(0, limit=100_000)).events
            }
            async with store.engine.connect() as connection:
                recorded = {segment.name for segment in await list_segments(connection)}
                # The history reads back whole and once, rows not yet removed included.
                merged = [e async for page in history(connection, directory) for e in page]
        assert merged == written, step
        segments = complete_segments(directory)
        archived = {event.position: event for events in segments.values() for event in events}
        assert recorded <= set(segments), f"{step}: a recorded segment is not complete on disk"
        missing = set(by_position) - set(table) - set(archived)
        assert not missing, f"{step}: events neither in the table nor in a segment: {missing}"
        for position, event in {**table, **archived}.items():
            assert by_position[position] == event, step

    # Restarted: the next purge removes what the crashes left and finishes.
    code, output = await run_child(database_url, directory, "none")
    assert code == 0, output
    assert not [path.name for path in directory.iterdir() if path.name.startswith(".")]
    async with open_store(database_url) as store:
        table = [event.position for event in (await store.read_after(0, limit=100_000)).events]
        async with store.engine.connect() as connection:
            recorded = {segment.name for segment in await list_segments(connection)}
    segments = complete_segments(directory)
    assert set(segments) == recorded
    archived = [event.position for events in segments.values() for event in events]
    # Each event in exactly one place; every heartbeat but each source's newest archived.
    assert sorted(table + archived) == sorted(by_position)
    assert len(archived) == len(set(archived))
    assert len(archived) == 60 * 10 - 10
    assert all(len(events) <= BATCH for events in segments.values())
