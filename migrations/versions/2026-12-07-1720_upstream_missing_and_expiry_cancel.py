"""A prediction's run of upstream 404s, and when the reconciler sent its cancel at expiry.

Revision ID: 7e3c51a9b4d2
Revises: df21c9d16b54
Create Date: 2026-12-07 17:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '7e3c51a9b4d2'
down_revision: str | None = 'df21c9d16b54'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No run of 404s and no cancel sent, for every prediction: as the reconciler knew them.
    # Added and dropped in place (SQLite 3.35+ can): a batch copy of prediction would drop a
    # table the ledger references.
    op.add_column('prediction', sa.Column('missing_polls', sa.Integer(), server_default='0', nullable=False))
    op.add_column('prediction', sa.Column('missing_since', sa.DateTime(timezone=True), nullable=True))
    op.add_column('prediction', sa.Column('cancel_sent_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('prediction', 'cancel_sent_at')
    op.drop_column('prediction', 'missing_since')
    op.drop_column('prediction', 'missing_polls')
