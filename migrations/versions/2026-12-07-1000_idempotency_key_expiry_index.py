"""The creation time of predictions that hold an idempotency key, indexed for the keys' expiry.

Revision ID: 3b9e4d7a2c10
Revises: 7c3f52a9d1e4
Create Date: 2026-12-07 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '3b9e4d7a2c10'
down_revision: str | None = '7c3f52a9d1e4'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYED = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    op.create_index('ix_prediction_keyed_created_at', 'prediction', ['created_at'], unique=False,
                    sqlite_where=_KEYED, postgresql_where=_KEYED)


def downgrade() -> None:
    op.drop_index('ix_prediction_keyed_created_at', table_name='prediction')
