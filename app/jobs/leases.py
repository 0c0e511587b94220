"""Claims on server-owned jobs (ingests, agent runs), with leases.

A job's state lives in the log (and its projection); this module only decides who runs it.
A claim is a row in ``job_leases`` taken with one conditional upsert (insert, or take over a
row whose lease has expired), so whatever the database exactly one instance wins.
The holder renews the lease while it works; if it dies, the lease expires and another
instance (or the next start) takes the job over. On a clean shutdown leases are released at
once. Clocks of instances sharing a database are assumed to agree within a few seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, Column, String, Table, and_, delete, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.backends import backend_of, write_transaction
from app.database import metadata
from app.events.envelope import utc_now

__all__ = ["Leases", "job_leases", "new_instance_id", "now_ms"]

logger = logging.getLogger(__name__)

job_leases = Table(
    "job_leases",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("owner", String(200), nullable=False),
    # Milliseconds since the epoch.
    Column("expires_at", BigInteger, nullable=False),
    Column("acquired_at", String(24), nullable=False),
)


def new_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def now_ms() -> int:
    return int(time.time() * 1000)


class Leases:
    """Claims on jobs, held by one instance (``owner``) at a time."""

    def __init__(self, engine: AsyncEngine, owner: str, lease_seconds: float) -> None:
        self._engine = engine
        self.owner = owner
        self.lease_ms = int(lease_seconds * 1000)

    async def claim(self, job_id: str, kind: str) -> bool:
        """Take the job if nobody holds a live lease on it."""
        now = now_ms()
        async with self._engine.connect() as connection:
            backend = backend_of(connection)
            connection = await backend.write_transaction(connection)
            async with connection.begin():
                insert: Any = backend.insert(job_leases)
                statement = insert.values(
                    job_id=job_id,
                    kind=kind,
                    owner=self.owner,
                    expires_at=now + self.lease_ms,
                    acquired_at=utc_now(),
                ).on_conflict_do_update(
                    index_elements=["job_id"],
                    set_={
                        "owner": insert.excluded.owner,
                        "expires_at": insert.excluded.expires_at,
                        "acquired_at": insert.excluded.acquired_at,
                        "kind": insert.excluded.kind,
                    },
                    where=job_leases.c.expires_at < now,
                )
                result = await connection.execute(statement)
                return result.rowcount == 1

    async def renew(self, job_id: str) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and was taken)."""
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                result = await connection.execute(
                    update(job_leases)
                    .where(and_(job_leases.c.job_id == job_id, job_leases.c.owner == self.owner))
                    .values(expires_at=now_ms() + self.lease_ms)
                )
                return result.rowcount == 1

    async def release(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        async with self._engine.connect() as connection:
            connection = await write_transaction(connection)
            async with connection.begin():
                await connection.execute(
                    delete(job_leases).where(
                        and_(job_leases.c.job_id.in_(job_ids), job_leases.c.owner == self.owner)
                    )
                )
