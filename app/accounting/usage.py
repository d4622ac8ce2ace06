"""Usage reports: prediction counts and cost, grouped by token, model, day and token group."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import String, func, select, type_coerce
from sqlalchemy.engine import Connection

from app.accounting.daily import UsageDaily
from app.accounting.pricing import usd_text
from app.groups.models import TokenGroup
from app.predictions.models import Prediction, Submission
from app.tokens.models import ApiToken

GROUP_KEYS = ("token", "model", "day", "group")
UNFINISHED = ("starting", "processing")

# One group's values in the order asked for, its predictions and its cost in micro-dollars.
Row = tuple[tuple[str | None, ...], int, int]


def day_start(day: date) -> datetime:
    """The first instant of a UTC day."""
    return datetime.combine(day, time(), UTC)


def day_text(value: Any) -> str:
    """A day as `YYYY-MM-DD`, from a date or the text a driver gives for one."""
    return value.isoformat() if isinstance(value, date) else str(value)[:10]


def grouped(
    connection: Connection,
    *,
    since: date | None = None,
    until: date | None = None,
    group_by: Sequence[str] = (),
    token_id: str | None = None,
) -> tuple[list[str], list[Row]]:
    """The keys grouped by (each once, in the order given) and every group's predictions and
    cost, sorted by those keys (no group last), optionally of one token only.

    Finished predictions come from the daily rollup, which the settlement keeps in step with the
    ledger, and the few still running from the prediction table through its status index: a
    month of a busy gateway is hundreds of thousands of predictions, and adding them up on
    every report took seconds (2.4 s for a quarter at a million on SQLite). Run it through
    `ReportReads`, which keeps it off the event loop's thread."""
    unknown = [key for key in group_by if key not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}")
    keys = list(dict.fromkeys(group_by))
    # The day as the driver gives it: SQLite's text needs no parsing into a date and back.
    columns: dict[str, Any] = {"token": ApiToken.name, "model": UsageDaily.model,
                               "day": type_coerce(UsageDaily.day, String), "group": TokenGroup.name}
    selected = [columns[key] for key in keys]
    finished = (select(*selected, func.sum(UsageDaily.predictions), func.sum(UsageDaily.cost_micros))
                .join(ApiToken, ApiToken.id == UsageDaily.token_id))
    running = (select(Prediction.created_at, Prediction.token_id, ApiToken.name, Prediction.model, TokenGroup.name)
               .join(ApiToken, ApiToken.id == Prediction.token_id)
               .outerjoin(TokenGroup, TokenGroup.id == ApiToken.group_id)
               .where(Prediction.status.in_(UNFINISHED), Prediction.submission != Submission.REJECTED))
    if "group" in keys:
        finished = finished.outerjoin(TokenGroup, TokenGroup.id == ApiToken.group_id)
    if since is not None:
        finished = finished.where(UsageDaily.day >= since)
        running = running.where(Prediction.created_at >= day_start(since))
    if until is not None:
        finished = finished.where(UsageDaily.day <= until)
        running = running.where(Prediction.created_at < day_start(until + timedelta(days=1)))
    if token_id is not None:
        # The running ones are filtered here, not by the database: by the token's own index it
        # could walk all of that token's predictions in the range.
        finished = finished.where(UsageDaily.token_id == token_id)
    if selected:
        finished = finished.group_by(*selected)
    totals: dict[tuple[str | None, ...], list[int]] = {}
    # Core rows, not ORM ones: a month of every token and model is tens of thousands of groups.
    day_at = keys.index("day") if "day" in keys else None
    for *values, count, micros in connection.execute(finished):
        if count:
            if day_at is not None:
                values[day_at] = day_text(values[day_at])
            totals[tuple(values)] = [int(count), int(micros or 0)]
    for created_at, owner, token, model, group in connection.execute(running):
        if token_id is not None and owner != token_id:
            continue
        found = {"token": token, "model": model, "day": created_at.date().isoformat(), "group": group}
        totals.setdefault(tuple(found[key] for key in keys), [0, 0])[0] += 1
    if "group" in keys:  # the only key that can be null: those groups last
        ordered = sorted(totals.items(), key=lambda item: [(value is None, value or "") for value in item[0]])
    else:
        ordered = sorted(totals.items())
    return keys, [(group, count, micros) for group, (count, micros) in ordered]


def report(
    connection: Connection,
    *,
    since: date | None = None,
    until: date | None = None,
    group_by: Sequence[str] = (),
) -> dict[str, Any]:
    """Counts and exact USD costs per group; `until` is inclusive, days are UTC (of creation);
    `group` is the token's group now (null for none). Refused creates are not counted."""
    keys, groups = grouped(connection, since=since, until=until, group_by=group_by)
    rows = []
    for values, count, micros in groups:
        row: dict[str, Any] = dict(zip(keys, values, strict=True))
        row.update({"predictions": count, "cost_usd": usd_text(micros)})
        rows.append(row)
    total_count = sum(count for _, count, _ in groups)
    total_micros = sum(micros for _, _, micros in groups)
    return {"rows": rows, "total": {"predictions": total_count, "cost_usd": usd_text(total_micros)}}


def csv_text(keys: Sequence[str], groups: Sequence[Row]) -> str:
    """Grouped usage as CSV: the keys' columns (in GROUP_KEYS order), predictions and cost."""
    fields = [key for key in GROUP_KEYS if key in keys] if groups else []
    positions = [list(keys).index(field) for field in fields]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*fields, "predictions", "cost_usd"])
    writer.writerows([*(values[i] for i in positions), count, usd_text(micros)] for values, count, micros in groups)
    return out.getvalue()


def as_table(result: dict[str, Any]) -> str:
    """The report as an aligned text table with a total line."""
    rows = result["rows"]
    fields = [k for k in (*GROUP_KEYS, "predictions", "cost_usd") if rows and k in rows[0]]
    if not fields:
        fields = ["predictions", "cost_usd"]
    total = result["total"]
    lines = [["-" if row[f] is None else str(row[f]) for f in fields] for row in rows]
    footer = ["TOTAL" if i == 0 and len(fields) > 2 else "" for i in range(len(fields) - 2)]
    footer += [str(total["predictions"]), total["cost_usd"]]
    table = [fields, *lines, footer]
    widths = [max(len(line[i]) for line in table) for i in range(len(fields))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in table) + "\n"
