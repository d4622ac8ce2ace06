"""A terminal webhook outlives `kill -9`: a new process on the same database delivers it, same webhook-id."""

from __future__ import annotations

from pathlib import Path

import httpx
import standardwebhooks

from tests.dbtools import create_token
from tests.fakes.receiver import Receiver
from tests.fakes.relay import FakeRelay
from tests.invariants import check_all, check_deliveries
from tests.processes import GatewayProcess
from tests.webhooks.support import create_with_webhook, wait_delivery


def _gateway(db_url: str, relay: FakeRelay, workdir: Path) -> GatewayProcess:
    return GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                          workdir=workdir, allow_private_webhooks="true", allow_http_webhooks="true", webhook_interval="0.2").start()


def _create(gateway: GatewayProcess, secret: str, url: str) -> tuple[str, str]:
    """A prediction with a terminal-only webhook, and the team's signing secret."""
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {secret}"}, timeout=10) as api:
        created = create_with_webhook(api, url, ["completed"])
        key: str = api.get("/webhooks/default/secret").json()["key"]
    return created["id"], key


def test_a_failed_terminal_webhook_is_delivered_by_the_next_process(
    db_url: str, relay: FakeRelay, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.default_status = 500
    secret = create_token(db_url, "durable")
    first = _gateway(db_url, relay, tmp_path)
    try:
        prediction_id, key = _create(first, secret, receiver.url())
        receiver.wait_for(1, timeout=20)  # the reconciler finishes it, the first attempt fails
        wait_delivery(db_url, prediction_id, attempts=1, last_status=500, status="pending")
    finally:
        first.kill()
    receiver.default_status = 204

    second = _gateway(db_url, relay, tmp_path)
    try:
        receiver.wait_for(1, answered=204, timeout=30)
        done = wait_delivery(db_url, prediction_id, status="delivered")
    finally:
        second.stop()
    received = receiver.requests
    assert {r.headers["webhook-id"] for r in received} == {done["message_id"]}
    for request in received:
        payload = standardwebhooks.Webhook(key).verify(request.body, request.headers)
        assert (payload["id"], payload["status"]) == (prediction_id, "succeeded")
    assert received[0].body == received[-1].body
    check_deliveries(db_url, final=True)
    check_all(db_url, relay, settled=True)


def test_a_webhook_in_flight_when_the_process_dies_is_resent_after_its_lease(
    db_url: str, relay: FakeRelay, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.answer(204, hang_seconds=60)  # the first attempt never gets its answer
    secret = create_token(db_url, "in-flight")
    first = _gateway(db_url, relay, tmp_path)
    try:
        prediction_id, key = _create(first, secret, receiver.url())
        receiver.wait_for(1, timeout=20)
    finally:
        first.kill()
    second = _gateway(db_url, relay, tmp_path)
    try:
        receiver.wait_for(2, timeout=45)  # once the dead process's lease has run out
        done = wait_delivery(db_url, prediction_id, status="delivered")
    finally:
        second.stop()
    first_try, resent = receiver.requests[:2]
    assert first_try.headers["webhook-id"] == resent.headers["webhook-id"] == done["message_id"]
    assert first_try.body == resent.body
    standardwebhooks.Webhook(key).verify(resent.body, resent.headers)
    assert done["attempts"] == 2
    check_deliveries(db_url, final=True)
