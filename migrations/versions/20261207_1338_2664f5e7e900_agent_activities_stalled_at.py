"""agent activities: stalled_at, and last_seen kept at when the agent last spoke

Revision ID: 2664f5e7e900
Revises: 8e999b42f1e4
Create Date: 2026-12-07 13:38:49.592500
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '2664f5e7e900'
down_revision: str | None = '8e999b42f1e4'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The tables as this revision knows them, whatever the models say later.
events = sa.table(
    'events',
    sa.column('position', sa.BigInteger),
    sa.column('stream', sa.String),
    sa.column('source_id', sa.String),
    sa.column('event', sa.String),
    sa.column('timestamp', sa.String),
)
activities = sa.table(
    'agent_activities',
    sa.column('source_id', sa.String),
    sa.column('position', sa.BigInteger),
    sa.column('updated_at', sa.String),
    sa.column('last_seen', sa.String),
    sa.column('stalled_at', sa.String),
)


def _folded_timestamp(*conditions: sa.ColumnElement[bool], latest: bool) -> sa.ScalarSelect[str]:
    """The timestamp of the row's source's latest (or first) folded agent event meeting
    ``conditions``."""
    return (
        sa.select(events.c.timestamp)
        .where(
            events.c.stream == 'agent',
            events.c.source_id == activities.c.source_id,
            events.c.position <= activities.c.position,
            *conditions,
        )
        .order_by(events.c.position.desc() if latest else events.c.position)
        .limit(1)
        .scalar_subquery()
    )


def upgrade() -> None:
    with op.batch_alter_table('agent_activities', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stalled_at', sa.String(length=24), nullable=True))

    # A row whose latest event is the watchdog's stalled mark took the mark's time as its
    # last_seen. The fold now keeps last_seen at the agent's own latest event (the first
    # event when there is none) and puts the mark's time in stalled_at: bring such rows to
    # what a rebuild from position 0 makes. Other rows are the same under both folds.
    marked = sa.exists().where(
        events.c.position == activities.c.position, events.c.event == 'stalled'
    )
    op.execute(
        activities.update()
        .where(marked)
        .values(
            stalled_at=activities.c.updated_at,
            last_seen=sa.func.coalesce(
                _folded_timestamp(events.c.event != 'stalled', latest=True),
                _folded_timestamp(latest=False),
                activities.c.last_seen,
            ),
        )
    )


def downgrade() -> None:
    # The earlier fold's last_seen is the time of the latest event, the mark included.
    op.execute(
        activities.update()
        .where(activities.c.stalled_at.is_not(None))
        .values(last_seen=activities.c.stalled_at)
    )
    with op.batch_alter_table('agent_activities', schema=None) as batch_op:
        batch_op.drop_column('stalled_at')
