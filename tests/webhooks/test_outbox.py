"""The outbox decides which deliveries a change calls for and writes them in its transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from app.db import make_engine, make_sessionmaker
from app.predictions.models import Prediction
from app.predictions.rewrite import to_client
from app.webhooks import outbox
from app.webhooks.models import WebhookDelivery
from tests.dbtools import run
from tests.webhooks.support import BASE, KEY, NOW, Ledger, moment


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    return Ledger(db_url)


def test_nothing_without_a_webhook(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook=None, webhook_events_filter=["start", "completed"])
    ledger.change(pid, previous_status=None)
    ledger.change(pid, previous_status="starting", status="succeeded", output=["x"])
    assert ledger.deliveries(pid) == []


def test_start_is_recorded_on_the_first_change_only_when_subscribed(ledger: Ledger) -> None:
    subscribed = ledger.prediction(webhook_events_filter=["start"])
    default = ledger.prediction()
    for pid in (subscribed, default):
        ledger.change(pid, previous_status=None)
        ledger.change(pid, previous_status="starting", status="processing")
    (start,) = ledger.deliveries(subscribed)
    assert (start["event"], start["max_attempts"], start["status"]) == ("start", 1, "pending")
    assert start["dedupe_key"] == f"{subscribed}:start:1"
    assert ledger.deliveries(default) == []


def test_completed_is_recorded_once_with_the_retry_budget_and_the_client_body(ledger: Ledger) -> None:
    pid = ledger.prediction()
    ledger.change(pid, previous_status="processing", status="aborted", completed_at=NOW,
                  previous_output=None, previous_logs=None, output=["https://gw.example.test/o.png"])
    (completed,) = ledger.deliveries(pid)
    assert completed["event"] == "completed"
    assert completed["dedupe_key"] == f"{pid}:completed"
    assert completed["max_attempts"] == len(outbox.RETRY_SCHEDULE) + 1
    assert completed["url"] == "https://hooks.example.com/in?customId=7"
    assert completed["token_id"] == ledger.token_id
    assert completed["message_id"].startswith("msg_")
    body = orjson.loads(completed["body"])
    assert body["status"] == "canceled"  # never "aborted" (wire spec §6.4)
    assert body["id"] == pid
    assert body["urls"]["get"] == f"{BASE}/v1/predictions/{pid}"

    async def expected() -> dict[str, Any]:
        engine = make_engine(ledger.db_url)
        try:
            async with make_sessionmaker(engine)() as session:
                row = await session.get(Prediction, pid)
                assert row is not None
                return to_client(row, BASE, KEY)
        finally:
            await engine.dispose()

    assert body == run(expected())


def test_default_filter_is_output_and_completed(ledger: Ledger) -> None:
    pid = ledger.prediction()
    ledger.change(pid, previous_status=None)
    ledger.change(pid, previous_status="starting", status="processing", logs="step 1\n",
                  previous_output=None, previous_logs=None)
    ledger.change(pid, previous_status="processing", output=["a"], previous_output=None,
                  previous_logs="step 1\n", now=NOW + timedelta(seconds=1))
    ledger.change(pid, previous_status="processing", status="succeeded", previous_output=["a"],
                  previous_logs="step 1\n", now=NOW + timedelta(seconds=2))
    assert [d["event"] for d in ledger.deliveries(pid)] == ["output", "completed"]


def test_an_explicit_filter_is_honoured(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook_events_filter=["logs"])
    ledger.change(pid, previous_status=None)
    ledger.change(pid, previous_status="starting", status="processing", logs="a\n", output=["x"],
                  previous_output=None, previous_logs=None)
    ledger.change(pid, previous_status="processing", status="succeeded", previous_output=["x"],
                  previous_logs="a\n", now=NOW + timedelta(seconds=1))
    assert [d["event"] for d in ledger.deliveries(pid)] == ["logs"]


def test_an_empty_filter_subscribes_to_nothing(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook_events_filter=[])
    ledger.change(pid, previous_status=None)
    ledger.change(pid, previous_status="starting", status="succeeded", output=["x"], previous_output=None)
    assert ledger.deliveries(pid) == []


def test_output_and_logs_are_throttled_to_one_per_500_ms(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook_events_filter=["output", "logs", "completed"], status="processing")
    outputs: list[str] = []
    for ms in (0, 100, 499, 500, 700, 1001):
        previous = list(outputs)
        outputs.append(f"o{ms}")
        ledger.change(pid, previous_status="processing", output=list(outputs), previous_output=previous,
                      previous_logs=None, now=NOW + timedelta(milliseconds=ms))
    recorded = ledger.deliveries(pid)
    assert [orjson.loads(d["body"])["output"][-1] for d in recorded] == ["o0", "o500", "o1001"]
    assert [d["dedupe_key"] for d in recorded] == [f"{pid}:output:{n}" for n in (1, 2, 3)]
    row = ledger.row(pid)
    assert row["webhook_sequence"] == 3
    assert moment(row["webhook_sent_at"]) == NOW + timedelta(milliseconds=1001)


def test_start_and_completed_are_never_throttled(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook_events_filter=["start", "output", "completed"],
                            webhook_sent_at=NOW - timedelta(milliseconds=100))
    ledger.change(pid, previous_status=None, output=["early"], previous_output=None)
    ledger.change(pid, previous_status="starting", status="succeeded", output=["early", "late"],
                  previous_output=["early"], now=NOW + timedelta(milliseconds=10))
    assert [d["event"] for d in ledger.deliveries(pid)] == ["start", "completed"]


def test_output_is_not_recorded_when_the_caller_does_not_say_what_it_was(ledger: Ledger) -> None:
    pid = ledger.prediction(status="processing", output=["x"])
    ledger.change(pid, previous_status="processing")
    assert ledger.deliveries(pid) == []


def test_a_second_completed_delivery_cannot_exist(ledger: Ledger) -> None:
    pid = ledger.prediction(status="succeeded")
    ledger.change(pid, previous_status="processing")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        ledger.change(pid, previous_status="processing")
    assert len(ledger.deliveries(pid)) == 1
    assert WebhookDelivery.__table__.c.dedupe_key.unique


ALSO = "https://other.example.com/done?customId=8"


def test_webhook_completed_gets_the_completed_event_as_another_message(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook_events_filter=["start", "completed"], webhook_completed=ALSO)
    ledger.change(pid, previous_status=None)
    ledger.change(pid, previous_status="starting", status="processing", output=["a"], previous_output=None)
    assert [d["event"] for d in ledger.deliveries(pid)] == ["start"]  # nothing more before the end
    ledger.change(pid, previous_status="processing", status="failed", previous_output=["a"])
    start, completed, also = ledger.deliveries(pid)
    assert [(d["event"], d["url"]) for d in (completed, also)] == [
        ("completed", "https://hooks.example.com/in?customId=7"), ("completed", ALSO)]
    assert (completed["dedupe_key"], also["dedupe_key"]) == (f"{pid}:completed", f"{pid}:completed:webhook_completed")
    assert also["max_attempts"] == completed["max_attempts"] == len(outbox.RETRY_SCHEDULE) + 1
    assert also["message_id"].startswith("msg_")
    assert len({start["message_id"], completed["message_id"], also["message_id"]}) == 3
    assert also["body"] == completed["body"]
    assert also["token_id"] == ledger.token_id
    assert ledger.row(pid)["webhook_sequence"] == 2  # the webhook's own messages only


def test_webhook_completed_gets_completed_even_when_the_webhook_filter_leaves_it_out(ledger: Ledger) -> None:
    pid = ledger.prediction(webhook_events_filter=["output"], webhook_completed=ALSO)
    ledger.change(pid, previous_status="processing", status="succeeded", output=["x"], previous_output=None)
    (also,) = ledger.deliveries(pid)
    assert (also["event"], also["url"], also["dedupe_key"]) == ("completed", ALSO, f"{pid}:completed:webhook_completed")


@pytest.mark.parametrize("events", [None, ["completed"], ["start"], []])
def test_the_webhook_url_given_again_as_webhook_completed_gets_completed_once(
    ledger: Ledger, events: list[str] | None
) -> None:
    pid = ledger.prediction(webhook_events_filter=events, webhook_completed="https://hooks.example.com/in?customId=7")
    ledger.change(pid, previous_status="processing", status="succeeded")
    (completed,) = ledger.deliveries(pid)
    assert (completed["event"], completed["url"]) == ("completed", "https://hooks.example.com/in?customId=7")


def test_a_second_completed_delivery_to_webhook_completed_cannot_exist(ledger: Ledger) -> None:
    pid = ledger.prediction(status="succeeded", webhook_events_filter=[], webhook_completed=ALSO)
    ledger.change(pid, previous_status="processing")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        ledger.change(pid, previous_status="processing")
    assert len(ledger.deliveries(pid)) == 1
