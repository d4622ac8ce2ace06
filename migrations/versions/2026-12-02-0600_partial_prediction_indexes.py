"""The prediction's upstream link, idempotency key and poll schedule indexed only where they are set.

Revision ID: 7c3f52a9d1e4
Revises: 1604e4748d5a
Create Date: 2026-12-02 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '7c3f52a9d1e4'
down_revision: str | None = '1604e4748d5a'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, columns, unique): each indexes the rows whose last column is set.
PARTIAL = (
    ('uq_prediction_upstream_upstream_id', ['upstream', 'upstream_id'], True),
    ('uq_prediction_token_id_idempotency_key', ['token_id', 'idempotency_key'], True),
    ('ix_prediction_next_poll_at', ['next_poll_at'], False),
)


def _where(columns: list[str]) -> sa.TextClause:
    return sa.text(f"{columns[-1]} IS NOT NULL")


def upgrade() -> None:
    # On SQLite a unique constraint is part of the table: dropping one rebuilds the table.
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_constraint('uq_prediction_upstream_upstream_id', type_='unique')
        batch_op.drop_constraint('uq_prediction_token_id_idempotency_key', type_='unique')
        batch_op.drop_index('ix_prediction_next_poll_at')
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        for name, columns, unique in PARTIAL:
            batch_op.create_index(name, columns, unique=unique, sqlite_where=_where(columns),
                                  postgresql_where=_where(columns))


def downgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        for name, _, _ in PARTIAL:
            batch_op.drop_index(name)
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.create_index('ix_prediction_next_poll_at', ['next_poll_at'], unique=False)
        batch_op.create_unique_constraint('uq_prediction_upstream_upstream_id', ['upstream', 'upstream_id'])
        batch_op.create_unique_constraint('uq_prediction_token_id_idempotency_key', ['token_id', 'idempotency_key'])
