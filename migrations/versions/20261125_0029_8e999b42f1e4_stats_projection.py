"""stats projection: event counters and the feed of recently finished work

Revision ID: 8e999b42f1e4
Revises: 8608239d8b9f
Create Date: 2026-11-25 00:29:50.878798
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '8e999b42f1e4'
down_revision: str | None = '8608239d8b9f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('stats_counters',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_stats_counters'))
    )
    op.create_table('stats_recent',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('source_id', sa.String(length=200), nullable=False),
    sa.Column('position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('completed_at', sa.String(length=24), nullable=False),
    sa.Column('status', sa.String(length=50), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'source_id', name=op.f('pk_stats_recent'))
    )
    with op.batch_alter_table('stats_recent', schema=None) as batch_op:
        batch_op.create_index('ix_stats_recent_position', ['position'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('stats_recent', schema=None) as batch_op:
        batch_op.drop_index('ix_stats_recent_position')

    op.drop_table('stats_recent')
    op.drop_table('stats_counters')
