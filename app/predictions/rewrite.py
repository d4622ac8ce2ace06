"""Pure functions: a ledger row to the Replicate prediction object clients receive."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

from app.predictions.models import Prediction

# Python rejects "aborted" and npm polls forever on it (wire spec §6.4).
_CLIENT_STATUS = {"aborted": "canceled"}


def rfc3339(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with exactly six fractional digits, as Replicate sends."""
    if moment is None:
        return None
    # isoformat, not strftime: a third of the time, for the three timestamps of every answer.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:26] + "Z"


def stream_token(prediction_id: str, key: bytes) -> str:
    """The unguessable capability part of a prediction's stream URL."""
    return hmac.new(key, b"stream:" + prediction_id.encode(), hashlib.sha256).hexdigest()[:40]


def web_origin(public_base: str) -> str:
    """Where the dashboard is: the public base without the `/replicate` API prefix."""
    return public_base.removesuffix("/replicate")


def prediction_urls(prediction: Prediction, public_base: str, key: bytes) -> dict[str, str]:
    """Absolute gateway URLs for a prediction. The gateway streams any prediction itself, so
    `stream` is always there (npm's `replicate.stream()` never asks for it)."""
    api = f"{public_base}/v1/predictions/{prediction.id}"
    return {
        "get": api,
        "cancel": api + "/cancel",
        "web": f"{web_origin(public_base)}/dashboard/predictions/{prediction.id}",
        "stream": f"{public_base}/v1/streams/{prediction.id}.{stream_token(prediction.id, key)}",
    }


def client_status(status: str) -> str:
    """The status as clients may see it."""
    return _CLIENT_STATUS.get(status, status)


def to_client(
    prediction: Prediction,
    public_base: str,
    key: bytes,
    *,
    status_override: str | None = None,
) -> dict[str, Any]:
    """The Replicate prediction object for a row; never an upstream URL, id or extra."""
    body: dict[str, Any] = {
        "id": prediction.id,
        "model": prediction.model,
        "version": prediction.version or "hidden",
        "input": prediction.input,
        "logs": prediction.logs or "",
        "output": prediction.output,
        "data_removed": False,
        "error": prediction.error,
        "status": status_override or client_status(prediction.status),
        "source": "api",
        "created_at": rfc3339(prediction.created_at),
        "started_at": rfc3339(prediction.started_at),
        "completed_at": rfc3339(prediction.completed_at),
        "urls": prediction_urls(prediction, public_base, key),
    }
    if prediction.metrics is not None:
        body["metrics"] = prediction.metrics
    if prediction.deployment:
        body["deployment"] = prediction.deployment
    if prediction.cancel_deadline is not None:
        body["deadline"] = rfc3339(prediction.cancel_deadline)
    # Replicate echoes the caller's own subscription (the npm client's types have it).
    if prediction.webhook is not None:
        body["webhook"] = prediction.webhook
        if prediction.webhook_events_filter is not None:
            body["webhook_events_filter"] = prediction.webhook_events_filter
    return body
