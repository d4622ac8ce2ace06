"""Outgoing webhooks end to end: signed, equal to GET, filtered, retried, refused, listed for admins."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import replicate
import standardwebhooks
from replicate.webhook import WebhookSigningSecret

from app.columns import utcnow
from app.db import HotReads, make_engine, make_read_sessionmaker, make_sessionmaker
from app.webhooks import outbox
from app.webhooks.delivery import Deliverer
from app.webhooks.models import WebhookDelivery
from app.webhooks.signing import team_secret
from tests.conftest import Gateway, make_settings
from tests.dbtools import create_token, dump_database, execute, rows, run
from tests.fakes.receiver import Received, Receiver
from tests.helpers import assert_problem, wait_terminal
from tests.invariants import check_deliveries
from tests.webhooks.support import (
    KEY,
    NOW,
    Ledger,
    create_with_webhook,
    deliveries,
    moment,
    wait_delivery,
)


def verify_signature(secret: str, request: Received) -> dict[str, Any]:
    """The body, after both the Standard Webhooks library and the official client accept it."""
    payload: dict[str, Any] = standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    assert replicate.webhooks.validate(headers=request.headers, body=request.body.decode(),
                                       secret=WebhookSigningSecret(key=secret), tolerance=300) is None
    return payload


def test_the_terminal_webhook_is_signed_with_the_team_secret_and_equals_get(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver
) -> None:
    created = create_with_webhook(hooks_api, receiver.url("/hook?customId=42"))
    final = wait_terminal(hooks_api, created["id"])
    (request,) = receiver.wait_for(1)
    secret = hooks_api.get("/webhooks/default/secret").json()["key"]

    assert verify_signature(secret, request) == hooks_api.get(f"/predictions/{created['id']}").json() == final
    assert request.json()["urls"]["get"] == f"{hooks_gateway.replicate_base}/v1/predictions/{created['id']}"
    assert (request.method, request.path, request.query) == ("POST", "/hook", "customId=42")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "replicate-gateway"
    assert request.headers["webhook-id"].startswith("msg_")
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    assert "authorization" not in request.headers
    assert "cookie" not in request.headers
    row = wait_delivery(hooks_gateway.db_url, created["id"], status="delivered")
    assert (row["attempts"], row["last_status"], row["message_id"]) == (1, 204, request.headers["webhook-id"])
    assert secret not in dump_database(hooks_gateway.db_url)  # derived when needed, never stored
    time.sleep(0.3)
    assert len(receiver.requests) == 1  # delivered once
    check_deliveries(hooks_gateway.db_url, final=True)


def test_each_token_has_its_own_secret_on_both_prefixes(hooks_gateway: Gateway) -> None:
    first, second = (create_token(hooks_gateway.db_url, name) for name in ("team-1", "team-2"))
    with hooks_gateway.client(first) as api:
        key = api.get("/webhooks/default/secret").json()["key"]
        bare = httpx.get(f"{hooks_gateway.url}/v1/webhooks/default/secret",
                         headers={"Authorization": f"Token {first}"}).json()["key"]
    client = replicate.Client(api_token=second, base_url=hooks_gateway.replicate_base)
    other = client.webhooks.default.secret().key
    assert key == bare
    assert key.startswith("whsec_")
    assert key.count("_") == 1
    assert other != key
    assert_problem(httpx.get(f"{hooks_gateway.url}/v1/webhooks/default/secret"), 401)
    assert_problem(httpx.get(f"{hooks_gateway.url}/v1/webhooks/default/secret",
                             headers={"Authorization": "Bearer gw_wrong"}), 401)


@pytest.mark.parametrize(("events", "expected"), [
    (["completed"], ["completed"]),
    (["start", "completed"], ["start", "completed"]),
    (None, ["completed"]),  # output + completed: the fake relay's output appears only at the end
    (["start"], ["start"]),
])
def test_the_events_filter_is_honoured(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver,
    events: list[str] | None, expected: list[str],
) -> None:
    created = create_with_webhook(hooks_api, receiver.url(), events)
    wait_terminal(hooks_api, created["id"])
    received = receiver.wait_for(len(expected))
    time.sleep(0.5)
    assert [d["event"] for d in deliveries(hooks_gateway.db_url, created["id"])] == expected
    assert len(receiver.requests) == len(expected)
    statuses = [r.json()["status"] for r in received]
    if "start" in expected:
        assert statuses[0] == "starting"
    if "completed" in expected:
        assert statuses[-1] == "succeeded"
    assert len({r.headers["webhook-id"] for r in received}) == len(expected)


def test_logs_events_are_sent_during_the_run_no_more_than_every_500_ms(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver
) -> None:
    created = create_with_webhook(hooks_api, receiver.url(), ["logs", "completed"])
    wait_terminal(hooks_api, created["id"])
    wait_delivery(hooks_gateway.db_url, created["id"], status="delivered")
    rows = deliveries(hooks_gateway.db_url, created["id"])
    events = [d["event"] for d in rows]
    assert events[-1] == "completed"
    assert set(events[:-1]) <= {"logs"}
    assert "logs" in events  # the relay writes logs while processing; wait_terminal polls every 0.1 s
    logs_at = [moment(d["created_at"]) for d in rows if d["event"] == "logs"]
    assert all(b - a >= timedelta(milliseconds=500) for a, b in itertools.pairwise(logs_at))


def test_a_failed_attempt_is_retried_with_the_same_webhook_id(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver
) -> None:
    receiver.answer(500)
    created = create_with_webhook(hooks_api, receiver.url(), ["completed"])
    wait_terminal(hooks_api, created["id"])
    failed = first_attempt_failed(hooks_gateway.db_url, receiver, created["id"])
    resent_and_delivered(hooks_api, hooks_gateway.db_url, receiver, failed)
    check_deliveries(hooks_gateway.db_url, final=True)


def first_attempt_failed(db_url: str, receiver: Receiver, prediction_id: str, url: str | None = None) -> dict[str, Any]:
    """The completed delivery (to `url`) once its first attempt was answered 500."""
    receiver.wait_for(1, answered=500)
    failed = wait_delivery(db_url, prediction_id, url=url, attempts=1, last_status=500)
    assert (failed["status"], failed["last_error"]) == ("pending", "the receiver answered 500")
    waited = moment(failed["next_attempt_at"]) - moment(failed["created_at"])
    assert timedelta(seconds=5) <= waited <= timedelta(seconds=6.5)  # first step of the schedule
    return failed


def resent_and_delivered(api: httpx.Client, db_url: str, receiver: Receiver, failed: dict[str, Any]) -> None:
    """Make the pending deliveries due now; the failed one is resent, as it was, and delivered."""
    execute(db_url, "UPDATE webhook_delivery SET next_attempt_at = created_at WHERE status = 'pending'")  # travel
    first, second = receiver.wait_for(2)
    assert second.status == 204
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == failed["message_id"]
    assert first.body == second.body
    secret = api.get("/webhooks/default/secret").json()["key"]
    verify_signature(secret, first)
    verify_signature(secret, second)
    done = wait_delivery(db_url, failed["prediction_id"], url=failed["url"], status="delivered")
    assert (done["attempts"], done["last_status"], done["last_error"]) == (2, 204, None)


def test_429_is_retried_after_its_retry_after(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver
) -> None:
    receiver.answer(429, headers={"retry-after": "1"})
    created = create_with_webhook(hooks_api, receiver.url(), ["completed"])
    wait_terminal(hooks_api, created["id"])
    first = time.monotonic()
    receiver.wait_for(1)
    receiver.wait_for(1, answered=204, timeout=10)
    assert time.monotonic() - first < 4.5  # not the 5 s of the schedule
    done = wait_delivery(hooks_gateway.db_url, created["id"], status="delivered")
    assert done["attempts"] == 2


def test_410_ends_every_delivery_waiting_for_that_url_and_a_later_event_is_tried_again(
    gateway_factory: Any, receiver: Receiver
) -> None:
    gateway: Gateway = gateway_factory(allow_private_webhooks=True, allow_http_webhooks=True, webhook_interval=0.1)
    receiver.answer(500, count=2)
    url, elsewhere = receiver.url("/gone"), receiver.url("/other")
    with gateway.client(create_token(gateway.db_url, "gone")) as api:
        first, second = (create_with_webhook(api, url, ["completed"]) for _ in range(2))
        other = create_with_webhook(api, elsewhere, ["completed"])
        for created in (first, second, other):
            wait_terminal(api, created["id"])
        for created in (first, second):
            wait_delivery(gateway.db_url, created["id"], attempts=1, last_status=500)
        # Both wait for their second attempt; the first one's is answered 410.
        receiver.answer(410)
        due_now = f"UPDATE webhook_delivery SET next_attempt_at = created_at WHERE prediction_id = '{first['id']}'"  # noqa: S608
        execute(gateway.db_url, due_now)
        wait_delivery(gateway.db_url, first["id"], status="dead", last_status=410)
        ended = wait_delivery(gateway.db_url, second["id"], status="dead")
        assert (ended["attempts"], ended["last_status"]) == (1, 410)
        assert ended["last_error"] == "the receiver answered 410 Gone to another delivery"
        assert wait_delivery(gateway.db_url, other["id"], status="delivered")["attempts"] == 1
        time.sleep(0.5)
        assert [r.path for r in receiver.requests].count("/gone") == 3  # never the second's retry
        # An event that comes after is tried: the receiver may be back.
        later = create_with_webhook(api, url, ["completed"])
        wait_terminal(api, later["id"])
        assert wait_delivery(gateway.db_url, later["id"], status="delivered")["attempts"] == 1
    check_deliveries(gateway.db_url, final=True)


def test_410_ends_the_delivery_and_admins_see_it_without_the_url(
    gateway_factory: Any, receiver: Receiver
) -> None:
    gateway: Gateway = gateway_factory(allow_private_webhooks=True, allow_http_webhooks=True, webhook_interval=0.1,
                                       admin_token="admin-canary-0123456789")
    receiver.answer(410)
    with gateway.client(create_token(gateway.db_url, "gone")) as api:
        created = create_with_webhook(api, receiver.url("/hook?token=receiver-secret-42"), ["completed"])
        wait_terminal(api, created["id"])
    dead = wait_delivery(gateway.db_url, created["id"], status="dead")
    assert (dead["attempts"], dead["last_status"]) == (1, 410)
    time.sleep(0.5)
    assert len(receiver.requests) == 1  # never retried
    admin = {"Authorization": "Bearer admin-canary-0123456789"}
    listed = httpx.get(f"{gateway.url}/admin/v1/webhooks/deliveries?status=dead", headers=admin)
    assert listed.status_code == 200, listed.text
    (entry,) = listed.json()["results"]
    assert entry["id"] == dead["id"]
    assert entry["prediction_id"] == created["id"]
    assert entry["token"] == "gone"
    assert (entry["event"], entry["status"], entry["attempts"], entry["last_status"]) == ("completed", "dead", 1, 410)
    assert entry["url_host"] == "127.0.0.1"
    assert entry["created_at"]
    assert entry["finished_at"]
    assert "receiver-secret-42" not in listed.text
    assert "/hook" not in listed.text
    pending = httpx.get(f"{gateway.url}/admin/v1/webhooks/deliveries?status=pending", headers=admin).json()
    assert pending == {"next": None, "results": []}
    assert httpx.get(f"{gateway.url}/admin/v1/webhooks/deliveries", headers=admin).json()["results"] == [entry]
    assert_problem(httpx.get(f"{gateway.url}/admin/v1/webhooks/deliveries?status=bogus", headers=admin), 422)
    assert_problem(httpx.get(f"{gateway.url}/admin/v1/webhooks/deliveries"), 401)
    check_deliveries(gateway.db_url, final=True)


def test_a_redirect_is_not_followed(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver
) -> None:
    receiver.redirect(receiver.url("/elsewhere"))
    created = create_with_webhook(hooks_api, receiver.url(), ["completed"])
    wait_terminal(hooks_api, created["id"])
    receiver.wait_for(1)
    row = wait_delivery(hooks_gateway.db_url, created["id"], last_status=302)
    assert row["status"] == "pending"  # a failed attempt, retried on the schedule
    time.sleep(0.5)
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_intermediate_events_are_sent_once_and_only_the_terminal_one_is_retried(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver
) -> None:
    receiver.answer(503)
    created = create_with_webhook(hooks_api, receiver.url(), ["start", "completed"])
    wait_terminal(hooks_api, created["id"])
    start = wait_delivery(hooks_gateway.db_url, created["id"], event="start", status="dead")
    assert (start["attempts"], start["max_attempts"], start["last_status"]) == (1, 1, 503)
    wait_delivery(hooks_gateway.db_url, created["id"], status="delivered")
    check_deliveries(hooks_gateway.db_url, final=True)


def test_a_private_destination_is_refused_when_not_allowed(
    gateway_factory: Any, receiver: Receiver
) -> None:
    gateway: Gateway = gateway_factory(webhook_interval=0.1, allow_http_webhooks=True)
    assert gateway.settings.allow_private_webhooks is False
    with gateway.client(create_token(gateway.db_url, "ssrf")) as api:
        # `webhook_completed` meets the same check as `webhook`.
        created = create_with_webhook(api, receiver.url(), ["start", "completed"],
                                      webhook_completed=receiver.url("/completed"))
        wait_terminal(api, created["id"])
    for url in (receiver.url(), receiver.url("/completed")):
        dead = wait_delivery(gateway.db_url, created["id"], url=url, status="dead")
        assert (dead["last_error"], dead["last_status"], dead["attempts"]) == ("destination not allowed", None, 1)
    start = wait_delivery(gateway.db_url, created["id"], event="start", status="dead")
    assert start["last_error"] == "destination not allowed"
    time.sleep(0.3)
    assert receiver.requests == []  # not one connection reached the listener
    check_deliveries(gateway.db_url, final=True)


@pytest.mark.parametrize("field", ["webhook", "webhook_completed"])
def test_http_webhooks_are_refused_unless_allowed(gateway_factory: Any, field: str) -> None:
    gateway: Gateway = gateway_factory()
    assert gateway.settings.allow_http_webhooks is False
    with gateway.client(create_token(gateway.db_url, "plain")) as api:
        body = {"input": {"prompt": "p"}, field: "HTTP://hooks.example.com/in"}
        problem = assert_problem(api.post("/models/black-forest-labs/flux-schnell/predictions", json=body), 422)
        assert [f["field"] for f in problem["invalid_fields"]] == [field]
        body[field] = "https://hooks.example.com/in"
        assert api.post("/models/black-forest-labs/flux-schnell/predictions", json=body).status_code == 201
    # Alone, webhook_completed is kept as the webhook of the completed event.
    assert rows(gateway.db_url, "prediction")[0]["webhook"] == "https://hooks.example.com/in"


def test_an_http_webhook_kept_from_before_is_not_sent_once_http_is_off(db_url: str, receiver: Receiver) -> None:
    ledger = Ledger(db_url)
    pid = ledger.prediction(status="succeeded", webhook=receiver.url())
    ledger.change(pid, previous_status="processing")
    settings = make_settings(db_url, "http://127.0.0.1:1", None, allow_private_webhooks=True)

    async def scenario() -> None:
        engine = make_engine(db_url)
        deliverer = Deliverer(sessions=make_sessionmaker(engine), settings=settings, key=KEY)
        try:
            assert await deliverer.run_once() == 1
        finally:
            await deliverer.aclose()
            await engine.dispose()

    run(scenario())
    (row,) = deliveries(db_url, pid)
    assert (row["status"], row["last_error"]) == ("dead", "destination not allowed")
    assert receiver.requests == []


# ---- webhook_completed beside a webhook: a second receiver of the completed event ----


def test_webhook_completed_beside_a_webhook_gets_the_completed_event_as_a_message_of_its_own(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver, other_receiver: Receiver
) -> None:
    hook, also = receiver.url("/a"), other_receiver.url("/b?customId=9")
    created = create_with_webhook(hooks_api, hook, ["start", "completed"], webhook_completed=also)
    final = wait_terminal(hooks_api, created["id"])
    by_status = {r.json()["status"]: r for r in receiver.wait_for(2)}
    (completed_only,) = other_receiver.wait_for(1)
    secret = hooks_api.get("/webhooks/default/secret").json()["key"]

    assert sorted(by_status) == ["starting", "succeeded"]
    for request in by_status.values():
        verify_signature(secret, request)
    assert verify_signature(secret, completed_only) == verify_signature(secret, by_status["succeeded"]) == final
    assert (completed_only.path, completed_only.query) == ("/b", "customId=9")
    # Two receivers, two messages: a receiver deduplicating on webhook-id must see both.
    assert completed_only.headers["webhook-id"] != by_status["succeeded"].headers["webhook-id"]
    row = wait_delivery(hooks_gateway.db_url, created["id"], url=also, status="delivered")
    assert (row["attempts"], row["max_attempts"]) == (1, len(outbox.RETRY_SCHEDULE) + 1)
    assert row["message_id"] == completed_only.headers["webhook-id"]
    wait_delivery(hooks_gateway.db_url, created["id"], url=hook, status="delivered")
    time.sleep(0.5)
    assert (len(receiver.requests), len(other_receiver.requests)) == (2, 1)
    assert sorted((d["event"], d["url"]) for d in deliveries(hooks_gateway.db_url, created["id"])) == sorted([
        ("start", hook), ("completed", hook), ("completed", also)])
    check_deliveries(hooks_gateway.db_url, final=True)


@pytest.mark.parametrize(("events", "expected"), [
    (None, ["completed"]),  # the webhook already gets completed: not a second time
    (["start"], ["completed", "start"]),  # completed only through webhook_completed
])
def test_the_same_url_as_webhook_and_webhook_completed_gets_each_event_once(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver,
    events: list[str] | None, expected: list[str],
) -> None:
    created = create_with_webhook(hooks_api, receiver.url(), events, webhook_completed=receiver.url())
    wait_terminal(hooks_api, created["id"])
    receiver.wait_for(len(expected))
    wait_delivery(hooks_gateway.db_url, created["id"], status="delivered")
    time.sleep(0.5)
    assert sorted(d["event"] for d in deliveries(hooks_gateway.db_url, created["id"])) == expected
    assert sorted(r.json()["status"] for r in receiver.requests) == sorted(
        {"completed": "succeeded", "start": "starting"}[event] for event in expected)
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == len(expected)
    check_deliveries(hooks_gateway.db_url, final=True)


def test_a_failing_webhook_completed_is_retried_and_the_webhook_is_unaffected(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver, other_receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other_receiver.answer(500)
    hook, also = receiver.url("/a"), other_receiver.url("/b?token=receiver-secret-b")
    created = create_with_webhook(hooks_api, hook, ["start", "completed"], webhook_completed=also)
    wait_terminal(hooks_api, created["id"])
    failed = first_attempt_failed(hooks_gateway.db_url, other_receiver, created["id"], url=also)
    for event in ("start", "completed"):
        sent = wait_delivery(hooks_gateway.db_url, created["id"], event, url=hook, status="delivered")
        assert (sent["attempts"], sent["last_status"]) == (1, 204)
    resent_and_delivered(hooks_api, hooks_gateway.db_url, other_receiver, failed)
    time.sleep(0.3)
    assert len(receiver.requests) == 2  # the webhook's own deliveries were neither held nor repeated
    assert any(r.getMessage().startswith("webhooks.") for r in caplog.records)
    # The receiver's secret in its URL reaches no log record, whatever a formatter would keep.
    assert not [r for r in caplog.records if "receiver-secret-b" in repr(r.__dict__)]
    check_deliveries(hooks_gateway.db_url, final=True)


def test_an_idempotent_replay_adds_no_delivery(
    hooks_gateway: Gateway, hooks_api: httpx.Client, receiver: Receiver, other_receiver: Receiver
) -> None:
    key = {"Idempotency-Key": "hooks-1"}
    hook, also = receiver.url("/a"), other_receiver.url("/b")
    created = create_with_webhook(hooks_api, hook, ["completed"], webhook_completed=also, headers=key)
    wait_terminal(hooks_api, created["id"])
    wait_delivery(hooks_gateway.db_url, created["id"], url=also, status="delivered")
    wait_delivery(hooks_gateway.db_url, created["id"], url=hook, status="delivered")
    for _ in range(2):
        assert create_with_webhook(hooks_api, hook, ["completed"], webhook_completed=also,
                                   headers=key)["id"] == created["id"]
    time.sleep(0.5)
    assert len(deliveries(hooks_gateway.db_url, created["id"])) == 2
    assert (len(receiver.requests), len(other_receiver.requests)) == (1, 1)
    check_deliveries(hooks_gateway.db_url, final=True)


# ---- the deliverer on its own, with a travelling clock and a stub resolver ----


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def stub_resolver(address: str = "127.0.0.1") -> Any:
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return [address]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


async def _delivery(sessions: Any, prediction_id: str) -> WebhookDelivery:
    async with sessions() as session:
        row = (await session.execute(
            WebhookDelivery.__table__.select().where(WebhookDelivery.prediction_id == prediction_id)
        )).one()
        return WebhookDelivery(**row._mapping)


@pytest.mark.parametrize("peeking", [False, True], ids=["claims", "peeks-then-claims"])
def test_a_failing_receiver_gets_the_terminal_event_on_the_published_schedule_then_it_is_dead(
    db_url: str, receiver: Receiver, peeking: bool
) -> None:
    receiver.default_status = 500
    ledger = Ledger(db_url)
    pid = ledger.prediction(status="succeeded", webhook=f"http://hooks.test:{receiver.port}/in?x=1")
    ledger.change(pid, previous_status="processing")
    resolver = stub_resolver()
    clock = Clock(NOW)
    settings = make_settings(db_url, "http://127.0.0.1:1", None, allow_private_webhooks=True, allow_http_webhooks=True)

    async def scenario() -> list[float]:
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        write_sessions = 0

        def counted() -> Any:
            nonlocal write_sessions
            write_sessions += 1
            return sessions()

        # With the loop thread's reads (SQLite), a pass with nothing due opens no write session.
        hot_reads = HotReads(engine, make_read_sessionmaker(engine)) if peeking else None
        quiet = peeking and hot_reads is not None and hot_reads.on_loop_thread
        deliverer = Deliverer(sessions=counted, settings=settings, key=KEY, resolver=resolver,  # type: ignore[arg-type]
                              clock=clock, hot_reads=hot_reads)
        gaps: list[float] = []
        try:
            for _ in range(len(outbox.RETRY_SCHEDULE) + 1):
                assert await deliverer.run_once() == 1
                before = write_sessions
                assert await deliverer.run_once() == 0  # nothing is due before its time
                assert (write_sessions == before) is quiet
                row = await _delivery(sessions, pid)
                if row.status == "dead":
                    break
                gaps.append((row.next_attempt_at - clock.now).total_seconds())
                clock.now = row.next_attempt_at
            clock.now += timedelta(days=30)
            assert await deliverer.run_once() == 0  # dead is final
        finally:
            await deliverer.aclose()
            if hot_reads is not None:
                hot_reads.dispose()
            await engine.dispose()
        return gaps

    gaps = run(scenario())
    assert len(gaps) == len(outbox.RETRY_SCHEDULE)
    for gap, scheduled in zip(gaps, outbox.RETRY_SCHEDULE, strict=True):
        assert scheduled <= gap <= scheduled * 1.2 + 0.001
    assert sum(gaps) >= 24 * 3600  # retried for at least a day
    received = receiver.requests
    assert len(received) == len(outbox.RETRY_SCHEDULE) + 1
    assert len({r.headers["webhook-id"] for r in received}) == 1
    secret = team_secret(KEY, ledger.token_id)
    for request in received:
        verify_signature(secret, request)
        # Connected to the address the resolver gave, with the name the client gave.
        assert request.headers["host"] == f"hooks.test:{receiver.port}"
        assert (request.path, request.query) == ("/in", "x=1")
    assert resolver.calls == [("hooks.test", receiver.port)] * len(received)
    (row,) = deliveries(db_url, pid)
    assert (row["status"], row["attempts"], row["last_status"]) == ("dead", 11, 500)
    check_deliveries(db_url, final=True)


def test_a_delivery_sent_but_not_marked_is_resent_with_the_same_id_after_its_lease(
    db_url: str, receiver: Receiver
) -> None:
    ledger = Ledger(db_url)
    pid = ledger.prediction(status="succeeded", webhook=receiver.url())
    ledger.change(pid, previous_status="processing")
    settings = make_settings(db_url, "http://127.0.0.1:1", None, allow_private_webhooks=True, allow_http_webhooks=True)
    clock = Clock(NOW)

    async def scenario() -> None:
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        crashed = Deliverer(sessions=sessions, settings=settings, key=KEY, clock=clock)
        survivor = Deliverer(sessions=sessions, settings=settings, key=KEY, clock=clock)
        try:
            (claim,) = await crashed._claim()
            await crashed._attempt(claim)  # sent; the process "dies" before recording it
            assert await survivor.run_once() == 0  # leased
            clock.now = claim.lease_until + timedelta(seconds=1)
            assert await survivor.run_once() == 1
            # The first process's late answer is fenced out: the survivor's outcome stands.
            await crashed._finish(claim, await crashed._attempt(claim))
        finally:
            await crashed.aclose()
            await survivor.aclose()
            await engine.dispose()

    run(scenario())
    received = receiver.requests
    assert len(received) == 3
    assert len({r.headers["webhook-id"] for r in received}) == 1
    (row,) = deliveries(db_url, pid)
    assert (row["status"], row["attempts"]) == ("delivered", 2)


def test_two_deliverers_share_one_queue_without_sending_twice(db_url: str, receiver: Receiver) -> None:
    ledger = Ledger(db_url)
    now = utcnow()
    for _ in range(30):
        pid = ledger.prediction(status="succeeded", webhook=receiver.url())
        ledger.change(pid, previous_status="processing", now=now)
    settings = make_settings(db_url, "http://127.0.0.1:1", None, allow_private_webhooks=True, allow_http_webhooks=True)

    async def scenario() -> None:
        engines = [make_engine(db_url), make_engine(db_url)]
        workers = [Deliverer(sessions=make_sessionmaker(e), settings=settings, key=KEY) for e in engines]
        try:
            for _ in range(3):
                await asyncio.gather(*(w.run_once() for w in workers))
        finally:
            for worker in workers:
                await worker.aclose()
            for engine in engines:
                await engine.dispose()

    run(scenario())
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == len(set(ids)) == 30
    assert {(d["status"], d["attempts"]) for d in deliveries(db_url)} == {("delivered", 1)}
