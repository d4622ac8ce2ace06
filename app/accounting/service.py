"""Admission, settlement and release: guarded updates that move money with the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, insert, or_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from app.accounting import daily
from app.accounting.models import EntryKind, LedgerEntry
from app.accounting.pricing import usd_text
from app.errors import PaymentRequired, Throttled, Unauthenticated
from app.tokens.models import ApiToken

IN_FLIGHT_RETRY_AFTER = 2


def month_of(moment: datetime) -> str:
    """The calendar month a monthly budget window is named by, e.g. "2026-11"."""
    return moment.strftime("%Y-%m")


def _spent_this_window(month: str) -> ColumnElement[Any]:
    # A monthly budget starts the month at zero; the reset happens in the same guarded
    # statement that admits or settles, so there is no separate job to miss.
    return case(
        (and_(ApiToken.budget_period == "month", func.coalesce(ApiToken.budget_window, "") != month), 0),
        else_=ApiToken.spent_micros,
    )


def _window_after(month: str) -> ColumnElement[Any]:
    return case((ApiToken.budget_period == "month", month), else_=ApiToken.budget_window)


async def admit(session: AsyncSession, *, token_id: str, estimate_micros: int, now: datetime) -> None:
    """Reserve the estimate and take an in-flight and a rate slot in one conditional update;
    raise 402 or 429 when any limit would be passed (nothing is then written)."""
    month = month_of(now)
    minute = int(now.timestamp() // 60)
    spent = _spent_this_window(month)
    within_budget = or_(
        ApiToken.budget_micros.is_(None),
        and_(
            spent + ApiToken.reserved_micros + estimate_micros <= ApiToken.budget_micros,
            spent + ApiToken.reserved_micros < ApiToken.budget_micros,
        ),
    )
    statement = (
        update(ApiToken)
        .where(
            ApiToken.id == token_id,
            within_budget,
            or_(ApiToken.max_in_flight.is_(None), ApiToken.in_flight < ApiToken.max_in_flight),
            or_(ApiToken.rpm_limit.is_(None), ApiToken.rate_window != minute,
                ApiToken.rate_count < ApiToken.rpm_limit),
        )
        .values(
            spent_micros=spent,
            budget_window=_window_after(month),
            reserved_micros=ApiToken.reserved_micros + estimate_micros,
            in_flight=ApiToken.in_flight + 1,
            rate_count=case((ApiToken.rate_window == minute, ApiToken.rate_count + 1), else_=1),
            rate_window=minute,
        )
        .execution_options(synchronize_session=False)
    )
    result = await session.execute(statement)
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return
    await _refuse(session, token_id=token_id, estimate_micros=estimate_micros, now=now)


async def _refuse(session: AsyncSession, *, token_id: str, estimate_micros: int, now: datetime) -> None:
    token = await session.get(ApiToken, token_id, populate_existing=True)
    if token is None:
        raise Unauthenticated()
    minute = int(now.timestamp() // 60)
    if token.rpm_limit is not None and token.rate_window == minute and token.rate_count >= token.rpm_limit:
        raise Throttled(60 - now.second, f"This token may create {token.rpm_limit} predictions a minute")
    if token.max_in_flight is not None and token.in_flight >= token.max_in_flight:
        raise Throttled(
            IN_FLIGHT_RETRY_AFTER, f"This token may have {token.max_in_flight} predictions running at once"
        )
    budget = token.budget_micros or 0
    spent = token.spent_micros
    if token.budget_period == "month" and token.budget_window != month_of(now):
        spent = 0
    raise PaymentRequired(
        f"This token's budget is exhausted: {usd_text(spent)} spent and {usd_text(token.reserved_micros)} "
        f"reserved of {usd_text(budget)} USD; this prediction needs up to {usd_text(estimate_micros)}"
    )


async def reserve(session: AsyncSession, *, prediction_id: str, token_id: str, estimate_micros: int) -> None:
    """The reservation entry for an admitted prediction."""
    await session.execute(insert(LedgerEntry).values(
        prediction_id=prediction_id, token_id=token_id, kind=EntryKind.RESERVATION,
        amount_micros=estimate_micros,
    ))


@dataclass(frozen=True)
class Outcome:
    """How a final prediction is accounted: charged (settlement) or given back (release)."""

    charged: bool
    amount_micros: int
    note: str | None = None


async def close(
    session: AsyncSession,
    *,
    prediction_id: str,
    token_id: str,
    estimate_micros: int,
    outcome: Outcome,
    now: datetime,
) -> None:
    """Write the one settlement or release of a prediction and move the token's counters.

    Call it in the transaction that makes the prediction final: the unique (prediction, kind)
    constraint then makes a second charge fail the whole transaction."""
    kind = EntryKind.SETTLEMENT if outcome.charged else EntryKind.RELEASE
    await session.execute(insert(LedgerEntry).values(
        prediction_id=prediction_id, token_id=token_id, kind=kind,
        amount_micros=outcome.amount_micros if outcome.charged else estimate_micros,
        note=outcome.note, created_at=now,
    ))
    month = month_of(now)
    charged = outcome.amount_micros if outcome.charged else 0
    await session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id)
        .values(
            spent_micros=_spent_this_window(month) + charged,
            budget_window=_window_after(month),
            reserved_micros=ApiToken.reserved_micros - estimate_micros,
            in_flight=ApiToken.in_flight - 1,
        )
        .execution_options(synchronize_session=False)
    )
    await daily.add_closed(session, prediction_id=prediction_id, charged_micros=charged)


def budget_view(token: ApiToken, now: datetime) -> dict[str, Any]:
    """A token's budget and limits as the caller and admins see them, amounts in exact USD."""
    spent = token.spent_micros
    if token.budget_period == "month" and token.budget_window != month_of(now):
        spent = 0
    remaining = None
    if token.budget_micros is not None:
        remaining = usd_text(max(0, token.budget_micros - spent - token.reserved_micros))
    return {
        "budget_usd": usd_text(token.budget_micros) if token.budget_micros is not None else None,
        "budget_period": token.budget_period or "total",
        "spent_usd": usd_text(spent),
        "reserved_usd": usd_text(token.reserved_micros),
        "remaining_usd": remaining,
        "rpm_limit": token.rpm_limit,
        "max_in_flight": token.max_in_flight,
        "in_flight": token.in_flight,
    }
