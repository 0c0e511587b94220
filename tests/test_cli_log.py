"""``log status``, ``log purge``, ``export --include-archives`` with ``import``, and
``projections snapshot`` / ``rebuild [--from-archives]``, run as real processes."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from app.eventlog import NewEvent, canonical_payload
from app.projections import all_projections
from tests.test_cli_commands import log_store, ndjson_lines, run_cli, table_rows

# The log's own events are seconds old here: heartbeats expire after one.
RULES = "agent/heartbeat=1s,agent=90d,ingest=keep"


async def test_a_purge_from_the_command_line_is_shown_exported_imported_and_rebuilt(
    database_url: str, other_database_url: str, tmp_path: Path
) -> None:
    archive = tmp_path / "log-archive"
    env = {
        "DATABASE_URL": database_url,
        "LOG_ARCHIVE_DIR": str(archive),
        "RETENTION_RULES": RULES,
        "RETENTION_BATCH_EVENTS": "100",
    }
    async with log_store(database_url) as store:
        for round_ in range(50):
            await store.append(
                [
                    NewEvent(
                        "agent",
                        f"run-{n}",
                        "progress" if round_ % 10 == 0 else "heartbeat",
                        canonical_payload({"agent_name": "tagger", "message": f"{round_}"}),
                    )
                    for n in range(6)
                ]
            )
    whole = await run_cli("export", env=env)
    assert whole.code == 0, whole.stderr
    await asyncio.sleep(1.1)
    assert (await run_cli("projections", "rebuild", env=env)).code == 0

    before = json.loads((await run_cli("log", "status", "--json", env=env)).stdout)
    assert before["events"] == before["head"] == 300
    assert before["archived"] == []
    # Every heartbeat but each source's newest (6 sources: 6 kept).
    assert before["next_removal"] == [
        {"rule": "agent/heartbeat=1s", "events": 270 - 6},
        {"rule": "agent=90d", "events": 0},
    ]

    purged = await run_cli("log", "purge", env=env)
    assert purged.code == 0, purged.stderr
    assert purged.stdout.strip() == "archived and removed 264 events in 3 segments"

    after = json.loads((await run_cli("log", "status", "--json", env=env)).stdout)
    assert after["events"] == 36
    assert after["head"] == 300
    assert after["streams"] == [{"stream": "agent", "oldest_position": 1, "events": 36}]
    assert [segment["count"] for segment in after["archived"]] == [100, 100, 64]
    assert sorted(path.name for path in archive.glob("*.ndjson.gz")) == [
        segment["segment"] for segment in after["archived"]
    ]
    assert after["next_removal"][0] == {"rule": "agent/heartbeat=1s", "events": 0}
    text = (await run_cli("log", "status", env=env)).stdout
    assert "log: 36 events, head 300" in text
    assert "archived: 264 events in 3 segments" in text
    first = after["archived"][0]
    assert f"positions {first['first']}-{first['last']}: 100 events in {first['segment']}" in text
    assert "agent/heartbeat=1s: 0 events" in text

    # Export with the archives is the whole history, byte for byte; without them it is what
    # the table keeps, and an import of it says what is missing.
    full = await run_cli("export", "--include-archives", env=env)
    assert full.code == 0, full.stderr
    assert full.stdout == whole.stdout
    kept = await run_cli("export", env=env)
    assert len(ndjson_lines(kept.stdout)) == 36
    (tmp_path / "kept.ndjson").write_text(kept.stdout)
    (tmp_path / "full.ndjson").write_text(full.stdout)
    target = {**env, "DATABASE_URL": other_database_url}
    refused = await run_cli("import", str(tmp_path / "kept.ndjson"), env=target)
    assert refused.code == 1
    assert "--include-archives" in refused.stderr
    restored = await run_cli("import", str(tmp_path / "full.ndjson"), env=target)
    assert restored.code == 0, restored.stderr
    assert (await run_cli("export", env=target)).stdout == whole.stdout

    # Projections: the imported log folds to the rows of the original; a rebuild through the
    # archives and one from a snapshot give them too.
    projection_tables = [t.name for p in all_projections() for t in p.tables]

    async def projected(url: str) -> dict[str, object]:
        rows = await table_rows(url)
        return {name: rows[name] for name in projection_tables}

    expected = await projected(other_database_url)
    full_rebuild = await run_cli("projections", "rebuild", "--from-archives", env=env)
    assert full_rebuild.code == 0, full_rebuild.stderr
    assert await projected(database_url) == expected
    snapshot = await run_cli("projections", "snapshot", env=env)
    assert snapshot.code == 0, snapshot.stderr
    assert "snapshot of agents at position 300" in snapshot.stdout

    # Without the archive: the snapshot still rebuilds; a full rebuild refuses, naming what
    # is missing, and changes nothing.
    shutil.rmtree(archive)
    from_snapshot = await run_cli("projections", "rebuild", env=env)
    assert from_snapshot.code == 0, from_snapshot.stderr
    assert await projected(database_url) == expected
    missing = await run_cli("projections", "rebuild", "--from-archives", env=env)
    assert missing.code == 1
    assert "rebuild refused, nothing changed" in missing.stderr
    assert after["archived"][0]["segment"] in missing.stderr
    assert "Traceback" not in missing.stderr
    assert await projected(database_url) == expected
