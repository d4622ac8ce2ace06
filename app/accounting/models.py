"""The ledger: a reservation, then exactly one settlement or release, per prediction."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import UTCDateTime, utcnow
from app.db import Base


class EntryKind:
    """What a ledger entry records."""

    RESERVATION = "reservation"  # the estimate held at admission
    SETTLEMENT = "settlement"  # the amount charged, once the prediction is final
    RELEASE = "release"  # the estimate given back, nothing charged


class LedgerEntry(Base):
    """One money movement; the unique (prediction, kind) pair makes double charging impossible."""

    __tablename__ = "ledger_entry"
    __table_args__ = (
        UniqueConstraint("prediction_id", "kind"),
        Index("ix_ledger_entry_token_id_kind", "token_id", "kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("prediction.id", ondelete="RESTRICT"))
    token_id: Mapped[str] = mapped_column(ForeignKey("api_token.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
