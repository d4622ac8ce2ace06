"""Reading the webhook outbox for admins: deliveries newest first, with the URL's host only."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.tokens.models import ApiToken
from app.webhooks.models import WebhookDelivery

PAGE_SIZE = 100


def url_host(url: str) -> str | None:
    """The host of a webhook URL: never its path or query, which may carry the receiver's secrets."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


async def page(
    session: AsyncSession, *, status: str | None, before: int | None
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to 100 deliveries older than id `before`, newest first, and the id to continue from."""
    query = (select(WebhookDelivery, ApiToken.name)
             .join(ApiToken, ApiToken.id == WebhookDelivery.token_id)
             .order_by(WebhookDelivery.id.desc())
             .limit(PAGE_SIZE + 1))
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if before is not None:
        query = query.where(WebhookDelivery.id < before)
    rows = (await session.execute(query)).all()
    more = len(rows) > PAGE_SIZE
    shown = rows[:PAGE_SIZE]
    results: list[dict[str, Any]] = [
        {
            "id": delivery.id,
            "prediction_id": delivery.prediction_id,
            "token": token_name,
            "event": delivery.event,
            "url_host": url_host(delivery.url),
            "status": delivery.status,
            "attempts": delivery.attempts,
            "max_attempts": delivery.max_attempts,
            "last_status": delivery.last_status,
            "last_error": delivery.last_error,
            "created_at": delivery.created_at.isoformat(),
            "next_attempt_at": delivery.next_attempt_at.isoformat() if delivery.status == "pending" else None,
            "finished_at": delivery.finished_at.isoformat() if delivery.finished_at else None,
        }
        for delivery, token_name in shown
    ]
    return results, (shown[-1][0].id if more else None)
