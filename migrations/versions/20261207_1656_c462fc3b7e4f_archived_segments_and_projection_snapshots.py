"""archived segments and projection snapshots

Revision ID: c462fc3b7e4f
Revises: 832912b9ffc0
Create Date: 2026-12-07 16:56:31.970750
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = 'c462fc3b7e4f'
down_revision: str | None = '832912b9ffc0'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('archived_segments',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('first_position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('last_position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('streams', sa.Text(), nullable=False),
    sa.Column('archived_at', sa.String(length=24), nullable=False),
    sa.Column('first_chain', sa.String(length=64), nullable=True),
    sa.Column('last_chain', sa.String(length=64), nullable=True),
    sa.Column('removed_at', sa.String(length=24), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_archived_segments'))
    )
    with op.batch_alter_table('archived_segments', schema=None) as batch_op:
        batch_op.create_index('ix_archived_segments_last_position', ['last_position'], unique=False)

    op.create_table('projection_snapshots',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.String(length=24), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('state', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('name', 'position', name=op.f('pk_projection_snapshots'))
    )


def downgrade() -> None:
    op.drop_table('projection_snapshots')
    with op.batch_alter_table('archived_segments', schema=None) as batch_op:
        batch_op.drop_index('ix_archived_segments_last_position')

    op.drop_table('archived_segments')
