"""Usage reports: prediction counts and cost, grouped by token, model, day and token group."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounting.pricing import usd_text
from app.groups.models import TokenGroup
from app.predictions.models import Prediction, Submission
from app.tokens.models import ApiToken

GROUP_KEYS = ("token", "model", "day", "group")


async def report(
    session: AsyncSession,
    *,
    since: date | None = None,
    until: date | None = None,
    group_by: Sequence[str] = (),
) -> dict[str, Any]:
    """Counts and exact USD costs per group; `until` is inclusive, days are UTC; `group` is the
    token's group now (null for none)."""
    unknown = [key for key in group_by if key not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}")
    keys = list(dict.fromkeys(group_by))
    columns = {
        "token": ApiToken.name,
        "model": Prediction.model,
        "day": func.date(Prediction.created_at),
        "group": TokenGroup.name,
    }
    selected: list[Any] = [columns[key].label(key) for key in keys]
    query = (
        select(*selected, func.count(Prediction.id), func.coalesce(func.sum(Prediction.cost_micros), 0))
        .join(ApiToken, ApiToken.id == Prediction.token_id)
        .where(Prediction.submission != Submission.REJECTED)
    )
    if "group" in keys:
        query = query.outerjoin(TokenGroup, TokenGroup.id == ApiToken.group_id)
    if since is not None:
        query = query.where(Prediction.created_at >= datetime.combine(since, time(), UTC))
    if until is not None:
        end = datetime.combine(until + timedelta(days=1), time(), UTC)
        query = query.where(Prediction.created_at < end)
    if selected:
        # Nulls (no group) last on both databases.
        query = query.group_by(*selected).order_by(*(column.asc().nulls_last() for column in selected))
    rows = []
    total_count = 0
    total_micros = 0
    for record in (await session.execute(query)).all():
        values = list(record)
        count, micros = int(values[-2]), int(values[-1])
        if not selected and count == 0:
            continue
        row: dict[str, Any] = {key: None if value is None else str(value)
                               for key, value in zip(keys, values, strict=False)}
        row.update({"predictions": count, "cost_usd": usd_text(micros)})
        rows.append(row)
        total_count += count
        total_micros += micros
    return {"rows": rows, "total": {"predictions": total_count, "cost_usd": usd_text(total_micros)}}


def as_csv(result: dict[str, Any]) -> str:
    """The report's rows as CSV with a header line."""
    rows = result["rows"]
    fields = [k for k in (*GROUP_KEYS, "predictions", "cost_usd") if rows and k in rows[0]]
    if not fields:
        fields = ["predictions", "cost_usd"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
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
