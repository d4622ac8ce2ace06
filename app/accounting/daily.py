"""A daily rollup of finished predictions, kept in step with the ledger for fast usage pages."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    bindparam,
    case,
    func,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Prepared, in_values
from app.predictions.models import PREDICTIONS, Submission

COUNTERS = ("predictions", "succeeded", "failed", "canceled", "cost_micros")


class UsageDaily(Base):
    """Finished, non-rejected predictions and their cost per UTC day (of creation), token and model.

    Unfinished predictions are not in it; readers add them from the prediction table, where
    they are few and indexed by status."""

    __tablename__ = "usage_daily"
    # Without a rowid, SQLite keeps the rows in primary-key (day-first) order: a range of days is
    # read in one sweep with no lookups, three to five times faster than through an index.
    __table_args__ = (Index("ix_usage_daily_token_id_day", "token_id", "day"), {"sqlite_with_rowid": False})

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    token_id: Mapped[str] = mapped_column(
        String(26), ForeignKey("api_token.id", ondelete="RESTRICT"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    predictions: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)  # failed or aborted
    canceled: Mapped[int] = mapped_column(Integer, default=0)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)


def _counted(status: Any, *statuses: str) -> Any:
    return case((in_values(status, statuses), 1), else_=0)


def counting(dialect: Any, rows: Any, *where: Any) -> Any:
    """The upsert that adds the final predictions of `rows` (the prediction table, or a CTE
    returning its columns) that match `where`, charged the parameter `charged`, to their day."""
    row = rows.c
    source = select(
        func.date(row.created_at), row.token_id, row.model, literal(1),
        _counted(row.status, "succeeded"), _counted(row.status, "failed", "aborted"), _counted(row.status, "canceled"),
        bindparam("charged", type_=BigInteger()),
    ).where(*where, row.submission != Submission.REJECTED)
    # The table, not the entity: executed with parameters, an entity insert would be taken
    # for an ORM bulk insert.
    table = UsageDaily.__table__
    statement = dialect.insert(table).from_select(["day", "token_id", "model", *COUNTERS], source)
    return statement.on_conflict_do_update(
        index_elements=["day", "token_id", "model"],
        set_={name: table.c[name] + getattr(statement.excluded, name) for name in COUNTERS},
    )


# Built once per dialect: it runs with every settlement, and building it each time cost more
# than executing it.
_UPSERTS = {
    name: Prepared(counting(dialect, PREDICTIONS, PREDICTIONS.c.id == bindparam("prediction_id")))
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}


def add_closed(connection: Connection, *, prediction_id: str, charged_micros: int) -> None:
    """Count a prediction that has just become final, in the transaction that closes its ledger.

    One upsert read from the row itself, so the day and model are the ones the row ends with; a
    rejected create (never reached an upstream) is not usage and adds nothing."""
    statement = _UPSERTS[connection.dialect.name]
    statement.execute(connection, {"prediction_id": prediction_id, "charged": charged_micros})
