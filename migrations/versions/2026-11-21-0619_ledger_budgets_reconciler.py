"""Ledger entries, token budgets and limits, reconciler and idempotency columns.

Revision ID: b49308c7d1ca
Revises: 420c341bb398
Create Date: 2026-11-21 06:19:51.232473
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b49308c7d1ca'
down_revision: str | None = '420c341bb398'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('ledger_entry',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('prediction_id', sa.String(length=26), nullable=False),
    sa.Column('token_id', sa.String(length=26), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount_micros', sa.BigInteger(), nullable=False),
    sa.Column('note', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['prediction_id'], ['prediction.id'], name=op.f('fk_ledger_entry_prediction_id_prediction'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['token_id'], ['api_token.id'], name=op.f('fk_ledger_entry_token_id_api_token'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_entry')),
    sa.UniqueConstraint('prediction_id', 'kind', name=op.f('uq_ledger_entry_prediction_id_kind'))
    )
    with op.batch_alter_table('ledger_entry', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_entry_token_id_kind', ['token_id', 'kind'], unique=False)

    with op.batch_alter_table('api_token', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_period', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('rpm_limit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_in_flight', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('spent_micros', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('reserved_micros', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('in_flight', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('budget_window', sa.String(length=7), nullable=True))
        batch_op.add_column(sa.Column('rate_window', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('rate_count', sa.Integer(), server_default='0', nullable=False))

    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.add_column(sa.Column('estimate_micros', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('bill_failures', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('submit_deadline', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('next_poll_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('poll_attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('request_hash', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_prediction_next_poll_at', ['next_poll_at'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_prediction_token_id_idempotency_key'), ['token_id', 'idempotency_key'])

    # Existing rows join the ledger: final predictions get their settlement, running ones are
    # counted in flight and handed to the reconciler.
    op.execute(
        "INSERT INTO ledger_entry (prediction_id, token_id, kind, amount_micros, note, created_at) "
        "SELECT id, token_id, 'settlement', COALESCE(cost_micros, 0), 'recorded before the ledger', "
        "COALESCE(completed_at, created_at) FROM prediction "
        "WHERE status IN ('succeeded', 'failed', 'canceled', 'aborted') AND submission <> 'rejected'"
    )
    op.execute(
        "UPDATE api_token SET "
        "spent_micros = (SELECT COALESCE(SUM(amount_micros), 0) FROM ledger_entry "
        "WHERE ledger_entry.token_id = api_token.id AND kind = 'settlement'), "
        "in_flight = (SELECT COUNT(*) FROM prediction WHERE prediction.token_id = api_token.id "
        "AND status IN ('starting', 'processing') AND submission <> 'rejected')"
    )
    op.execute(
        "UPDATE prediction SET next_poll_at = created_at "
        "WHERE status IN ('starting', 'processing') AND submission <> 'rejected'"
    )



def downgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_prediction_token_id_idempotency_key'), type_='unique')
        batch_op.drop_index('ix_prediction_next_poll_at')
        batch_op.drop_column('request_hash')
        batch_op.drop_column('idempotency_key')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('poll_attempts')
        batch_op.drop_column('next_poll_at')
        batch_op.drop_column('submit_deadline')
        batch_op.drop_column('bill_failures')
        batch_op.drop_column('estimate_micros')

    with op.batch_alter_table('api_token', schema=None) as batch_op:
        batch_op.drop_column('rate_count')
        batch_op.drop_column('rate_window')
        batch_op.drop_column('budget_window')
        batch_op.drop_column('in_flight')
        batch_op.drop_column('reserved_micros')
        batch_op.drop_column('spent_micros')
        batch_op.drop_column('max_in_flight')
        batch_op.drop_column('rpm_limit')
        batch_op.drop_column('budget_period')

    with op.batch_alter_table('ledger_entry', schema=None) as batch_op:
        batch_op.drop_index('ix_ledger_entry_token_id_kind')

    op.drop_table('ledger_entry')
