"""Projection snapshots: a projection's rows and checkpoint, kept so that a rebuild need not
fold the whole history again (most of which retention may have moved to archives).

A snapshot is every row of the projection's tables at one checkpoint, read in one
transaction that sees a single state of the database (the rows and the checkpoint agree, as
a step writes both in one transaction), stored gzip-compressed in ``projection_snapshots``.
A rebuild from it puts the rows back and folds only the events after its position, which
gives what a fold of the whole history gives: a fold depends on the events alone.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import Column, Integer, LargeBinary, String, Table, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.backends import backend_of, write_transaction
from app.backends.schema import POSITION
from app.database import metadata
from app.events.envelope import utc_now
from app.projections.base import Projection, checkpoints

__all__ = [
    "Snapshot",
    "newest_snapshot",
    "projection_snapshots",
    "read_snapshot_state",
    "restore_snapshot",
    "store_snapshot",
    "take_snapshot",
]

projection_snapshots = Table(
    "projection_snapshots",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("position", POSITION, primary_key=True),
    Column("created_at", String(24), nullable=False),
    Column("row_count", Integer, nullable=False),
    # gzip of {"table": {"columns": [...], "rows": [[...], ...]}, ...}
    Column("state", LargeBinary, nullable=False),
)


class Snapshot(NamedTuple):
    name: str
    position: int
    created_at: str
    row_count: int


class _TableState(msgspec.Struct):
    columns: list[str]
    rows: list[list[Any]]


_state_decoder = msgspec.json.Decoder(dict[str, _TableState])


async def read_snapshot_state(
    connection: AsyncConnection, projection: Projection
) -> tuple[int, bytes, int]:
    """The projection's checkpoint, its rows as a snapshot's state, and how many, read on
    ``connection`` (inside a transaction that sees one state of the database)."""
    position = (
        await connection.execute(
            select(checkpoints.c.position).where(checkpoints.c.name == projection.name)
        )
    ).scalar_one_or_none()
    state: dict[str, _TableState] = {}
    count = 0
    for table in projection.tables:
        columns = [str(column.name) for column in table.columns]
        key = list(table.primary_key.columns) or list(table.columns)
        rows = (await connection.execute(select(table).order_by(*key))).all()
        state[str(table.name)] = _TableState(columns, [list(row) for row in rows])
        count += len(rows)
    return int(position or 0), gzip.compress(msgspec.json.encode(state), mtime=0), count


async def take_snapshot(engine: AsyncEngine, projection: Projection, *, keep: int = 3) -> Snapshot:
    """Snapshot ``projection`` as it is now; keep its ``keep`` newest snapshots."""
    async with engine.connect() as connection:
        connection = await backend_of(connection).snapshot_transaction(connection)
        async with connection.begin():
            position, state, count = await read_snapshot_state(connection, projection)
    return await store_snapshot(engine, projection.name, position, state, count, keep=keep)


async def store_snapshot(
    engine: AsyncEngine, name: str, position: int, state: bytes, count: int, *, keep: int = 3
) -> Snapshot:
    snapshot = Snapshot(name, position, utc_now(), count)
    async with engine.connect() as connection:
        connection = await write_transaction(connection)
        async with connection.begin():
            await backend_of(connection).upsert(
                connection,
                projection_snapshots,
                [
                    {
                        "name": name,
                        "position": position,
                        "created_at": snapshot.created_at,
                        "row_count": count,
                        "state": state,
                    }
                ],
                key=("name", "position"),
            )
            kept = (
                await connection.execute(
                    select(projection_snapshots.c.position)
                    .where(projection_snapshots.c.name == name)
                    .order_by(projection_snapshots.c.position.desc())
                    .limit(keep)
                )
            ).scalars()
            oldest_kept = min(kept)
            await connection.execute(
                delete(projection_snapshots).where(
                    projection_snapshots.c.name == name,
                    projection_snapshots.c.position < oldest_kept,
                )
            )
    return snapshot


async def newest_snapshot(
    connection: AsyncConnection, name: str, *, through: int | None = None
) -> Snapshot | None:
    """The projection's newest snapshot (at or below position ``through``, if given)."""
    query = select(
        projection_snapshots.c.name,
        projection_snapshots.c.position,
        projection_snapshots.c.created_at,
        projection_snapshots.c.row_count,
    ).where(projection_snapshots.c.name == name)
    if through is not None:
        query = query.where(projection_snapshots.c.position <= through)
    row = (
        await connection.execute(query.order_by(projection_snapshots.c.position.desc()).limit(1))
    ).first()
    return None if row is None else Snapshot(row[0], int(row[1]), row[2], int(row[3]))


async def restore_snapshot(
    connection: AsyncConnection, projection: Projection, snapshot: Snapshot
) -> None:
    """Put the snapshot's rows in the projection's (emptied) tables, in the caller's
    transaction."""
    data = (
        await connection.execute(
            select(projection_snapshots.c.state).where(
                projection_snapshots.c.name == snapshot.name,
                projection_snapshots.c.position == snapshot.position,
            )
        )
    ).scalar_one()
    state = _state_decoder.decode(gzip.decompress(data))
    tables: Sequence[Table] = projection.tables
    for table in tables:
        found = state.get(table.name)
        if found is None or not found.rows:
            continue
        for start in range(0, len(found.rows), 1000):
            await connection.execute(
                insert(table),
                [
                    dict(zip(found.columns, row, strict=True))
                    for row in found.rows[start : start + 1000]
                ],
            )
