"""The model each version id belongs to, learned from upstream answers.

Revision ID: 8c41f0a9d2e6
Revises: c386a15ead72
Create Date: 2026-12-07 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '8c41f0a9d2e6'
down_revision: str | None = 'c386a15ead72'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'model_version',
        sa.Column('version', sa.String(length=128), nullable=False),
        sa.Column('model', sa.String(length=201), nullable=False),
        sa.Column('learned_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('version', name=op.f('pk_model_version')),
    )


def downgrade() -> None:
    op.drop_table('model_version')
