"""Helpers for the webhook tests: creates with a webhook, the outbox rows, waiting on them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx

from app.db import make_engine, make_sessionmaker
from app.predictions.models import Prediction, Submission
from app.tokens.service import new_id
from app.webhooks import outbox
from tests.dbtools import create_token, rows, run

KEY = b"k" * 32
BASE = "https://gw.example.test/replicate"
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
_UNSET: Any = object()


def moment(value: Any) -> datetime:
    """A timestamp column as raw SQL returns it (text on SQLite), as an aware UTC datetime."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def create_with_webhook(api: httpx.Client, url: str | None, events: list[str] | None = None,
                        model: str = "black-forest-labs/flux-schnell", *, webhook_completed: str | None = None,
                        headers: dict[str, str] | None = None, **inputs: Any) -> dict[str, Any]:
    """Create a prediction with a webhook (and an events filter and `webhook_completed`, when given)."""
    body: dict[str, Any] = {"input": {"prompt": "p", **inputs}}
    if url is not None:
        body["webhook"] = url
    if events is not None:
        body["webhook_events_filter"] = events
    if webhook_completed is not None:
        body["webhook_completed"] = webhook_completed
    response = api.post(f"/models/{model}/predictions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def deliveries(db_url: str, prediction_id: str | None = None) -> list[dict[str, Any]]:
    """The outbox rows (of one prediction), oldest first."""
    found = [d for d in rows(db_url, "webhook_delivery")
             if prediction_id is None or d["prediction_id"] == prediction_id]
    return sorted(found, key=lambda d: d["id"])


def wait_delivery(db_url: str, prediction_id: str, event: str = "completed", timeout: float = 15,
                  *, url: str | None = None, **expected: Any) -> dict[str, Any]:
    """Wait until the prediction's delivery of `event` (to `url`, when given) has the `expected`
    column values."""
    deadline = time.monotonic() + timeout
    while True:
        found = [d for d in deliveries(db_url, prediction_id)
                 if d["event"] == event and (url is None or d["url"] == url)]
        if found and all(found[0][k] == v for k, v in expected.items()):
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} delivery with {expected}: {found}")
        time.sleep(0.05)


class Ledger:
    """One token and helpers to make predictions and run `record_events` against the database."""

    def __init__(self, db_url: str, name: str = "ledger") -> None:
        self.db_url = db_url
        create_token(db_url, name)
        self.token_id = next(t["id"] for t in rows(db_url, "api_token") if t["name"] == name)

    def prediction(self, **fields: Any) -> str:
        values: dict[str, Any] = {
            "id": new_id(), "token_id": self.token_id, "upstream": "default", "upstream_id": new_id(),
            "submission": Submission.ACCEPTED, "model": "black-forest-labs/flux-schnell",
            "status": "starting", "input": {"prompt": "p"}, "created_at": NOW, "updated_at": NOW,
            "webhook": "https://hooks.example.com/in?customId=7", "public_base": BASE, **fields,
        }

        async def insert() -> None:
            engine = make_engine(self.db_url)
            try:
                async with make_sessionmaker(engine)() as session:
                    session.add(Prediction(**values))
                    await session.commit()
            finally:
                await engine.dispose()

        run(insert())
        return str(values["id"])

    def change(self, prediction_id: str, *, previous_status: str | None, now: datetime = NOW,
               previous_output: Any = _UNSET, previous_logs: Any = _UNSET, **fields: Any) -> None:
        """Set `fields` on the row and record events as the service does, in one transaction."""

        async def apply() -> None:
            engine = make_engine(self.db_url)
            try:
                async with make_sessionmaker(engine)() as session:
                    row = await session.get(Prediction, prediction_id)
                    assert row is not None
                    for name, value in fields.items():
                        setattr(row, name, value)
                    await session.flush()
                    await session.refresh(row)
                    given = {k: v for k, v in (("previous_output", previous_output),
                                               ("previous_logs", previous_logs)) if v is not _UNSET}
                    await session.run_sync(lambda sync: outbox.record_events(
                        sync.connection(), row, previous_status=previous_status, key=KEY, now=now, **given))
                    await session.commit()
            finally:
                await engine.dispose()

        run(apply())

    def deliveries(self, prediction_id: str) -> list[dict[str, Any]]:
        found = [d for d in rows(self.db_url, "webhook_delivery") if d["prediction_id"] == prediction_id]
        return sorted(found, key=lambda d: d["id"])

    def row(self, prediction_id: str) -> dict[str, Any]:
        return next(p for p in rows(self.db_url, "prediction") if p["id"] == prediction_id)
