"""Initial schema: tokens, the instance key and the prediction ledger.

Revision ID: 420c341bb398
Revises:
Create Date: 2026-11-21 05:54:50.944965
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '420c341bb398'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_token',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('display_prefix', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('model_globs', sa.JSON(), nullable=True),
    sa.Column('budget_micros', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_token')),
    sa.UniqueConstraint('name', name=op.f('uq_api_token_name')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_token_token_hash'))
    )
    op.create_table('instance_key',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance_key'))
    )
    op.create_table('prediction',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('token_id', sa.String(length=26), nullable=False),
    sa.Column('upstream', sa.String(length=64), nullable=False),
    sa.Column('upstream_id', sa.String(length=128), nullable=True),
    sa.Column('submission', sa.String(length=16), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('version', sa.String(length=255), nullable=True),
    sa.Column('deployment', sa.String(length=255), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('input', sa.JSON(), nullable=False),
    sa.Column('output', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('logs', sa.Text(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('upstream_extra', sa.JSON(), nullable=True),
    sa.Column('streamable', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=True),
    sa.Column('cost_note', sa.String(length=255), nullable=True),
    sa.ForeignKeyConstraint(['token_id'], ['api_token.id'], name=op.f('fk_prediction_token_id_api_token'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prediction')),
    sa.UniqueConstraint('upstream', 'upstream_id', name=op.f('uq_prediction_upstream_upstream_id'))
    )
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.create_index('ix_prediction_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_prediction_status', ['status'], unique=False)
        batch_op.create_index('ix_prediction_token_id_created_at_id', ['token_id', 'created_at', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_index('ix_prediction_token_id_created_at_id')
        batch_op.drop_index('ix_prediction_status')
        batch_op.drop_index('ix_prediction_created_at')

    op.drop_table('prediction')
    op.drop_table('instance_key')
    op.drop_table('api_token')
