"""Admission, settlement and release: guarded updates that move money with the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
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
    literal,
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
# Rate limits count creates per epoch minute, weighed in microseconds: the sliding window's
# weights are then whole numbers, exact in every database's integers and in Redis's Lua.
MINUTE_MICROS = 60_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    # The row's counts as of this minute, as `rate_counts` reads them. A gateway whose clock is
    # behind another's counts in the later minute: moving the window back would drop its counts.
    minute = bindparam("minute", type_=BigInteger())
    same_minute = tokens.rate_window >= minute
    current = case((same_minute, tokens.rate_count), else_=0)
    previous = case((same_minute, tokens.rate_previous_count),
                    (tokens.rate_window + 1 == minute, tokens.rate_count), else_=0)
    if check_rate_and_in_flight:
        # `rate_admits` as SQL, in BIGINT on both sides (an INTEGER product overflows on PostgreSQL).
        weighed = previous * bindparam("rate_weight", type_=BigInteger())
        room = (tokens.rpm_limit - current) * literal(MINUTE_MICROS, BigInteger())
        conditions += [
            or_(tokens.max_in_flight.is_(None), tokens.in_flight < tokens.max_in_flight),
            or_(tokens.rpm_limit.is_(None), weighed < room),
        ]
    return update(_TOKENS).where(*conditions).values(
        spent_micros=_SPENT_THIS_WINDOW,
        budget_window=_WINDOW_AFTER,
        reserved_micros=tokens.reserved_micros + estimate,
        in_flight=tokens.in_flight + 1,
        rate_previous_count=previous,
        rate_count=current + 1,
        rate_window=case((same_minute, tokens.rate_window), else_=minute),
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
    minute, weight = rate_clock(now)
    return {"token_id": token_id, "estimate": estimate_micros, "now": now, "month": month_of(now),
            "minute": minute, "rate_weight": weight}


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


def rate_clock(now: datetime) -> tuple[int, int]:
    """The epoch minute `now` falls in, and the weight of the minute before it: the microseconds
    of it that still lie within the 60 seconds up to `now`."""
    since = now - _EPOCH
    micros = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
    minute, elapsed = divmod(micros, MINUTE_MICROS)
    return minute, MINUTE_MICROS - elapsed


def rate_counts(token: ApiToken, minute: int) -> tuple[int, int]:
    """The token's creates counted in the minute before `minute` and in `minute`, read from its
    row as the admission update reads it."""
    if token.rate_window >= minute:
        return token.rate_previous_count, token.rate_count
    if token.rate_window == minute - 1:
        return token.rate_count, 0
    return 0, 0


# A sliding-window counter, as Cloudflare's: the previous minute's creates are taken as spread
# evenly over it, so the part of that minute still within the last 60 seconds counts in
# proportion, and a create is admitted iff previous * (1 - elapsed / 60 s) + current < limit.
# A fixed window let N creates at 12:00:59 and N more at 12:01:00 through; now the second burst
# gets one create at once and then one every 60/N seconds.
# Compared in integers, previous * weight < (limit - current) * MINUTE_MICROS, the comparison is
# exact. Rounding the weighted count down decides the same (floor(x) + c < n iff x + c < n for
# whole c and n), so integer arithmetic costs no precision; rounding it up would refuse a client
# creating evenly at just under the limit, whose estimate lies within 1 below it. Exact, the
# rule admits nothing beyond what the approximation itself allows, and never refuses a client
# creating evenly at any rate below N a minute (at exactly N a minute, only in the tie where its
# creates line up with a minute's first microsecond).
def rate_admits(rpm_limit: int, *, previous: int, current: int, weight: int) -> bool:
    """Whether the sliding window admits a create, given the counts of the previous and the
    current minute and the previous minute's `weight` (`rate_clock`)."""
    return previous * weight < (rpm_limit - current) * MINUTE_MICROS


def rate_wait_micros(rpm_limit: int, *, previous: int, current: int, weight: int) -> int:
    """Microseconds until `rate_admits` holds if nothing else is admitted meanwhile (0: now).

    The weighted count only falls as time passes (at a minute's end the current count becomes
    the previous one, at full weight), so any create from then on is admitted too."""
    elapsed = MINUTE_MICROS - weight
    if current < rpm_limit:
        if previous == 0:
            return 0
        # The first microsecond e of this minute with previous * (MINUTE - e) < room.
        admitted_at = MINUTE_MICROS - _ceil_div((rpm_limit - current) * MINUTE_MICROS, previous) + 1
        return max(0, admitted_at - elapsed)
    # Not within this minute: in the next one this minute's creates are the previous ones.
    return weight + MINUTE_MICROS - _ceil_div(rpm_limit * MINUTE_MICROS, current) + 1


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def rate_refusal(rpm_limit: int, now: datetime, *, previous: int, current: int) -> Throttled:
    """The 429 for a token the sliding window refuses, with `previous` and `current` the counts
    that refused it; Retry-After is the whole seconds until a create would be admitted."""
    _, weight = rate_clock(now)
    wait = rate_wait_micros(rpm_limit, previous=previous, current=current, weight=weight)
    return Throttled(_ceil_div(wait, 1_000_000), f"This token may create {rpm_limit} predictions a minute")


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
    # With slots taken in Redis the database did not check them: only the budget can refuse.
    if not limits_taken:
        minute, weight = rate_clock(now)
        previous, current = rate_counts(token, minute)
        if token.rpm_limit is not None and not rate_admits(
                token.rpm_limit, previous=previous, current=current, weight=weight):
            raise rate_refusal(token.rpm_limit, now, previous=previous, current=current)
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
