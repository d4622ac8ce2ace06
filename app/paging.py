"""Newest-first keyset pages over a table ordered by (created_at, id), with signed cursors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from app.predictions import cursor as cursors

Row = TypeVar("Row")


@dataclass(frozen=True)
class Page(Generic[Row]):
    """One page of rows, newest first, and the cursors of its neighbours (None at an end)."""

    rows: list[Row]
    next_cursor: str | None
    previous_cursor: str | None


async def newest_first(
    query: Select[Any],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    *,
    cursor_text: str | None,
    token_id: str,
    key: bytes,
    size: int,
    fetch: Callable[[Select[Any]], Awaitable[Sequence[Row]]],
    position_of: Callable[[Row], tuple[datetime, str]],
) -> Page[Row]:
    """The page of `query` after (or, for a backwards cursor, before) `cursor_text`, which must be
    one `token_id` was handed; `fetch` runs the statement, `position_of` gives a row's sort key.

    Keyset, not offset: a page costs the same however deep it is, and rows created meanwhile
    neither repeat nor go missing."""
    position = cursors.decode(cursor_text, token_id, key) if cursor_text else None
    descending = (created_at.desc(), row_id.desc())
    if position is None:
        query = query.order_by(*descending)
    elif position.backwards:
        query = query.where(or_(
            created_at > position.created_at,
            and_(created_at == position.created_at, row_id > position.id),
        )).order_by(created_at.asc(), row_id.asc())
    else:
        query = query.where(or_(
            created_at < position.created_at,
            and_(created_at == position.created_at, row_id < position.id),
        )).order_by(*descending)
    rows = list(await fetch(query.limit(size + 1)))
    more = len(rows) > size
    rows = rows[:size]
    if position is not None and position.backwards:
        rows.reverse()
        has_newer, has_older = more, True
    else:
        has_newer, has_older = position is not None, more
    if not rows:
        return Page(rows, None, None)

    def at(row: Row, backwards: bool) -> str:
        moment, identifier = position_of(row)
        return cursors.encode(cursors.Cursor(moment, identifier, backwards), token_id, key)

    return Page(rows, at(rows[-1], False) if has_older else None, at(rows[0], True) if has_newer else None)
