"""The daily usage rollup (backfilled from finished predictions) and the dashboard's list indexes.

Revision ID: 1604e4748d5a
Revises: e0a5228f9a66
Create Date: 2026-11-21 08:46:14.248647
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '1604e4748d5a'
down_revision: str | None = 'e0a5228f9a66'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL = """
INSERT INTO usage_daily (day, token_id, model, predictions, succeeded, failed, canceled, cost_micros)
SELECT {day}, token_id, model, COUNT(*),
       SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END),
       SUM(CASE WHEN status IN ('failed', 'aborted') THEN 1 ELSE 0 END),
       SUM(CASE WHEN status = 'canceled' THEN 1 ELSE 0 END),
       SUM(COALESCE(cost_micros, 0))
FROM prediction
WHERE status IN ('succeeded', 'failed', 'canceled', 'aborted') AND submission != 'rejected'
GROUP BY {day}, token_id, model
"""


def upgrade() -> None:
    op.create_table('usage_daily',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('token_id', sa.String(length=26), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('predictions', sa.Integer(), nullable=False),
    sa.Column('succeeded', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('canceled', sa.Integer(), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['token_id'], ['api_token.id'], name=op.f('fk_usage_daily_token_id_api_token'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('day', 'token_id', 'model', name=op.f('pk_usage_daily')),
    sqlite_with_rowid=False,
    )
    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.create_index('ix_usage_daily_token_id_day', ['token_id', 'day'], unique=False)

    # Days are UTC, as the usage report counts them.
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute(BACKFILL.format(day="(created_at AT TIME ZONE 'UTC')::date" if postgres else "date(created_at)"))

    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_prediction_created_at'))
        batch_op.drop_index(batch_op.f('ix_prediction_status'))
        batch_op.create_index('ix_prediction_created_at_id', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_prediction_model_created_at_id', ['model', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_prediction_status_created_at_id', ['status', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_index('ix_prediction_status_created_at_id')
        batch_op.drop_index('ix_prediction_model_created_at_id')
        batch_op.drop_index('ix_prediction_created_at_id')
        batch_op.create_index(batch_op.f('ix_prediction_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_prediction_created_at'), ['created_at'], unique=False)

    with op.batch_alter_table('usage_daily', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_daily_token_id_day')

    op.drop_table('usage_daily')
