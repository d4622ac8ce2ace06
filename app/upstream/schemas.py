"""Lenient, validating parse of the prediction JSON that relays send."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from app.predictions.models import STATUSES

# Fields we keep as our own columns or rebuild ourselves; anything else is a relay extra.
_KNOWN_FIELDS = frozenset({
    "id", "model", "version", "input", "output", "logs", "error", "status", "source",
    "data_removed", "created_at", "started_at", "completed_at", "urls", "metrics", "deployment",
    "webhook", "webhook_events_filter", "webhook_completed", "deadline",
})
_UPSTREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:]{0,127}")
_FRACTION = re.compile(r"\.(\d+)")


class InvalidUpstreamPrediction(ValueError):
    """The upstream's answer is not a usable prediction object."""


@dataclass(frozen=True)
class UpstreamPrediction:
    """What we take from an upstream prediction object."""

    id: str
    status: str
    model: str | None
    version: str | None
    output: Any
    error: str | None
    logs: str | None
    metrics: dict[str, Any] | None
    started_at: datetime | None
    completed_at: datetime | None
    streamable: bool
    extra: dict[str, Any] = field(default_factory=dict)


def parse_timestamp(value: Any) -> datetime | None:
    """RFC 3339 with any number of fractional digits (relays send nanoseconds); None if absent."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    # PostgreSQL's text holds no NUL, and a model may print one: kept, every recording of the
    # prediction failed there. Shown as the replacement character, as an undecodable byte is.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def parse_prediction(data: Any) -> UpstreamPrediction:
    """Validate and extract an upstream prediction, or raise InvalidUpstreamPrediction."""
    if not isinstance(data, dict):
        raise InvalidUpstreamPrediction("not an object")
    upstream_id = data.get("id")
    if not isinstance(upstream_id, str) or not _UPSTREAM_ID.fullmatch(upstream_id):
        raise InvalidUpstreamPrediction("missing or malformed id")
    status = data.get("status")
    if not isinstance(status, str) or status not in STATUSES:
        raise InvalidUpstreamPrediction("unknown status")
    metrics = data.get("metrics")
    urls = data.get("urls")
    model = data.get("model")
    version = data.get("version")
    return UpstreamPrediction(
        id=upstream_id,
        status=status,
        model=model if isinstance(model, str) and model else None,
        version=version if isinstance(version, str) and version else None,
        output=data.get("output"),
        error=_optional_text(data.get("error")),
        logs=_optional_text(data.get("logs")),
        metrics=metrics if isinstance(metrics, dict) else None,
        started_at=parse_timestamp(data.get("started_at")),
        completed_at=parse_timestamp(data.get("completed_at")),
        streamable=isinstance(urls, dict) and isinstance(urls.get("stream"), str),
        extra={k: v for k, v in data.items() if k not in _KNOWN_FIELDS},
    )


def to_wire(reply: UpstreamPrediction) -> dict[str, Any]:
    """An upstream prediction as a JSON object that `parse_prediction` reads back as it was."""
    data: dict[str, Any] = {
        **reply.extra,
        "id": reply.id, "status": reply.status, "model": reply.model, "version": reply.version,
        "output": reply.output, "error": reply.error, "logs": reply.logs, "metrics": reply.metrics,
        "started_at": reply.started_at.isoformat() if reply.started_at else None,
        "completed_at": reply.completed_at.isoformat() if reply.completed_at else None,
    }
    if reply.streamable:
        data["urls"] = {"stream": ""}
    return data
