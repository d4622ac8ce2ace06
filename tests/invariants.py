"""The published ledger invariants, checked against the database and the fake relay's log."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from tests.dbtools import rows
from tests.fakes.relay import FakeRelay

TERMINAL = {"succeeded", "failed", "canceled", "aborted"}
UNFINISHED_ORDER = {"starting": 0, "processing": 1}


def moves_forward(before: str, after: str) -> bool:
    """I6 for two statuses of one prediction seen in turn: a final one never changes, and an
    unfinished one never goes back."""
    if before in TERMINAL:
        return after == before
    return after in TERMINAL or UNFINISHED_ORDER[after] >= UNFINISHED_ORDER[before]


def check_ledger(db_url: str, *, settled: bool = False) -> None:
    """I1 and I2: at most one settlement or release per prediction (exactly one once final, and
    for every prediction when `settled`), and each token's counters equal its ledger."""
    predictions = {p["id"]: p for p in rows(db_url, "prediction")}
    entries = rows(db_url, "ledger_entry")
    tokens = {t["id"]: t for t in rows(db_url, "api_token")}
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for entry in entries:
        kinds[entry["prediction_id"]][entry["kind"]] += 1
    for prediction_id, prediction in predictions.items():
        counts = kinds[prediction_id]
        closes = counts["settlement"] + counts["release"]
        assert counts["reservation"] <= 1, (prediction_id, counts)
        assert closes <= 1, (prediction_id, counts)
        if prediction["status"] in TERMINAL:
            assert closes == 1, f"final prediction {prediction_id} has {counts}"
            settlement = [e for e in entries if e["prediction_id"] == prediction_id and e["kind"] == "settlement"]
            charged = settlement[0]["amount_micros"] if settlement else 0
            assert prediction["cost_micros"] == charged, (prediction_id, prediction["cost_micros"], charged)
        elif settled:
            raise AssertionError(f"prediction {prediction_id} is still {prediction['status']}")
    for token_id, token in tokens.items():
        mine = [e for e in entries if e["token_id"] == token_id]
        closed = {e["prediction_id"] for e in mine if e["kind"] in ("settlement", "release")}
        open_reservations = [e for e in mine if e["kind"] == "reservation" and e["prediction_id"] not in closed]
        if token["budget_period"] is None:
            assert token["spent_micros"] == sum(e["amount_micros"] for e in mine if e["kind"] == "settlement"), token
        assert token["reserved_micros"] == sum(e["amount_micros"] for e in open_reservations), token
        assert token["in_flight"] == len(open_reservations), token


def check_one_to_one(db_url: str, relay: FakeRelay | list[FakeRelay]) -> None:
    """I4: every upstream prediction maps to exactly one row, and every linked row to one."""
    relays = relay if isinstance(relay, list) else [relay]
    created = [call.prediction_id for one in relays for call in one.creates()]
    linked = [p["upstream_id"] for p in rows(db_url, "prediction") if p["upstream_id"]]
    assert len(linked) == len(set(linked)), "two rows share an upstream id"
    assert set(linked) <= set(created), "a row links an upstream prediction the relay never made"
    orphans = set(created) - set(linked)
    in_doubt = [p for p in rows(db_url, "prediction") if p["upstream_id"] is None and p["submission"] == "unknown"]
    assert len(orphans) <= len(in_doubt), f"upstream predictions with no row: {orphans}"


def check_all(db_url: str, relay: FakeRelay | list[FakeRelay] | None = None, **kwargs: Any) -> None:
    """Every invariant this test set can check."""
    check_ledger(db_url, **kwargs)
    check_daily_usage(db_url)
    if relay is not None:
        check_one_to_one(db_url, relay)
    check_deliveries(db_url)


def _day(value: Any) -> str:
    if isinstance(value, str):  # SQLite keeps UTC timestamps and dates as text
        return value[:10]
    if isinstance(value, datetime):
        return value.astimezone(UTC).date().isoformat()
    return str(value)


def check_daily_usage(db_url: str) -> None:
    """The daily rollup equals the finished, non-rejected predictions it summarises."""
    expected: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for p in rows(db_url, "prediction"):
        if p["status"] in TERMINAL and p["submission"] != "rejected":
            counts = expected[(_day(p["created_at"]), p["token_id"], p["model"])]
            counts["predictions"] += 1
            counts[{"aborted": "failed"}.get(p["status"], p["status"])] += 1
            counts["cost_micros"] += p["cost_micros"] or 0
    actual = {
        (_day(r["day"]), r["token_id"], r["model"]): Counter({k: r[k] for k in (
            "predictions", "succeeded", "failed", "canceled", "cost_micros") if r[k]})
        for r in rows(db_url, "usage_daily")
    }
    assert actual == dict(expected), (actual, dict(expected))


def _json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def check_deliveries(db_url: str, *, final: bool = False) -> None:
    """I7: every subscribed terminal event has exactly one delivery record per receiving URL (the
    webhook's when it asked for `completed`, and `webhook_completed`'s), and none for an unfinished
    prediction; a record is pending only while attempts remain (never, when `final`)."""
    deliveries = rows(db_url, "webhook_delivery")
    completed: dict[str, Counter[str]] = defaultdict(Counter)
    for delivery in deliveries:
        if delivery["event"] == "completed":
            completed[delivery["prediction_id"]][delivery["url"]] += 1
    for prediction in rows(db_url, "prediction"):
        events = _json_value(prediction["webhook_events_filter"])
        wants_completed = "completed" in (events if events is not None else ["output", "completed"])
        receivers: set[str] = set()
        if prediction["webhook"] and prediction["status"] in TERMINAL and prediction["submission"] != "rejected":
            if wants_completed:
                receivers.add(prediction["webhook"])
            if prediction["webhook_completed"]:
                receivers.add(prediction["webhook_completed"])
        counted = dict(completed[prediction["id"]])
        assert counted == dict.fromkeys(receivers, 1), (prediction["id"], prediction["status"], counted)
    for delivery in deliveries:
        assert delivery["status"] in ("pending", "delivered", "dead"), delivery
        assert 0 <= delivery["attempts"] <= delivery["max_attempts"], delivery
        if delivery["status"] == "pending":
            assert not final, f"delivery {delivery['id']} ({delivery['event']}) is still pending"
        else:
            assert delivery["finished_at"] is not None, delivery
