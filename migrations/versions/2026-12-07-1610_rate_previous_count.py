"""A token's creates in the minute before its rate window, for the sliding-window rate limit.

Revision ID: df21c9d16b54
Revises: 8c41f0a9d2e6
Create Date: 2026-12-07 16:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'df21c9d16b54'
down_revision: str | None = '8c41f0a9d2e6'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Zero for every token: the minute before the current one starts uncounted, as it did.
    # Added and dropped in place (SQLite 3.35+ can): a batch copy of api_token would drop a
    # table the predictions and the ledger reference, and rewrite its group reference.
    op.add_column('api_token', sa.Column('rate_previous_count', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('api_token', 'rate_previous_count')
