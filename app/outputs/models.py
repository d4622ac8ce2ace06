"""Copies of a prediction's output files, kept after the upstream's copies expire."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import UTCDateTime, utcnow
from app.db import Base


class OutputFile(Base):
    """One archived output file, served at a stable gateway URL."""

    __tablename__ = "output_file"
    __table_args__ = (UniqueConstraint("prediction_id", "source_url_sha256"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("prediction.id", ondelete="RESTRICT"))
    source_url: Mapped[str] = mapped_column(Text)
    source_url_sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    position: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
