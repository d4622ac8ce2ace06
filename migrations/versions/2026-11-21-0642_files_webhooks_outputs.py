"""Uploaded files, the webhook outbox, archived outputs and client webhook fields.

Revision ID: 9da87d741ea3
Revises: b49308c7d1ca
Create Date: 2026-11-21 06:42:54.209572
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '9da87d741ea3'
down_revision: str | None = 'b49308c7d1ca'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('stored_file',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('token_id', sa.String(length=26), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('content_type', sa.String(length=255), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('md5', sa.String(length=32), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('storage_key', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['token_id'], ['api_token.id'], name=op.f('fk_stored_file_token_id_api_token'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stored_file'))
    )
    with op.batch_alter_table('stored_file', schema=None) as batch_op:
        batch_op.create_index('ix_stored_file_token_id_created_at', ['token_id', 'created_at'], unique=False)

    op.create_table('output_file',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('prediction_id', sa.String(length=26), nullable=False),
    sa.Column('source_url', sa.Text(), nullable=False),
    sa.Column('source_url_sha256', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=255), nullable=False),
    sa.Column('content_type', sa.String(length=255), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['prediction_id'], ['prediction.id'], name=op.f('fk_output_file_prediction_id_prediction'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_output_file')),
    sa.UniqueConstraint('prediction_id', 'source_url_sha256', name=op.f('uq_output_file_prediction_id_source_url_sha256'))
    )
    op.create_table('webhook_delivery',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('prediction_id', sa.String(length=26), nullable=False),
    sa.Column('token_id', sa.String(length=26), nullable=False),
    sa.Column('event', sa.String(length=16), nullable=False),
    sa.Column('dedupe_key', sa.String(length=96), nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['prediction_id'], ['prediction.id'], name=op.f('fk_webhook_delivery_prediction_id_prediction'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['token_id'], ['api_token.id'], name=op.f('fk_webhook_delivery_token_id_api_token'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_delivery')),
    sa.UniqueConstraint('dedupe_key', name=op.f('uq_webhook_delivery_dedupe_key')),
    sa.UniqueConstraint('message_id', name=op.f('uq_webhook_delivery_message_id'))
    )
    with op.batch_alter_table('webhook_delivery', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_delivery_status_next_attempt_at', ['status', 'next_attempt_at'], unique=False)

    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('webhook_events_filter', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('webhook_sent_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('webhook_sequence', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('outputs_archived', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('public_base', sa.String(length=255), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('prediction', schema=None) as batch_op:
        batch_op.drop_column('public_base')
        batch_op.drop_column('outputs_archived')
        batch_op.drop_column('webhook_sequence')
        batch_op.drop_column('webhook_sent_at')
        batch_op.drop_column('webhook_events_filter')
        batch_op.drop_column('webhook')

    with op.batch_alter_table('webhook_delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_delivery_status_next_attempt_at')

    op.drop_table('webhook_delivery')
    op.drop_table('output_file')
    with op.batch_alter_table('stored_file', schema=None) as batch_op:
        batch_op.drop_index('ix_stored_file_token_id_created_at')

    op.drop_table('stored_file')
