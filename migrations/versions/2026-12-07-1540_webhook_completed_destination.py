"""The legacy `webhook_completed` URL, kept with its prediction when a `webhook` is given too.

Revision ID: c386a15ead72
Revises: 5d2a8c6f1b37
Create Date: 2026-12-07 15:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c386a15ead72'
down_revision: str | None = '5d2a8c6f1b37'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('prediction') as batch_op:
        batch_op.add_column(sa.Column('webhook_completed', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('prediction') as batch_op:
        batch_op.drop_column('webhook_completed')
