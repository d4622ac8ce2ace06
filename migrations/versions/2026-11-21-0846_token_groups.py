"""Token groups: limits on upstreams and models, a price multiplier recorded per prediction.

Revision ID: e0a5228f9a66
Revises: 9da87d741ea3
Create Date: 2026-11-21 08:46:23.946734
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'e0a5228f9a66'
down_revision: str | None = '9da87d741ea3'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('token_group',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('upstreams', sa.JSON(), nullable=True),
    sa.Column('model_globs', sa.JSON(), nullable=True),
    sa.Column('price_multiplier_ppm', sa.Integer(), server_default='1000000', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('price_multiplier_ppm > 0 AND price_multiplier_ppm <= 100000000', name=op.f('ck_token_group_price_multiplier_ppm_range')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_token_group')),
    sa.UniqueConstraint('name', name=op.f('uq_token_group_name'))
    )
    if op.get_bind().dialect.name == 'sqlite':
        # A batch "create_foreign_key" would copy and drop api_token, which every prediction
        # references: with foreign keys on, that fails on any database in use. SQLite adds a
        # nullable column with its reference in place instead.
        op.execute(
            'ALTER TABLE api_token ADD COLUMN group_id VARCHAR(26) '
            'CONSTRAINT fk_api_token_group_id_token_group REFERENCES token_group (id)'
        )
    else:
        op.add_column('api_token', sa.Column('group_id', sa.String(length=26), nullable=True))
        op.create_foreign_key(op.f('fk_api_token_group_id_token_group'), 'api_token', 'token_group',
                              ['group_id'], ['id'])
    op.create_index(op.f('ix_api_token_group_id'), 'api_token', ['group_id'], unique=False)

    op.add_column('prediction', sa.Column('price_multiplier_ppm', sa.Integer(), server_default='1000000', nullable=False))


def downgrade() -> None:
    # Dropped in place (SQLite 3.35+ can): a batch copy would drop tables the ledger references.
    op.drop_column('prediction', 'price_multiplier_ppm')
    op.drop_index(op.f('ix_api_token_group_id'), table_name='api_token')
    if op.get_bind().dialect.name != 'sqlite':
        op.drop_constraint(op.f('fk_api_token_group_id_token_group'), 'api_token', type_='foreignkey')
    op.drop_column('api_token', 'group_id')
    op.drop_table('token_group')
