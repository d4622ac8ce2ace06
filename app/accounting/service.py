"""Admission, settlement and release: guarded updates that move money with the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from app.accounting import daily
from app.accounting.models import EntryKind, LedgerEntry
from app.accounting.pricing import usd_text
from app.columns import utcnow
from app.db import Prepared, entity_by_key
from app.errors import PaymentRequired, Throttled
from app.predictions.models import PREDICTIONS
from app.tokens.models import ApiToken
from app.tokens.service import ensure_live

IN_FLIGHT_RETRY_AFTER = 2


def month_of(moment: datetime) -> str:
    """The calendar month a monthly budget window is named by, e.g. "2026-11"."""
    return f"{moment.year:04d}-{moment.month:02d}"


_TOKENS = cast(Table, ApiToken.__table__)
_LEDGER = cast(Table, LedgerEntry.__table__)
# A monthly budget starts the month at zero; the reset happens in the same guarded statement
# that admits or settles, so there is no separate job to miss.
_SPENT_THIS_WINDOW = case(
    (and_(_TOKENS.c.budget_period == "month",
          func.coalesce(_TOKENS.c.budget_window, "") != bindparam("month")), 0),
    else_=_TOKENS.c.spent_micros,
)
_WINDOW_AFTER = case((_TOKENS.c.budget_period == "month", bindparam("month")), else_=_TOKENS.c.budget_window)


def _admission(*, check_rate_and_in_flight: bool) -> Update:
    tokens = _TOKENS.c
    estimate = bindparam("estimate", type_=BigInteger())
    conditions = [
        tokens.id == bindparam("token_id"),
        # Checked here as well as at sign-in: a cached token must never create after revocation.
        tokens.revoked_at.is_(None),
        or_(tokens.expires_at.is_(None), tokens.expires_at > bindparam("now")),
        or_(
            tokens.budget_micros.is_(None),
            and_(
                _SPENT_THIS_WINDOW + tokens.reserved_micros + estimate <= tokens.budget_micros,
                _SPENT_THIS_WINDOW + tokens.reserved_micros < tokens.budget_micros,
            ),
        ),
    ]
    if check_rate_and_in_flight:
        conditions += [
            or_(tokens.max_in_flight.is_(None), tokens.in_flight < tokens.max_in_flight),
            or_(tokens.rpm_limit.is_(None), tokens.rate_window != bindparam("minute"),
                tokens.rate_count < tokens.rpm_limit),
        ]
    return update(_TOKENS).where(*conditions).values(
        spent_micros=_SPENT_THIS_WINDOW,
        budget_window=_WINDOW_AFTER,
        reserved_micros=tokens.reserved_micros + estimate,
        in_flight=tokens.in_flight + 1,
        rate_count=case((tokens.rate_window == bindparam("minute"), tokens.rate_count + 1), else_=1),
        rate_window=bindparam("minute"),
    )


# Built once: these statements run on every create, and building and keying them each time cost
# more than executing them.
_ADMIT = Prepared(_admission(check_rate_and_in_flight=True))
_ADMIT_BUDGET_ONLY = Prepared(_admission(check_rate_and_in_flight=False))


def _settlement(token_id: Any) -> Update:
    return update(_TOKENS).where(_TOKENS.c.id == token_id).values(
        spent_micros=_SPENT_THIS_WINDOW + bindparam("charged", type_=BigInteger()),
        budget_window=_WINDOW_AFTER,
        reserved_micros=_TOKENS.c.reserved_micros - bindparam("estimate", type_=BigInteger()),
        in_flight=_TOKENS.c.in_flight - 1,
    )


_SETTLE = Prepared(_settlement(bindparam("token_id")))
_ENTRY = Prepared(insert(_LEDGER))


@cache
def create_in_one(*, limits_taken: bool, names: tuple[str, ...]) -> Select[int]:
    """Admission, the prediction's row (its columns `names`, parameters `row_{name}`) and its
    reservation as one statement of writable CTEs, for PostgreSQL; it counts the reservations it
    made (0: not admitted, and nothing written). Its other parameters are `admission_parameters`
    and `reserved_at`.

    As a transaction of three statements it took five round trips and held the token's row locked
    from the first statement to the commit, three round trips on, while every other create of a
    busy token queued for that lock; as one statement it takes one round trip, and the lock is held
    only while the server runs it."""
    columns = PREDICTIONS.c
    # A new admission, not _ADMIT's: once compiled, a statement keeps memoized state that its
    # generative copies inherit, and a CTE made from it with RETURNING lost its columns.
    admitted = _admission(check_rate_and_in_flight=not limits_taken).returning(_TOKENS.c.id).cte("admitted")
    row = select(*(bindparam(f"row_{name}", type_=columns[name].type) for name in names))
    inserted = (
        insert(PREDICTIONS)
        .from_select(list(names), row.where(exists(admitted.select())))
        .returning(columns.id, columns.token_id, columns.estimate_micros)
        .cte("inserted")
    )
    reserved = (
        insert(_LEDGER)
        .from_select(["prediction_id", "token_id", "kind", "amount_micros", "created_at"], select(
            inserted.c.id, inserted.c.token_id,
            bindparam("kind", EntryKind.RESERVATION, type_=_LEDGER.c.kind.type),
            inserted.c.estimate_micros,
            bindparam("reserved_at", type_=_LEDGER.c.created_at.type),
        ))
        .returning(_LEDGER.c.id)
        .cte("reserved")
    )
    return select(func.count()).select_from(reserved)


def admission_parameters(*, token_id: str, estimate_micros: int, now: datetime) -> dict[str, Any]:
    """The parameters of the admission update."""
    return {"token_id": token_id, "estimate": estimate_micros, "now": now, "month": month_of(now),
            "minute": int(now.timestamp() // 60)}


def admit(
    connection: Connection, *, token_id: str, estimate_micros: int, now: datetime, limits_taken: bool = False
) -> None:
    """Reserve the estimate and take an in-flight and a rate slot in one conditional update;
    raise 402 or 429 when any limit would be passed (nothing is then written).

    With `limits_taken` the rate and in-flight slots were already taken in Redis: only the
    budget is checked here, but the counters still move, so the database can take over."""
    statement = _ADMIT_BUDGET_ONLY if limits_taken else _ADMIT
    matched = statement.execute(connection, admission_parameters(
        token_id=token_id, estimate_micros=estimate_micros, now=now))
    if matched == 1:
        return
    refuse(connection, token_id=token_id, estimate_micros=estimate_micros, now=now, limits_taken=limits_taken)


def rate_refusal(rpm_limit: int, now: datetime) -> Throttled:
    """The 429 for a token that has made its `rpm_limit` creates this minute."""
    return Throttled(60 - now.second, f"This token may create {rpm_limit} predictions a minute")


def in_flight_refusal(max_in_flight: int) -> Throttled:
    """The 429 for a token that has `max_in_flight` predictions running."""
    return Throttled(
        IN_FLIGHT_RETRY_AFTER, f"This token may have {max_in_flight} predictions running at once"
    )


def refuse(
    connection: Connection, *, token_id: str, estimate_micros: int, now: datetime, limits_taken: bool
) -> None:
    """Raise the refusal (401, 402 or 429) for a create the admission update did not admit."""
    token = ensure_live(entity_by_key(connection, ApiToken, token_id))
    minute = int(now.timestamp() // 60)
    # With slots taken in Redis the database did not check them: only the budget can refuse.
    if not limits_taken:
        if token.rpm_limit is not None and token.rate_window == minute and token.rate_count >= token.rpm_limit:
            raise rate_refusal(token.rpm_limit, now)
        if token.max_in_flight is not None and token.in_flight >= token.max_in_flight:
            raise in_flight_refusal(token.max_in_flight)
    budget = token.budget_micros or 0
    spent = token.spent_micros
    if token.budget_period == "month" and token.budget_window != month_of(now):
        spent = 0
    raise PaymentRequired(
        f"This token's budget is exhausted: {usd_text(spent)} spent and {usd_text(token.reserved_micros)} "
        f"reserved of {usd_text(budget)} USD; this prediction needs up to {usd_text(estimate_micros)}"
    )


def reserve(connection: Connection, *, prediction_id: str, token_id: str, estimate_micros: int) -> None:
    """The reservation entry for an admitted prediction."""
    _ENTRY.execute(connection, {
        "prediction_id": prediction_id, "token_id": token_id, "kind": EntryKind.RESERVATION,
        "amount_micros": estimate_micros, "created_at": utcnow(),
    })


@dataclass(frozen=True)
class Outcome:
    """How a final prediction is accounted: charged (settlement) or given back (release)."""

    charged: bool
    amount_micros: int
    note: str | None = None


def _closing(estimate_micros: int, outcome: Outcome) -> tuple[str, int, int]:
    """The closing entry's kind and amount, and the amount charged."""
    if outcome.charged:
        return EntryKind.SETTLEMENT, outcome.amount_micros, outcome.amount_micros
    return EntryKind.RELEASE, estimate_micros, 0


