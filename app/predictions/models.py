"""The prediction ledger: one row per prediction, committed before the upstream is called."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.accounting.pricing import ONE_PPM
from app.columns import UTCDateTime, utcnow
from app.db import Base

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})
STATUSES = frozenset({"starting", "processing"}) | TERMINAL_STATUSES


class Submission:
    """Whether the upstream has the prediction: what the create call established."""

    PENDING = "pending"  # row written, upstream not answered yet
    ACCEPTED = "accepted"  # upstream created it; upstream_id is known
    REJECTED = "rejected"  # upstream provably created nothing
    UNKNOWN = "unknown"  # the create may have reached the upstream; outcome unknown


def _partial_index(name: str, *columns: str, unique: bool = False) -> Index:
    """An index over the rows whose last column is set (on both databases)."""
    where = text(f"{columns[-1]} IS NOT NULL")
    return Index(name, *columns, unique=unique, sqlite_where=where, postgresql_where=where)


class Prediction(Base):
    """A prediction as the gateway knows it, with its upstream link and its cost."""

    __tablename__ = "prediction"
    # The upstream link, the idempotency key and the poll schedule are indexed only where they
    # are set: a create then writes none of these three indexes, and its link and the
    # reconciler add or remove one entry each instead of moving it. Every lookup by these
    # columns compares them with a value, which implies the condition, so it can use them.
    __table_args__ = (
        _partial_index("uq_prediction_upstream_upstream_id", "upstream", "upstream_id", unique=True),
        _partial_index("uq_prediction_token_id_idempotency_key", "token_id", "idempotency_key", unique=True),
        _partial_index("ix_prediction_next_poll_at", "next_poll_at"),
        # The keys' expiry sweep: without it, SQLite walked every prediction older than a day
        # (2.1 s at a million), holding the write lock, to find the few that still hold a key.
        Index("ix_prediction_keyed_created_at", "created_at", sqlite_where=text("idempotency_key IS NOT NULL"),
              postgresql_where=text("idempotency_key IS NOT NULL")),
        Index("ix_prediction_token_id_created_at_id", "token_id", "created_at", "id"),
        # Newest-first keyset pages, alone or within one model or status (the dashboard's filters).
        Index("ix_prediction_created_at_id", "created_at", "id"),
        Index("ix_prediction_model_created_at_id", "model", "created_at", "id"),
        Index("ix_prediction_status_created_at_id", "status", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    token_id: Mapped[str] = mapped_column(ForeignKey("api_token.id", ondelete="RESTRICT"))
    upstream: Mapped[str] = mapped_column(String(64))
    upstream_id: Mapped[str | None] = mapped_column(String(128), default=None)
    submission: Mapped[str] = mapped_column(String(16), default=Submission.PENDING)
    model: Mapped[str] = mapped_column(String(255))
    version: Mapped[str | None] = mapped_column(String(255), default=None)
    deployment: Mapped[str | None] = mapped_column(String(255), default=None)
    status: Mapped[str] = mapped_column(String(16), default="starting")
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    output: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    logs: Mapped[str | None] = mapped_column(Text, default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    upstream_extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    streamable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    cost_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cost_note: Mapped[str | None] = mapped_column(String(255), default=None)
    estimate_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bill_failures: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # The token group's multiplier when it was created (parts per million), so a later change to
    # the group never re-prices it; the estimate above already includes it.
    price_multiplier_ppm: Mapped[int] = mapped_column(Integer, default=ONE_PPM, server_default=str(ONE_PPM))
    # After this moment a create with no upstream answer is in doubt, not in flight.
    submit_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # From the create's `Cancel-After`: still unfinished then, it is canceled (whether or not the
    # upstream honours the header itself).
    cancel_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Reconciler schedule and lease; NULL next_poll_at means nothing left to do.
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    poll_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The reconciler's polls answered 404 in a row, and when the first of them was: kept here so
    # a run of them outlives a pass and a restart (it ends a prediction only once it persists).
    missing_polls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    missing_since: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Set just before the reconciler sends its cancel at the prediction's deadline, and cleared
    # only when that cancel provably never left: a cancel is sent once.
    cancel_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    # The client's webhook, kept here and never sent upstream.
    webhook: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_events_filter: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # The legacy `webhook_completed`, when given beside `webhook`: it gets the completed event too.
    webhook_completed: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    webhook_sequence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    outputs_archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # The base URL the client used, so background work (webhooks) builds the same URLs.
    public_base: Mapped[str | None] = mapped_column(String(255), default=None)

    @property
    def is_terminal(self) -> bool:
        """Whether the prediction has reached a final status."""
        return self.status in TERMINAL_STATUSES


# The table itself, for Core statements on the hot path (no ORM unit of work or identity map).
PREDICTIONS = cast(Table, Prediction.__table__)


class ModelVersion(Base):
    """The model a version id belongs to, as an upstream's answer showed it: a bare version id
    (all the official clients send) can then be checked against a token's model limits."""

    __tablename__ = "model_version"

    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(201))
    learned_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
