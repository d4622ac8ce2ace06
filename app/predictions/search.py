"""Admin search over every token's predictions: indexed filters and keyset pages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import BadRequest
from app.predictions import cursor as cursors
from app.predictions.models import STATUSES, Prediction
from app.predictions.service import PAGE_SIZE
from app.tokens.models import ApiToken

ADMIN_CURSOR_SCOPE = "admin"


async def search(
    session: AsyncSession,
    *,
    key: bytes,
    token_id: str | None,
    model: str | None,
    status: str | None,
    since: date | None,
    until: date | None,
    cursor_text: str | None,
) -> tuple[list[Prediction], str | None]:
    """A newest-first page of predictions matching every given filter, and the next cursor."""
    query = select(Prediction)
    if token_id is not None:
        query = query.where(Prediction.token_id == token_id)
    if model is not None:
        query = query.where(Prediction.model == model)
    if status is not None:
        if status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(sorted(STATUSES))}")
        query = query.where(Prediction.status == status)
    if since is not None:
        query = query.where(Prediction.created_at >= datetime.combine(since, time(), UTC))
    if until is not None:
        query = query.where(Prediction.created_at < datetime.combine(until + timedelta(days=1), time(), UTC))
    if cursor_text:
        position = cursors.decode(cursor_text, ADMIN_CURSOR_SCOPE, key)
        # A row-value comparison, which both databases turn into an index range; the equivalent
        # OR of two conditions makes PostgreSQL walk the index from the newest row.
        query = query.where(tuple_(Prediction.created_at, Prediction.id) < (position.created_at, position.id))
    query = query.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(PAGE_SIZE + 1)
    rows = list((await session.scalars(query)).all())
    if len(rows) <= PAGE_SIZE:
        return rows, None
    rows = rows[:PAGE_SIZE]
    last = rows[-1]
    return rows, cursors.encode(cursors.Cursor(last.created_at, last.id, False), ADMIN_CURSOR_SCOPE, key)


async def token_names(session: AsyncSession, token_ids: Iterable[str]) -> dict[str, str]:
    """Token names by id."""
    ids = list(token_ids)
    if not ids:
        return {}
    result = await session.execute(select(ApiToken.id, ApiToken.name).where(ApiToken.id.in_(ids)))
    return {row.id: row.name for row in result}
