"""Uploaded files: metadata in the database, bytes in storage."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import UTCDateTime, utcnow
from app.db import Base


class StoredFile(Base):
    """A file a token uploaded through /v1/files."""

    __tablename__ = "stored_file"
    __table_args__ = (Index("ix_stored_file_token_id_created_at", "token_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    token_id: Mapped[str] = mapped_column(ForeignKey("api_token.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    md5: Mapped[str] = mapped_column(String(32))
    file_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
