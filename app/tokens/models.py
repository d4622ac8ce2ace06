"""Tables for gateway tokens and the instance's hashing key."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.columns import UTCDateTime, utcnow
from app.db import Base
from app.groups.models import TokenGroup


class ApiToken(Base):
    """A gateway token; the secret itself is stored only as a keyed hash."""

    __tablename__ = "api_token"

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    model_globs: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    budget_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    budget_period: Mapped[str | None] = mapped_column(String(8), default=None)  # None or "month"
    rpm_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    max_in_flight: Mapped[int | None] = mapped_column(Integer, default=None)
    # Counters kept in step with the ledger by the same guarded updates that write it.
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    budget_window: Mapped[str | None] = mapped_column(String(7), default=None)  # "2026-11"
    rate_window: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # epoch minute
    rate_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Creates in the minute before rate_window, which the sliding window weighs in.
    rate_previous_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # No ON DELETE clause: SQLite adds this reference to a table in use, where it keeps no options;
    # deleting a group that tokens still use is refused either way.
    group_id: Mapped[str | None] = mapped_column(
        ForeignKey("token_group.id"), default=None, index=True
    )
    # Loaded explicitly (joined) by the token service's queries; never lazily, which async forbids.
    group: Mapped[TokenGroup | None] = relationship(lazy="raise")


class InstanceKey(Base):
    """The key used for token hashes and signed URLs when GATEWAY_SECRET_KEY is not set."""

    __tablename__ = "instance_key"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128))
