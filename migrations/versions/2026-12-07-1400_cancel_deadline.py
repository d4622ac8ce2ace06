"""The deadline a create's Cancel-After sets, kept with its prediction.

Revision ID: 5d2a8c6f1b37
Revises: 3b9e4d7a2c10
Create Date: 2026-12-07 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '5d2a8c6f1b37'
down_revision: str | None = '3b9e4d7a2c10'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('prediction') as batch_op:
        batch_op.add_column(sa.Column('cancel_deadline', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('prediction') as batch_op:
        batch_op.drop_column('cancel_deadline')
