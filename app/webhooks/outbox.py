"""Enqueue client webhook deliveries in the transaction of the state change that causes them."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import Table, insert, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value

from app.predictions import rewrite
from app.predictions.models import PREDICTIONS, Prediction
from app.webhooks.models import DeliveryStatus, WebhookDelivery

EVENTS = ("start", "output", "logs", "completed")
# Replicate's API docs: without a filter, webhooks go out for new outputs and on completion.
DEFAULT_EVENTS = ("output", "completed")
THROTTLE = timedelta(milliseconds=500)
# Seconds to wait after each failed attempt of a terminal event (plus up to 20 % jitter):
# the last retry comes about 47 h after the first attempt, and never sooner than 24 h.
RETRY_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 10800, 21600, 43200, 86400)
# Leaves room for the gateway's stored base URL; rows made before it existed get path-only URLs.
_UNKNOWN_BASE = ""
_NOT_GIVEN: Any = object()
_INSERT_DELIVERY = insert(cast(Table, WebhookDelivery.__table__))


def subscribed(prediction: Prediction) -> frozenset[str]:
    """The events this prediction's webhook asked for (the API docs' default without a filter)."""
    chosen = prediction.webhook_events_filter
    return frozenset(DEFAULT_EVENTS if chosen is None else chosen)


def completed_only(prediction: Prediction, wanted: frozenset[str]) -> str | None:
    """The `webhook_completed` URL, when its completed event is a message of its own: not when
    it is the `webhook` URL already subscribed to `completed` (one message per event and URL)."""
    url = prediction.webhook_completed
    if url is None or (url == prediction.webhook and "completed" in wanted):
        return None
    return url


def body_of(prediction: Prediction, key: bytes) -> str:
    """The exact JSON a webhook sends: the prediction as `GET /v1/predictions/{id}` returns it."""
    return orjson.dumps(rewrite.to_client(prediction, prediction.public_base or _UNKNOWN_BASE, key)).decode()


def record_events(
    connection: Connection,
    prediction: Prediction,
    *,
    previous_status: str | None,
    key: bytes,
    now: datetime,
    previous_output: Any = _NOT_GIVEN,
    previous_logs: str | None = _NOT_GIVEN,
) -> None:
    """Write the deliveries this change calls for; `previous_status` is None on the first one.

    Call it after the prediction row changed and was refreshed, in the same transaction, so a
    delivery exists exactly when its change commits. Without `previous_output` / `previous_logs`
    the output and logs are taken as unchanged."""
    if not prediction.webhook:
        return
    wanted = subscribed(prediction)
    events: list[str] = []
    if previous_status is None and "start" in wanted:
        events.append("start")
    if prediction.is_terminal:
        # The completed body carries the final output and logs: no separate event for them.
        if "completed" in wanted:
            events.append("completed")
    else:
        output_changed = previous_output is not _NOT_GIVEN and prediction.output != previous_output
        logs_changed = previous_logs is not _NOT_GIVEN and (prediction.logs or "") != (previous_logs or "")
        # One message per change: output and logs would carry the same body.
        intermediate = ("output" if output_changed and "output" in wanted
                        else "logs" if logs_changed and "logs" in wanted else None)
        sent_at = prediction.webhook_sent_at
        if intermediate is not None and (sent_at is None or now - sent_at >= THROTTLE):
            events.append(intermediate)
    also = completed_only(prediction, wanted) if prediction.is_terminal else None
    if not events and also is None:
        return
    body = body_of(prediction, key)
    sequence = prediction.webhook_sequence
    throttle_clock = prediction.webhook_sent_at
    deliveries = []
    for event in events:
        sequence += 1
        if event in ("output", "logs"):
            throttle_clock = now
        dedupe_key = f"{prediction.id}:completed" if event == "completed" else f"{prediction.id}:{event}:{sequence}"
        deliveries.append(_delivery(prediction, event, dedupe_key, prediction.webhook, body, now))
    if also is not None:
        # Another message to another receiver: its own dedupe key and webhook-id.
        deliveries.append(_delivery(prediction, "completed", f"{prediction.id}:completed:webhook_completed",
                                    also, body, now))
    connection.execute(_INSERT_DELIVERY, deliveries)
    # The caller's UPDATE holds the row (lock on PostgreSQL, write lock on SQLite) until commit,
    # so this read-modify-write of the sequence cannot interleave with another change.
    connection.execute(
        update(PREDICTIONS)
        .where(PREDICTIONS.c.id == prediction.id)
        .values(webhook_sequence=sequence, webhook_sent_at=throttle_clock)
    )
    set_committed_value(prediction, "webhook_sequence", sequence)
    set_committed_value(prediction, "webhook_sent_at", throttle_clock)


def _delivery(prediction: Prediction, event: str, dedupe_key: str, url: str, body: str,
              now: datetime) -> dict[str, Any]:
    """One outbox row; only a completed event has retries."""
    terminal = event == "completed"
    return {
        "prediction_id": prediction.id,
        "token_id": prediction.token_id,
        "event": event,
        "dedupe_key": dedupe_key,
        "message_id": "msg_" + secrets.token_urlsafe(24),
        "url": url,
        "body": body,
        "status": DeliveryStatus.PENDING,
        "attempts": 0,
        "max_attempts": len(RETRY_SCHEDULE) + 1 if terminal else 1,
        "next_attempt_at": now,
        "created_at": now,
    }