def close(
    connection: Connection,
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
    kind, amount, charged = _closing(estimate_micros, outcome)
    _ENTRY.execute(connection, {
        "prediction_id": prediction_id, "token_id": token_id, "kind": kind, "amount_micros": amount,
        "note": outcome.note, "created_at": now,
    })
    _SETTLE.execute(connection, {
        "token_id": token_id, "month": month_of(now), "estimate": estimate_micros, "charged": charged,
    })
    daily.add_closed(connection, prediction_id=prediction_id, charged_micros=charged)


def close_in_one(final_state: Update) -> Select[int]:
    """`final_state` (the compare-and-set that makes one prediction final) with `close`'s three
    writes as one statement of writable CTEs, for PostgreSQL: they happen only if it matched a row.
    It counts the rows `final_state` matched. Its parameters beyond `final_state`'s are
    `closing_parameters`' (none named like a column: Core would add them to an update's SET).

    As a transaction the settlement took seven round trips and held the token's row locked from
    its update to the commit, while the creates of a busy token queued for that lock; as one
    statement it takes one round trip, and the lock is held only while the server runs it. All
    parts see the same snapshot, so each reads the prediction as `final_state` returns it."""
    columns = PREDICTIONS.c
    final = final_state.returning(
        columns.id, columns.token_id, columns.created_at, columns.model, columns.status, columns.submission,
    ).cte("final")
    entry = insert(_LEDGER).from_select(
        ["prediction_id", "token_id", "kind", "amount_micros", "note", "created_at"],
        select(
            final.c.id, final.c.token_id,
            bindparam("entry_kind", type_=_LEDGER.c.kind.type),
            bindparam("entry_amount", type_=_LEDGER.c.amount_micros.type),
            bindparam("entry_note", type_=_LEDGER.c.note.type),
            bindparam("entry_at", type_=_LEDGER.c.created_at.type),
        ),
    ).cte("entry")
    settled = _settlement(select(final.c.token_id).scalar_subquery()).cte("settled")
    counted = daily.counting(postgresql, final).cte("counted")
    return select(func.count()).select_from(final).add_cte(entry, settled, counted)


def closing_parameters(*, estimate_micros: int, outcome: Outcome, now: datetime) -> dict[str, Any]:
    """The parameters `close_in_one` adds to its compare-and-set's."""
    kind, amount, charged = _closing(estimate_micros, outcome)
    return {"entry_kind": kind, "entry_amount": amount, "entry_note": outcome.note, "entry_at": now,
            "month": month_of(now), "estimate": estimate_micros, "charged": charged}


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
