"""`kill -9` at each named crash point, then a restart: nothing committed is lost, no prediction is
created twice, settled twice or left unfinished, and a webhook is resent with its id (guarantees P14)."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.crashpoints import POINTS
from tests.dbtools import create_token, rows
from tests.fakes.receiver import Receiver
from tests.fakes.relay import FakeRelay
from tests.helpers import TERMINAL, wait_until_all_final
from tests.invariants import check_all, check_deliveries
from tests.processes import GatewayProcess
from tests.webhooks.support import wait_delivery

MODEL = "budget/model"


def _gateway(db_url: str, relay: FakeRelay, workdir: Path, **settings: str) -> GatewayProcess:
    return GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                          workdir=workdir, allow_private_webhooks="true", allow_http_webhooks="true", webhook_interval="0.2",
                          **settings).start()


def _api(gateway: GatewayProcess, secret: str) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def _cut_short(call: Callable[[], httpx.Response]) -> None:
    """The request the process died under: no answer, only a broken connection."""
    with pytest.raises(httpx.TransportError):
        call()


def _create(api: httpx.Client, **extra: Any) -> httpx.Response:
    return api.post(f"/models/{MODEL}/predictions", json={"input": {"prompt": "p"}, **extra})


def _drive(point: str, gateway: GatewayProcess, secret: str, relay: FakeRelay, receiver: Receiver) -> None:
    """What a client does until the armed process dies at `point`."""
    with _api(gateway, secret) as api:
        if point.startswith("create."):
            _cut_short(lambda: _create(api))
        elif point == "cancel.accepted":
            relay.starting_seconds = 60
            created = _create(api).json()
            _cut_short(lambda: api.post(f"/predictions/{created['id']}/cancel"))
        elif point == "prediction.settled":
            assert _create(api).status_code == 201  # the reconciler finishes it, and dies settling
        else:
            assert point == "webhook.answered"
            created = _create(api, webhook=receiver.url(), webhook_events_filter=["completed"])
            assert created.status_code == 201


def _expectations(point: str, db_url: str, relay: FakeRelay, receiver: Receiver) -> None:
    (row,) = rows(db_url, "prediction")
    upstream_creates = relay.creates()
    if point == "create.recorded":
        assert upstream_creates == []  # died before sending: nothing upstream, ever
        assert row["status"] == "failed"
    elif point == "create.accepted":
        # Accepted upstream but never linked: in doubt, resolved as failed by the reconciler.
        assert len(upstream_creates) == 1
        assert (row["upstream_id"], row["submission"], row["status"]) == (None, "unknown", "failed")
    else:
        assert len(upstream_creates) == 1  # never sent again by the restarted process
        assert row["upstream_id"] == upstream_creates[0].prediction_id
        expected = "canceled" if point == "cancel.accepted" else "succeeded"
        assert row["status"] == expected
    if point == "cancel.accepted":
        assert sum(1 for call in relay.calls if call.path.endswith("/cancel")) == 1
    if point == "webhook.answered":
        done = wait_delivery(db_url, row["id"], status="delivered", timeout=60)
        ids = {request.headers["webhook-id"] for request in receiver.requests}
        assert len(receiver.requests) >= 2  # answered once before the crash, resent after it
        assert ids == {done["message_id"]}
        check_deliveries(db_url, final=True)


@pytest.mark.parametrize("point", sorted(POINTS))
def test_kill_9_at_a_crash_point_then_a_restart_loses_and_repeats_nothing(
    point: str, db_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    secret = create_token(db_url, "crashy", budget_micros=10_000_000)
    relay.starting_seconds, relay.processing_seconds = 0.3, 0.3
    receiver = Receiver().start()
    try:
        armed = _gateway(db_url, relay, tmp_path, test_crash_at=point)
        try:
            _drive(point, armed, secret, relay, receiver)
            assert armed.process is not None
            assert armed.process.wait(timeout=30) == -signal.SIGKILL
        finally:
            armed.kill()
        assert any(p["status"] not in TERMINAL for p in rows(db_url, "prediction")) or point in (
            "prediction.settled", "webhook.answered"), "the crash left nothing for the restart to do"
        restarted = _gateway(db_url, relay, tmp_path)
        try:
            assert wait_until_all_final(db_url, 60) < 60
            _expectations(point, db_url, relay, receiver)
        finally:
            restarted.stop()
    finally:
        receiver.stop()
    check_all(db_url, relay, settled=True)
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_every_crash_point_is_placed_in_the_code() -> None:
    app_dir = Path(__file__).resolve().parents[2] / "app"
    source = "\n".join(path.read_text() for path in app_dir.rglob("*.py"))
    for point in POINTS:
        assert f'crashpoints.reached("{point}")' in source, point


def test_a_slot_in_redis_left_by_a_crash_after_the_settlement_is_not_lost(
    db_url: str, relay: FakeRelay, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    secret = create_token(db_url, "one-at-a-time", max_in_flight=1)
    relay.starting_seconds, relay.processing_seconds = 0.3, 0.3
    limits = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    armed = _gateway(db_url, relay, tmp_path, test_crash_at="prediction.settled", **limits)
    try:
        with _api(armed, secret) as api:
            assert _create(api).status_code == 201
        assert armed.process is not None
        assert armed.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        armed.kill()
    restarted = _gateway(db_url, relay, tmp_path, **limits)
    try:
        with _api(restarted, secret) as api:
            # The settled prediction's slot was never given back in Redis: the database says it
            # is final, so this create takes it instead of waiting out the slot's half-hour life.
            assert _create(api).status_code == 201
        wait_until_all_final(db_url, 30)
    finally:
        restarted.stop()
    check_all(db_url, relay, settled=True)
