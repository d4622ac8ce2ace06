"""Dashboard reads: usage from the daily rollup, predictions and tokens in keyset pages."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounting import usage
from app.accounting.daily import UsageDaily
from app.accounting.models import LedgerEntry
from app.accounting.usage import GROUP_KEYS, UNFINISHED, day_start, day_text
from app.predictions.models import Prediction, Submission
from app.tokens.models import ApiToken

TOKENS_PAGE = 50
TOP_ROWS = 20


@dataclass
class Totals:
    """Counts and cost of one group (a day, a token or a model)."""

    key: str
    label: str = ""
    predictions: int = 0
    failed: int = 0
    running: int = 0
    cost_micros: int = 0

    def add(self, predictions: int, failed: int, running: int, cost_micros: int) -> None:
        """Add one source row."""
        self.predictions += predictions
        self.failed += failed
        self.running += running
        self.cost_micros += cost_micros


@dataclass
class Overview:
    """Usage over a range of days, per day, per token and per model."""

    since: date
    until: date
    days: list[Totals]
    tokens: list[Totals]
    models: list[Totals]
    total: Totals
    other_tokens: Totals | None = None
    other_models: Totals | None = None


async def _rollup(session: AsyncSession, group: Any, token_id: str | None, since: date, until: date
                  ) -> list[Any]:
    query = select(group, func.sum(UsageDaily.predictions), func.sum(UsageDaily.failed),
                   func.sum(UsageDaily.cost_micros)).where(UsageDaily.day >= since, UsageDaily.day <= until)
    if token_id is not None:
        query = query.where(UsageDaily.token_id == token_id)
    return list((await session.execute(query.group_by(group))).all())


async def _unfinished(session: AsyncSession, token_id: str | None, since: date, until: date
                      ) -> list[tuple[str, str, str, int]]:
    """(day, token id, model, count) of the predictions still running, created in the range.

    Found through the status index alone: they are few, while a token's own index could
    make the database walk all of that token's rows in the range."""
    query = select(Prediction.created_at, Prediction.token_id, Prediction.model).where(
        Prediction.status.in_(UNFINISHED), Prediction.submission != Submission.REJECTED,
        Prediction.created_at >= day_start(since), Prediction.created_at < day_start(until + timedelta(days=1)),
    )
    counts: Counter[tuple[str, str, str]] = Counter()
    for created_at, owner, model in (await session.execute(query)).all():
        if token_id is None or owner == token_id:
            counts[(created_at.date().isoformat(), owner, model)] += 1
    return [(*key, count) for key, count in counts.items()]


def _top(groups: dict[str, Totals], limit: int) -> tuple[list[Totals], Totals | None]:
    ordered = sorted(groups.values(), key=lambda t: (-t.cost_micros, -t.predictions, t.label))
    if len(ordered) <= limit:
        return ordered, None
    rest = Totals(key="", label=f"{len(ordered) - limit} more")
    for row in ordered[limit:]:
        rest.add(row.predictions, row.failed, row.running, row.cost_micros)
    return ordered[:limit], rest


async def token_names(session: AsyncSession, ids: Sequence[str]) -> dict[str, str]:
    """Token names by id."""
    if not ids:
        return {}
    result = await session.execute(select(ApiToken.id, ApiToken.name).where(ApiToken.id.in_(list(ids))))
    return {row.id: row.name for row in result}


async def overview(session: AsyncSession, *, token_id: str | None, since: date, until: date) -> Overview:
    """Predictions, failures and cost per day (every day of the range), per token and per model."""
    days = {
        (since + timedelta(days=i)).isoformat(): Totals(key=(since + timedelta(days=i)).isoformat())
        for i in range((until - since).days + 1)
    }
    tokens: dict[str, Totals] = {}
    models: dict[str, Totals] = {}
    total = Totals(key="total")
    for target, group, keyed in ((days, UsageDaily.day, day_text), (tokens, UsageDaily.token_id, str),
                                 (models, UsageDaily.model, str)):
        for key, predictions, failed, cost in await _rollup(session, group, token_id, since, until):
            name = keyed(key)
            target.setdefault(name, Totals(key=name, label=name)).add(
                int(predictions or 0), int(failed or 0), 0, int(cost or 0))
    for day, owner, model, count in await _unfinished(session, token_id, since, until):
        for target, key in ((days, day_text(day)), (tokens, owner), (models, model)):
            target.setdefault(key, Totals(key=key, label=key)).add(int(count), 0, int(count), 0)
    for day_totals in days.values():
        total.add(day_totals.predictions, day_totals.failed, day_totals.running, day_totals.cost_micros)
    top_tokens, other_tokens = _top(tokens, TOP_ROWS)
    top_models, other_models = _top(models, TOP_ROWS)
    names = await token_names(session, [t.key for t in top_tokens])
    for totals in top_tokens:
        totals.label = names.get(totals.key, totals.key)
    return Overview(since=since, until=until, days=list(days.values()), tokens=top_tokens,
                    models=top_models, total=total, other_tokens=other_tokens, other_models=other_models)


def usage_csv(connection: Connection, *, token_id: str | None, since: date, until: date,
              group_by: Sequence[str]) -> str:
    """The usage report's CSV (same columns, rows and order as `usage --format csv`)."""
    keys = [key for key in group_by if key in GROUP_KEYS]
    return usage.csv_text(*usage.grouped(connection, since=since, until=until, group_by=keys, token_id=token_id))


async def tokens_page(session: AsyncSession, *, after: str | None, only: str | None
                      ) -> tuple[list[ApiToken], str | None]:
    """Tokens by name, a page after the name `after` (the unique name index keeps it cheap)."""
    query = select(ApiToken).order_by(ApiToken.name).limit(TOKENS_PAGE + 1)
    if only is not None:
        query = query.where(ApiToken.id == only)
    if after:
        query = query.where(ApiToken.name > after)
    rows = list((await session.scalars(query)).all())
    if len(rows) <= TOKENS_PAGE:
        return rows, None
    return rows[:TOKENS_PAGE], rows[TOKENS_PAGE - 1].name


async def recent_spend(session: AsyncSession, token_ids: Sequence[str], since: date) -> dict[str, int]:
    """Each token's cost since a day, from the rollup."""
    if not token_ids:
        return {}
    query = (select(UsageDaily.token_id, func.sum(UsageDaily.cost_micros))
             .where(UsageDaily.token_id.in_(list(token_ids)), UsageDaily.day >= since)
             .group_by(UsageDaily.token_id))
    return {owner: int(cost or 0) for owner, cost in (await session.execute(query)).all()}


async def ledger(session: AsyncSession, prediction_id: str) -> list[LedgerEntry]:
    """A prediction's ledger entries, oldest first."""
    query = select(LedgerEntry).where(LedgerEntry.prediction_id == prediction_id).order_by(LedgerEntry.id)
    return list((await session.scalars(query)).all())
