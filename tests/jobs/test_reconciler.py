"""The reconciler settles what clients abandon, resolves creates in doubt, and survives kill -9."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.columns import utcnow
from app.db import QueuedWriteSession
from app.jobs import reconciler
from app.jobs.reconciler import CONCURRENCY, RECORDING, due_for_polling, expired_idempotency_keys
from app.predictions import service as prediction_service
from tests.conftest import Gateway
from tests.dbtools import create_token, rows, sqlite_plan
from tests.fakes.relay import FakeRelay
from tests.helpers import TERMINAL, assert_problem, create, wait_terminal, wait_until_all_final
from tests.invariants import check_all, check_ledger
from tests.processes import GatewayProcess


@pytest.fixture
def quick_gateway(gateway_factory: Any) -> Gateway:
    gw: Gateway = gateway_factory(reconcile_interval=0.1, poll_backoff_max=0.3)
    return gw


def test_predictions_nobody_polls_are_settled(quick_gateway: Gateway, relay: FakeRelay) -> None:
    with quick_gateway.client(create_token(quick_gateway.db_url, "fire-and-forget")) as api:
        ids = [create(api, "budget/model", i=i).json()["id"] for i in range(6)]
    wait_until_all_final(quick_gateway.db_url, 20)
    settled = {p["id"]: p for p in rows(quick_gateway.db_url, "prediction")}
    assert {settled[i]["status"] for i in ids} == {"succeeded"}
    assert {settled[i]["cost_micros"] for i in ids} == {10_000}
    check_ledger(quick_gateway.db_url, settled=True)


def test_a_request_that_stays_in_progress_slows_the_reconciler_but_never_stops_it(
    quick_gateway: Gateway, relay: FakeRelay
) -> None:
    foreground = quick_gateway.server.server.config.app.fast_lane.foreground
    secret = create_token(quick_gateway.db_url, "held")
    with quick_gateway.client(secret) as api:
        ids = [create(api, "budget/model", i=i).json()["id"] for i in range(6)]
    relay.fail_next("hang", method="POST", seconds=6)

    def hold() -> None:
        with quick_gateway.client(secret) as held_api:
            held_api.post("/models/budget/model/predictions", json={"input": {"prompt": "held"}})

    held = threading.Thread(target=hold)
    held.start()
    try:
        deadline = time.monotonic() + 5
        while foreground.in_progress == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # No lull comes while the create hangs: the abandoned predictions settle all the same.
        while time.monotonic() < deadline:
            statuses = {p["id"]: p["status"] for p in rows(quick_gateway.db_url, "prediction")}
            if all(statuses[i] in TERMINAL for i in ids):
                break
            time.sleep(0.1)
        assert {statuses[i] for i in ids} == {"succeeded"}
        assert foreground.in_progress == 1, "settled while the held create was still in progress"
    finally:
        held.join(15)
    with quick_gateway.client(secret) as api:
        assert api.get("/predictions/nope").status_code == 404
    with quick_gateway.client("not-a-token") as api:
        assert api.get("/predictions/nope").status_code == 401
    assert foreground.in_progress == 0, "every request, answered or refused, is counted out"
    wait_until_all_final(quick_gateway.db_url, 20)
    check_ledger(quick_gateway.db_url, settled=True)


def test_a_backlog_larger_than_a_batch_is_drained_in_one_interval(gateway_factory: Any, relay: FakeRelay) -> None:
    # 130 predictions fall due together; at one batch of 50 per 8 s interval the last would wait
    # 16 s more. A full batch means more is due, so the reconciler goes straight on.
    gateway: Gateway = gateway_factory(reconcile_interval=8, poll_backoff_max=60)
    relay.starting_seconds, relay.processing_seconds = 0.2, 0  # answered "starting", then done
    with gateway.client(create_token(gateway.db_url, "backlog")) as api:
        created = [create(api, "budget/model", i=i) for i in range(130)]
    assert {r.json()["status"] for r in created} == {"starting"}
    started = time.monotonic()
    wait_until_all_final(gateway.db_url, 30)
    assert time.monotonic() - started < 8 + 6, "the backlog waited for later intervals"
    assert all(p["lease_until"] is None for p in rows(gateway.db_url, "prediction"))
    check_ledger(gateway.db_url, settled=True)


def test_a_create_in_doubt_is_failed_and_charged_at_the_estimate(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, connect_timeout=0.5, create_timeout=0.5)
    with gateway.client(create_token(gateway.db_url, "doubt")) as api:
        relay.fail_next("hang", seconds=2)
        assert_problem(create(api, "budget/model"), 504)
        wait_until_all_final(gateway.db_url, 15)
        (row,) = rows(gateway.db_url, "prediction")
        assert row["status"] == "failed"
        assert row["cost_micros"] == 10_000
        assert row["cost_note"].startswith("charged at the estimate")
        listed = api.get("/predictions").json()["results"]
        assert listed[0]["error"] == "The gateway could not confirm this prediction with the upstream"


def _gateway_behind_the_database(gateway_factory: Any, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Gateway:
    """A gateway whose prediction service's clock runs a minute behind the database's (on SQLite
    both are this process's: only the service's lags), once its reconciler has noticed."""
    monkeypatch.setattr(prediction_service, "utcnow", lambda: utcnow() - timedelta(seconds=60))
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, **settings)
    service = gateway.server.server.config.app.state.gateway.predictions
    deadline = time.monotonic() + 10
    while service._database_ahead < timedelta(seconds=59):
        assert time.monotonic() < deadline, "the reconciler never read the database's clock"
        time.sleep(0.05)
    return gateway


def test_a_process_whose_clock_runs_behind_the_databases_sets_no_deadline_already_past(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process's clock a minute behind the database's, against which the reconciler compares
    # the in-doubt deadline.
    gateway = _gateway_behind_the_database(gateway_factory, monkeypatch, create_timeout=5)
    with gateway.client(create_token(gateway.db_url, "lagging")) as api:
        relay.fail_next("hang", method="POST", seconds=1.5)  # many reconciler passes meanwhile
        created = create(api, "budget/model")
        assert created.status_code == 201, created.text
        assert wait_terminal(api, created.json()["id"])["status"] == "succeeded"
    (row,) = rows(gateway.db_url, "prediction")
    assert row["upstream_id"] is not None
    check_all(gateway.db_url, relay, settled=True)


def _at(value: datetime | str) -> datetime:
    """A timestamp as either database returns it from a plain SELECT (SQLite's is naive UTC text)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _wait_for_row(db_url: str, ready: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        (row,) = rows(db_url, "prediction")
        if ready(row):
            return row
        assert time.monotonic() < deadline, f"never came: {row}"
        time.sleep(0.05)


def _answered(relay: FakeRelay, method: str, status: int, path_end: str = "") -> int:
    return sum(1 for call in relay.calls if call.method == method and call.status == status
               and call.path.endswith(path_end))


def test_a_prediction_the_upstream_forgot_is_ended(
    quick_gateway: Gateway, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A minute of 404s, shortened to two seconds; three or more polls answered 404 in that time.
    monkeypatch.setattr(reconciler, "FORGOTTEN_AFTER", timedelta(seconds=2))
    relay.starting_seconds = 60
    with quick_gateway.client(create_token(quick_gateway.db_url, "lost")) as api:
        create(api, "budget/model")
    relay.forget(relay.creates()[0].prediction_id or "")
    wait_until_all_final(quick_gateway.db_url, 20)
    (row,) = rows(quick_gateway.db_url, "prediction")
    assert row["status"] == "failed"
    assert row["error"] == "The upstream no longer knows this prediction"
    # The first poll comes 2 s after the create, the 404s then last 2 s at least.
    assert _at(row["completed_at"]) - _at(row["created_at"]) >= timedelta(seconds=4)
    assert _answered(relay, "GET", 404) >= reconciler.FORGOTTEN_AFTER_POLLS
    assert row["missing_polls"] >= reconciler.FORGOTTEN_AFTER_POLLS
    assert row["cost_note"].startswith("charged at the estimate")


def test_a_few_404s_do_not_end_a_prediction_that_runs(quick_gateway: Gateway, relay: FakeRelay) -> None:
    # A relay's load balancer or a lagging replica answers 404 now and then for a prediction it runs.
    relay.starting_seconds = 5
    with quick_gateway.client(create_token(quick_gateway.db_url, "blip")) as api:
        create(api, "underestimated/model")
    upstream_id = relay.creates()[0].prediction_id or ""
    _wait_for_row(quick_gateway.db_url, lambda row: row["poll_attempts"] >= 3)
    relay.fail_next("status", 2, status=404, method="GET", path_contains=upstream_id)
    deadline = time.monotonic() + 10
    while _answered(relay, "GET", 404) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _answered(relay, "GET", 404) == 2
    wait_until_all_final(quick_gateway.db_url, 20)
    (row,) = rows(quick_gateway.db_url, "prediction")
    assert row["status"] == "succeeded"
    assert (row["cost_micros"], row["cost_note"]) == (10_000, None), "its real cost, not the estimate"
    assert (row["missing_polls"], row["missing_since"]) == (0, None), "an answer ends the run of 404s"


def test_a_run_of_404s_outlives_a_restart(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "FORGOTTEN_AFTER", timedelta(0))
    settings = {"reconcile_interval": 0.1, "poll_backoff_max": 3}
    relay.starting_seconds = 60
    first: Gateway = gateway_factory(**settings)
    with first.client(create_token(first.db_url, "restarted")) as api:
        create(api, "budget/model")
    _wait_for_row(first.db_url, lambda row: row["poll_attempts"] >= 3, timeout=20)
    relay.forget(relay.creates()[0].prediction_id or "")
    row = _wait_for_row(first.db_url, lambda row: row["missing_polls"] >= 1)
    first.server.stop()
    assert row["status"] == "starting"
    assert row["missing_since"] is not None
    gateway_factory(**settings)
    wait_until_all_final(first.db_url, 20)
    (row,) = rows(first.db_url, "prediction")
    assert row["status"] == "failed"
    assert row["error"] == "The upstream no longer knows this prediction"
    # One 404 before the restart, two after it: the run was counted on, not started again.
    assert _answered(relay, "GET", 404) == reconciler.FORGOTTEN_AFTER_POLLS


def _past_its_lifetime(gateway_factory: Any, name: str) -> dict[str, Any]:
    """The row of a prediction created behind a gateway whose predictions live 2 s, once final
    (costing 0.01 USD if it succeeds, estimated at half that)."""
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, poll_backoff_max=0.3, max_prediction_seconds=2)
    with gateway.client(create_token(gateway.db_url, name)) as api:
        create(api, "underestimated/model")
    wait_until_all_final(gateway.db_url, 20)
    (row,) = rows(gateway.db_url, "prediction")
    return row


def test_past_its_lifetime_a_prediction_the_upstream_finished_is_recorded_as_it_ended(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    # Finished upstream in 0.9 s, first polled at 2 s, when it is already past its lifetime; the
    # relay has no cancel endpoint.
    relay.fail_next("status", status=405, path_contains="/cancel")
    row = _past_its_lifetime(gateway_factory, "finished")
    assert row["status"] == "succeeded"
    assert (row["cost_micros"], row["cost_note"]) == (10_000, None), "its real cost, not the estimate"
    assert _answered(relay, "POST", 405, "/cancel") == 1


def test_past_its_lifetime_a_cancel_that_failed_is_not_sent_again_and_the_upstream_decides(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    # The cancel's 503 may have come after the relay acted on it: it is not sent again, and the
    # prediction, which runs on upstream, ends as the upstream ends it.
    relay.starting_seconds = 4
    relay.fail_next("status", status=503, path_contains="/cancel")
    row = _past_its_lifetime(gateway_factory, "late")
    assert row["status"] == "succeeded"
    assert (row["cost_micros"], row["cost_note"]) == (10_000, None), "its real cost, not the estimate"
    assert [call.status for call in relay.calls if call.path.endswith("/cancel")] == [503]


def test_past_its_lifetime_a_cancel_that_never_left_is_sent_on_a_later_pass(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    # A 429 proves the cancel was not acted on: sending it again later is still sending it once.
    relay.starting_seconds = 60
    relay.fail_next("throttle", path_contains="/cancel", retry_after=1)
    row = _past_its_lifetime(gateway_factory, "throttled")
    assert row["status"] == "canceled"
    assert row["cost_micros"] == 0
    assert [call.status for call in relay.calls if call.path.endswith("/cancel")] == [429, 200]


def test_past_its_lifetime_a_prediction_whose_cancel_failed_ends_after_the_grace(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three minutes, shortened to two seconds.
    monkeypatch.setattr(reconciler, "EXPIRY_GRACE", timedelta(seconds=2))
    relay.starting_seconds = 60
    relay.fail_next("status", status=503, path_contains="/cancel")
    row = _past_its_lifetime(gateway_factory, "stuck")
    assert row["status"] == "failed"
    assert row["error"] == "The prediction ran longer than the gateway's maximum lifetime"
    assert _at(row["completed_at"]) - _at(row["created_at"]) >= timedelta(seconds=4)
    assert (row["cost_micros"], row["cost_note"][:23]) == (5_000, "charged at the estimate")
    assert [call.status for call in relay.calls if call.path.endswith("/cancel")] == [503]


def test_a_prediction_past_its_lifetime_is_canceled_upstream(
    gateway_factory: Any, relay: FakeRelay
) -> None:
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, poll_backoff_max=0.3, max_prediction_seconds=2)
    relay.starting_seconds = 60
    with gateway.client(create_token(gateway.db_url, "slow")) as api:
        prediction = create(api, "budget/model").json()
    wait_until_all_final(gateway.db_url, 20)
    assert any(call.path.endswith("/cancel") for call in relay.calls)
    (row,) = rows(gateway.db_url, "prediction")
    assert row["id"] == prediction["id"]
    assert row["status"] == "canceled"
    assert row["cost_micros"] == 0


def test_a_cancel_after_deadline_is_kept_by_the_gateway_itself(gateway_factory: Any, relay: FakeRelay) -> None:
    # The fake relay ignores Cancel-After, as relays do: the gateway cancels at the deadline.
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, poll_backoff_max=30)
    relay.starting_seconds = 60
    with gateway.client(create_token(gateway.db_url, "deadline")) as api:
        created = api.post("/models/budget/model/predictions", json={"input": {}}, headers={"Cancel-After": "2s"})
        body = created.json()
        # Shorter than Replicate's minimum: taken as 5 s, and shown as the prediction's deadline.
        lifetime = datetime.fromisoformat(body["deadline"]) - datetime.fromisoformat(body["created_at"])
        assert abs(lifetime.total_seconds() - 5) < 0.01
        assert created.request.headers["cancel-after"] == "2s"
        assert relay.creates()[0].headers["cancel-after"] == "2s"
        time.sleep(3)
        assert api.get(f"/predictions/{body['id']}").json()["status"] == "starting"
        final = wait_terminal(api, body["id"], timeout=10)
    assert final["status"] == "canceled"
    assert final["deadline"] == body["deadline"]
    assert any(call.path.endswith("/cancel") for call in relay.calls)
    (row,) = rows(gateway.db_url, "prediction")
    assert row["cost_micros"] == 0
    ended = datetime.fromisoformat(final["completed_at"]) - datetime.fromisoformat(body["created_at"])
    assert 5 <= ended.total_seconds() < 7


def test_a_process_whose_clock_runs_behind_the_databases_keeps_the_cancel_after_deadline(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reconciler compares the deadline with the database's clock; this process's runs a minute
    # behind it, so a deadline taken from its own clock would be long past at once.
    gateway = _gateway_behind_the_database(gateway_factory, monkeypatch, poll_backoff_max=30)
    relay.starting_seconds = 60
    with gateway.client(create_token(gateway.db_url, "lagging")) as api:
        created = api.post("/models/budget/model/predictions", json={"input": {}}, headers={"Cancel-After": "5s"})
        assert created.status_code == 201, created.text
        body = created.json()
        started = time.monotonic()
        time.sleep(2.5)  # some 25 reconciler passes
        assert api.get(f"/predictions/{body['id']}").json()["status"] == "starting"
        final = wait_terminal(api, body["id"], timeout=10)
        waited = time.monotonic() - started
    assert final["status"] == "canceled"
    assert 4 <= waited < 8
    assert any(call.path.endswith("/cancel") for call in relay.calls)


def test_kill_9_during_creates_then_restart_settles_everything_within_a_minute(
    db_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    secret = create_token(db_url, "crashy", budget_micros=10_000_000)
    relay.starting_seconds = 0.5
    relay.processing_seconds = 0.5
    relay.fail_next("hang", count=3, seconds=3, method="POST")
    first = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                           workdir=tmp_path).start()

    def one(i: int) -> None:
        try:
            with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {secret}"}, timeout=10) as api:
                api.post("/models/budget/model/predictions", json={"input": {"i": i}})
        except httpx.TransportError:
            pass  # the gateway died under this request

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(0.6)
    first.kill()
    for thread in threads:
        thread.join()
    assert any(p["status"] not in TERMINAL for p in rows(db_url, "prediction")), "nothing was in flight"

    second = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                            workdir=tmp_path).start()
    try:
        elapsed = wait_until_all_final(db_url, 60)
    finally:
        second.stop()
    assert elapsed < 60
    check_all(db_url, relay, settled=True)


def test_a_batch_records_its_results_a_few_at_a_time(gateway_factory: Any, relay: FakeRelay) -> None:
    # Polls run side by side, but each result is a write transaction: recorded a few at a time, a
    # client's create waits behind those few, not behind the whole batch.
    gateway: Gateway = gateway_factory(reconcile_interval=0.2, poll_backoff_max=60)
    relay.starting_seconds, relay.processing_seconds = 0.2, 0
    service = gateway.server.server.config.app.state.gateway.predictions
    original = service.apply_upstream_state
    recording = {"now": 0, "most": 0, "calls": 0}

    async def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("first"):  # a create linking its answer, not a poll's result
            return await original(*args, **kwargs)
        recording["now"] += 1
        recording["calls"] += 1
        recording["most"] = max(recording["most"], recording["now"])
        try:
            return await original(*args, **kwargs)
        finally:
            recording["now"] -= 1

    # Watching from the start: on a slow machine the first results come in while creates go on.
    service.apply_upstream_state = spy
    with gateway.client(create_token(gateway.db_url, "batch")) as api:
        created = [create(api, "budget/model", i=i) for i in range(40)]
    assert {r.json()["status"] for r in created} == {"starting"}
    wait_until_all_final(gateway.db_url, 30)
    assert recording["calls"] >= 40
    assert 1 <= recording["most"] <= RECORDING < CONCURRENCY
    check_ledger(gateway.db_url, settled=True)


def test_on_sqlite_the_due_batch_is_read_in_poll_order_from_its_index_never_sorted(sqlite_template: Path) -> None:
    # Sorting every unfinished prediction on each pass made a backlog cost more the longer it got.
    plan = sqlite_plan(sqlite_template, due_for_polling(utcnow()))
    assert "ix_prediction_next_poll_at" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


def test_on_sqlite_expired_idempotency_keys_are_found_through_their_own_index(sqlite_template: Path) -> None:
    # Through the index of every prediction's creation time, the sweep walked everything older
    # than a day: 2.1 s at a million predictions, holding the write lock.
    plan = sqlite_plan(sqlite_template, expired_idempotency_keys(utcnow()))
    assert "ix_prediction_keyed_created_at" in plan, plan


def test_an_idempotency_key_is_forgotten_once_it_is_old_enough(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A day and ten minutes, shortened to four seconds and every pass.
    monkeypatch.setattr(reconciler, "IDEMPOTENCY_KEY_HOURS", 4 / 3600)
    monkeypatch.setattr(reconciler, "KEY_SWEEP_EVERY", timedelta(0))
    gateway: Gateway = gateway_factory(reconcile_interval=0.1)

    def keyed(api: httpx.Client, key: str) -> str:
        answer = api.post("/models/budget/model/predictions", json={"input": {}}, headers={"Idempotency-Key": key})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def keys() -> dict[str, str | None]:
        return {row["id"]: row["idempotency_key"] for row in rows(gateway.db_url, "prediction")}

    with gateway.client(create_token(gateway.db_url, "keyed")) as api:
        old = keyed(api, "old")
        time.sleep(4.5)
        recent = keyed(api, "recent")
        deadline = time.monotonic() + 2
        while keys()[old] is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keys() == {old: None, recent: "recent"}
        assert keyed(api, "recent") == recent, "a recent key still replays"
        again = keyed(api, "old")
        assert again not in (old, recent), "an expired key makes a new prediction"
    wait_until_all_final(gateway.db_url, 20)


def test_on_sqlite_the_reconciler_writes_through_the_group_commit_never_a_write_session(
    gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write session holds the process's write lock across a thread hop per statement (1.5 to
    # 2 ms a claim); the requests' admissions queued behind every claim and release.
    gateway: Gateway = gateway_factory(reconcile_interval=0.1, poll_backoff_max=0.3)
    if not gateway.db_url.startswith("sqlite"):
        pytest.skip("SQLite only: its single write lock")
    relay.starting_seconds, relay.processing_seconds = 0.3, 0.3
    with gateway.client(create_token(gateway.db_url, "quiet")) as api:
        time.sleep(0.5)  # the first pass, which also sweeps old idempotency keys, is behind us
        opened: list[str] = []
        entered = QueuedWriteSession.__aenter__

        async def counted(self: QueuedWriteSession) -> QueuedWriteSession:
            opened.append(threading.current_thread().name)
            return await entered(self)

        monkeypatch.setattr(QueuedWriteSession, "__aenter__", counted)
        ids = [create(api, "budget/model", i=i).json()["id"] for i in range(12)]
        wait_until_all_final(gateway.db_url, 20)
    settled = {p["id"]: p for p in rows(gateway.db_url, "prediction")}
    assert {settled[i]["status"] for i in ids} == {"succeeded"}
    assert all(settled[i]["poll_attempts"] >= 1 for i in ids)  # the reconciler, not a client, settled them
    assert opened == []
    check_ledger(gateway.db_url, settled=True)
