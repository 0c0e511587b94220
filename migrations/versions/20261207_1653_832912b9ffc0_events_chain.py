"""events: the chain column, computed once over the existing log

Revision ID: 832912b9ffc0
Revises: 2664f5e7e900
Create Date: 2026-12-07 16:53:36.071993
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# The canonical bytes are an invariant of the log (docs/architecture.md), not a model that
# may change later: this revision computes what every appender computes.
from app.events.chain import GENESIS, chain_rows

revision: str = "832912b9ffc0"
down_revision: str | None = "2664f5e7e900"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Not under "alembic", whose step-by-step chatter the command line silences: this is news.
logger = logging.getLogger("app.migrations")

#: Rows read, chained and written back per statement: bounded memory on any size of log.
BATCH = 5000
#: A progress line at most this often.
PROGRESS_SECONDS = 5.0

# The table as this revision knows it, whatever the models say later.
events = sa.table(
    "events",
    sa.column("position", sa.BigInteger),
    sa.column("stream", sa.String),
    sa.column("source_id", sa.String),
    sa.column("version", sa.Integer),
    sa.column("event", sa.String),
    sa.column("event_id", sa.String),
    sa.column("timestamp", sa.String),
    sa.column("payload", sa.Text),
    sa.column("chain", sa.LargeBinary),
)


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chain", sa.LargeBinary(length=32), nullable=True))
    _fill_chain(op.get_bind())


def _fill_chain(connection: sa.Connection) -> None:
    """Every existing event's chain value, in position order, a batch at a time."""
    total = connection.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
    if not total:
        return
    logger.info("computing the chain of %d existing events", total)
    columns = [
        events.c[name]
        for name in (
            "position",
            "stream",
            "source_id",
            "version",
            "event",
            "event_id",
            "timestamp",
            "payload",
        )
    ]
    update = (
        events.update()
        .where(events.c.position == sa.bindparam("at"))
        .values(chain=sa.bindparam("value"))
    )
    previous, after, done = GENESIS, 0, 0
    shown = time.monotonic()
    while True:
        rows = connection.execute(
            sa.select(*columns)
            .where(events.c.position > after)
            .order_by(events.c.position)
            .limit(BATCH)
        ).all()
        if not rows:
            break
        values = chain_rows(previous, rows)
        connection.execute(
            update,
            [{"at": row[0], "value": value} for row, value in zip(rows, values, strict=True)],
        )
        previous, after, done = values[-1], rows[-1][0], done + len(rows)
        if time.monotonic() - shown >= PROGRESS_SECONDS or done == total:
            shown = time.monotonic()
            logger.info("chain: %d of %d events (position %d)", done, total, after)


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("chain")
