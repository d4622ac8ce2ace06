"""The database away: callers get a 503 they may retry, nothing goes upstream unrecorded, and what a
create could not write while it was away is written once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import replicate
from sqlalchemy import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import sqlite_inline
from app.db import database_unavailable
from app.jobs import reconciler as reconciler_module
from app.main import create_app
from app.predictions import service as service_module
from app.predictions.deferred import DeferredWrites
from tests.conftest import make_settings
from tests.dbtools import create_token, rows, token_row, truncate_all
from tests.fakes.relay import FakeRelay
from tests.fakes.tcp_cut import CuttableLink
from tests.helpers import assert_problem, wait_terminal
from tests.invariants import check_all
from tests.servers import ServerThread

MODEL_PATH = "/models/black-forest-labs/flux-schnell/predictions"


@dataclass
class Cuttable:
    """A gateway whose only way to PostgreSQL is a link the test can cut."""

    api: httpx.Client
    link: CuttableLink
    db_url: str
    secret: str
    url: str


@contextlib.contextmanager
def _cuttable_gateway(postgres_migrated: str, relay: FakeRelay, tmp_path: Path, **overrides: Any) -> Iterator[Cuttable]:
    truncate_all(postgres_migrated)
    direct = make_url(postgres_migrated)
    with CuttableLink(direct.port or 5432, direct.host or "127.0.0.1") as link:
        through_link = direct.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
        # Auth read from the database on every request, so a cut is seen at once.
        settings = make_settings(through_link, relay.upstream_url, relay.key, storage_dir=tmp_path / "storage",
                                 auth_cache_seconds=0, **overrides)
        server = ServerThread(create_app(settings)).start()
        secret = create_token(postgres_migrated, "team-a")
        try:
            with httpx.Client(base_url=server.url + "/replicate/v1", timeout=30,
                              headers={"Authorization": f"Bearer {secret}"}) as api:
                yield Cuttable(api, link, postgres_migrated, secret, server.url)
        finally:
            link.restore()
            link.refuse_statements(None)
            server.stop()
    check_all(postgres_migrated, relay)


@pytest.fixture
def cuttable(postgres_migrated: str, relay: FakeRelay, tmp_path: Path) -> Iterator[Cuttable]:
    with _cuttable_gateway(postgres_migrated, relay, tmp_path) as gateway:
        yield gateway


def _cut_once_the_relay_has_the_create(cuttable: Cuttable, relay: FakeRelay, *, then: float = 0.0) -> None:
    """Cut the link to the database `then` seconds after a create reaches the relay: after its
    admission committed, whatever the machine's speed."""

    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(call.method == "POST" for call in relay.calls):
                time.sleep(then)
                cuttable.link.cut()
                return
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()


def _row(db_url: str, prediction_id: str) -> dict[str, Any]:
    return next(row for row in rows(db_url, "prediction") if row["id"] == prediction_id)


def _assert_released_once_the_database_is_back(cuttable: Cuttable, prediction_id: str) -> None:
    """The pending row is rejected, at no cost, and the token's counters are back to zero."""
    deadline = time.monotonic() + 10
    while _row(cuttable.db_url, prediction_id)["submission"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    row = _row(cuttable.db_url, prediction_id)
    assert (row["submission"], row["status"], row["cost_micros"]) == ("rejected", "failed", 0)
    token = token_row(cuttable.db_url, "team-a")
    assert (token["in_flight"], token["reserved_micros"], token["spent_micros"]) == (0, 0, 0)


def test_requests_while_the_database_is_away_get_a_503_and_nothing_goes_upstream(
    cuttable: Cuttable, relay: FakeRelay, caplog: pytest.LogCaptureFixture
) -> None:
    api = cuttable.api
    created = api.post(MODEL_PATH, json={"input": {"prompt": "before"}})
    assert created.status_code == 201, created.text
    prediction_id = created.json()["id"]
    cuttable.link.cut()
    for response in (
        api.post(MODEL_PATH, json={"input": {"prompt": "during"}}),
        api.post("/predictions", json={"version": "black-forest-labs/flux-schnell", "input": {"prompt": "during"}}),
        api.get(f"/predictions/{prediction_id}"),
        api.get("/predictions"),
        api.post(f"/predictions/{prediction_id}/cancel"),
    ):
        body = assert_problem(response, 503)
        assert response.headers["retry-after"] == "3"
        assert "database" in body["detail"]
    assert len(relay.creates()) == 1
    # Not a line per request: one every few seconds.
    assert len([record for record in caplog.records if record.msg == "database.unavailable"]) <= 1
    cuttable.link.restore()
    again = api.post(MODEL_PATH, json={"input": {"prompt": "after"}})
    assert again.status_code == 201, again.text
    assert wait_terminal(api, prediction_id)["status"] == "succeeded"
    assert wait_terminal(api, again.json()["id"])["status"] == "succeeded"
    assert len(rows(cuttable.db_url, "prediction")) == 2
    assert token_row(cuttable.db_url, "team-a")["in_flight"] == 0


def test_the_python_client_retries_a_get_through_an_outage(cuttable: Cuttable) -> None:
    client = replicate.Client(api_token=cuttable.secret, base_url=cuttable.url + "/replicate")
    prediction = client.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "x"})
    cuttable.link.cut()
    threading.Timer(1.0, cuttable.link.restore).start()
    started = time.monotonic()
    fetched = client.predictions.get(prediction.id)
    # Retried once, after the Retry-After the 503 gave.
    assert fetched.id == prediction.id
    assert time.monotonic() - started >= 2.5


def test_a_create_the_upstream_accepted_as_the_database_went_away_is_answered_and_linked_once_it_is_back(
    cuttable: Cuttable, relay: FakeRelay
) -> None:
    api = cuttable.api
    # The relay takes 0.8 s to accept; the database goes away meanwhile.
    relay.fail_next("hang", seconds=0.8, method="POST", path_contains="/predictions")
    _cut_once_the_relay_has_the_create(cuttable, relay)
    created = api.post(MODEL_PATH, json={"input": {"prompt": "during"}})
    assert created.status_code == 201, created.text
    answer = created.json()
    assert answer["status"] == "starting"
    assert answer["urls"]["get"].startswith(cuttable.url)
    assert len(relay.creates()) == 1
    assert_problem(api.get(f"/predictions/{answer['id']}"), 503)
    row = _row(cuttable.db_url, answer["id"])
    assert (row["submission"], row["upstream_id"]) == ("pending", None)
    cuttable.link.restore()
    assert wait_terminal(api, answer["id"])["status"] == "succeeded"
    row = _row(cuttable.db_url, answer["id"])
    assert row["upstream_id"] == relay.creates()[0].prediction_id
    assert row["cost_micros"] == 6000


def test_a_sync_create_whose_wait_meets_the_database_away_is_answered_with_its_last_state(
    cuttable: Cuttable, relay: FakeRelay
) -> None:
    relay.honour_prefer = False  # the gateway polls the upstream itself until the wait ends
    # After the create is linked, before the first poll that finds it processing.
    _cut_once_the_relay_has_the_create(cuttable, relay, then=0.2)
    created = cuttable.api.post(MODEL_PATH, json={"input": {"prompt": "wait"}}, headers={"Prefer": "wait=5"})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "starting"
    assert len(relay.creates()) == 1
    cuttable.link.restore()
    assert wait_terminal(cuttable.api, created.json()["id"])["status"] == "succeeded"


def test_a_create_the_upstream_refused_while_the_database_was_away_is_released_once_it_is_back(
    cuttable: Cuttable, relay: FakeRelay
) -> None:
    api = cuttable.api
    relay.fail_next("status", status=422, after_seconds=0.8, method="POST", path_contains="/predictions")
    _cut_once_the_relay_has_the_create(cuttable, relay)
    refused = api.post(MODEL_PATH, json={"input": {"prompt": "during"}})
    assert_problem(refused, 422)
    [row] = rows(cuttable.db_url, "prediction")
    assert row["submission"] == "pending"
    cuttable.link.restore()
    _assert_released_once_the_database_is_back(cuttable, row["id"])


def test_a_create_whose_admission_committed_without_its_answer_gets_a_503_and_is_released_once_the_database_is_back(
    cuttable: Cuttable, relay: FakeRelay
) -> None:
    # The admission (row, reservation and the token's counters in one statement) commits, and
    # the link goes down before its answer arrives: the gateway cannot know it landed.
    cuttable.link.cut_once_answered(b"WITH admitted AS")
    refused = cuttable.api.post(MODEL_PATH, json={"input": {"prompt": "lost answer"}})
    assert_problem(refused, 503)
    assert relay.creates() == []
    [row] = rows(cuttable.db_url, "prediction")
    assert row["submission"] == "pending"
    assert token_row(cuttable.db_url, "team-a")["in_flight"] == 1
    cuttable.link.restore()
    _assert_released_once_the_database_is_back(cuttable, row["id"])
    assert relay.creates() == []


def test_the_reconciler_leaves_alone_a_create_whose_link_is_still_waiting_for_the_database(
    postgres_migrated: str, relay: FakeRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A create in doubt: no upstream id past its deadline. Its own create holds the upstream's
    # id, waiting to write it; resolving it as lost meanwhile would fail a prediction that runs.
    monkeypatch.setattr(service_module, "IN_DOUBT_MARGIN_SECONDS", 0.3)
    monkeypatch.setattr(reconciler_module, "IN_DOUBT_MARGIN_SECONDS", 0.3)
    with _cuttable_gateway(postgres_migrated, relay, tmp_path, connect_timeout=0.5, create_timeout=1.0,
                           reconcile_interval=0.1) as gateway:
        gateway.link.refuse_statements(b"UPDATE prediction SET upstream_id=")
        created = gateway.api.post(MODEL_PATH, json={"input": {"prompt": "link later"}})
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]
        # Past its deadline (1.8 s) and through several of the reconciler's passes.
        time.sleep(3.0)
        row = _row(gateway.db_url, prediction_id)
        assert (row["status"], row["submission"], row["upstream_id"]) == ("starting", "pending", None)
        gateway.link.refuse_statements(None)
        assert wait_terminal(gateway.api, prediction_id)["status"] == "succeeded"
        row = _row(gateway.db_url, prediction_id)
        assert row["upstream_id"] == relay.creates()[0].prediction_id
        assert row["cost_micros"] == 6000


def test_a_create_that_waited_out_sqlites_lock_gets_a_503(
    tmp_path: Path, sqlite_template: Path, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.db"
    path.write_bytes(sqlite_template.read_bytes())
    db_url = f"sqlite:///{path}"
    monkeypatch.setattr(sqlite_inline, "LOCK_WAIT_SECONDS", 0.3)
    server = ServerThread(create_app(make_settings(db_url, relay.upstream_url, relay.key,
                                                   storage_dir=tmp_path / "storage"))).start()
    secret = create_token(db_url, "team-a")
    other_process = sqlite3.connect(path, isolation_level=None)
    try:
        with httpx.Client(base_url=server.url + "/replicate/v1", timeout=30,
                          headers={"Authorization": f"Bearer {secret}"}) as api:
            other_process.execute("BEGIN IMMEDIATE")
            refused = api.post(MODEL_PATH, json={"input": {"prompt": "locked"}})
            assert_problem(refused, 503)
            assert refused.headers["retry-after"] == "3"
            assert relay.creates() == []
            other_process.execute("ROLLBACK")
            created = api.post(MODEL_PATH, json={"input": {"prompt": "free"}})
            assert created.status_code == 201, created.text
            wait_terminal(api, created.json()["id"])
    finally:
        other_process.close()
        server.stop()
    assert len(rows(db_url, "prediction")) == 1
    check_all(db_url, relay)


class _AsyncpgLike(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("error", "unavailable"), [
    (ConnectionRefusedError(111, "refused"), True),
    (ConnectionResetError(104, "reset"), True),
    (TimeoutError(), True),
    (PoolTimeout("QueuePool limit reached"), True),
    (_AsyncpgLike("57P01"), True),  # the server is shutting down
    (_AsyncpgLike("08006"), True),  # the connection failed
    (_AsyncpgLike("53300"), True),  # too many connections
    (OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked")), True),
    (OperationalError("SELECT 1", {}, sqlite3.OperationalError("no such table: prediction")), False),
    (OperationalError("SELECT 1", {}, _AsyncpgLike("42P01")), False),  # no such table
    (IntegrityError("INSERT", {}, _AsyncpgLike("23505")), False),
    (FileNotFoundError(2, "missing"), False),
    (ValueError("bad"), False),
])
def test_what_counts_as_the_database_being_away(error: BaseException, unavailable: bool) -> None:
    assert database_unavailable(error) is unavailable


def test_a_lost_connection_counts_as_the_database_being_away() -> None:
    error = OperationalError("SELECT 1", {}, _AsyncpgLike("XX000"), connection_invalidated=True)
    assert database_unavailable(error)


async def test_a_deferred_write_is_retried_while_the_database_is_away_and_only_then() -> None:
    deferred = DeferredWrites(first_pause=0.01)
    attempts: list[str] = []

    async def write_after_two_refusals() -> None:
        attempts.append("a")
        if attempts.count("a") < 3:
            raise ConnectionRefusedError(111, "refused")

    async def write_with_a_bug() -> None:
        attempts.append("b")
        raise ValueError("not the database")

    deferred.add("link", "a", write_after_two_refusals)
    deferred.add("link", "b", write_with_a_bug)
    assert deferred.holds("a")
    assert deferred.holds("b")
    deadline = time.monotonic() + 5
    while len(deferred) and time.monotonic() < deadline:
        await _tick()
    assert attempts.count("a") == 3
    assert attempts.count("b") == 1
    assert not deferred.holds("a")


async def test_on_close_a_waiting_write_is_tried_once_more_and_given_up_only_if_it_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deferred = DeferredWrites(first_pause=30)  # both still pausing when the process stops
    attempts: list[str] = []

    async def lands() -> None:
        attempts.append("lands")

    async def never_lands() -> None:
        attempts.append("never")
        raise ConnectionRefusedError(111, "refused")

    deferred.add("link", "p1", lands)
    deferred.add("rejection", "p2", never_lands)
    await _tick()
    await deferred.aclose()
    assert sorted(attempts) == ["lands", "never"]
    assert len(deferred) == 0
    abandoned = [getattr(record, "prediction_id", None) for record in caplog.records
                 if record.msg == "database.deferred_write_abandoned"]
    assert abandoned == ["p2"]


async def test_a_write_with_a_record_is_kept_on_disk_until_it_lands(tmp_path: Path) -> None:
    journal = tmp_path / "deferred-writes"
    deferred = DeferredWrites(first_pause=0.01, journal=journal)
    database_back = asyncio.Event()

    async def write_once_back() -> None:
        if not database_back.is_set():
            raise ConnectionRefusedError(111, "refused")

    async def write_with_a_bug() -> None:
        raise ValueError("not the database")

    deferred.add("link", "p1", write_once_back, record={"reply": {"id": "up-1"}})
    deferred.add("rejection", "p2", write_with_a_bug, record={"reason": "why"})
    deferred.add("link", "p3", write_once_back)  # no record: in memory only
    assert sorted(path.name for path in journal.iterdir()) == ["p1.link.json", "p2.rejection.json"]
    await _tick()  # p2 tried once and given up, the others still waiting
    # What a process that starts now would find: the waiting write, from its file alone.
    assert DeferredWrites(journal=journal).kept() == [("link", "p1", {"reply": {"id": "up-1"}})]
    assert [deferred.holds(p) for p in ("p1", "p2", "p3")] == [True, False, True]
    database_back.set()
    deadline = time.monotonic() + 5
    while len(deferred) and time.monotonic() < deadline:
        await _tick()
    assert len(deferred) == 0
    assert list(journal.iterdir()) == []


async def test_a_write_abandoned_at_close_stays_on_disk_for_the_next_start(tmp_path: Path) -> None:
    journal = tmp_path / "deferred-writes"
    deferred = DeferredWrites(first_pause=30, journal=journal)

    async def never_lands() -> None:
        raise ConnectionRefusedError(111, "refused")

    deferred.add("rejection", "p1", never_lands, record={"reason": "database away"})
    await _tick()
    await deferred.aclose(last_attempt_seconds=0.5)
    (journal / "stray.json.part").write_bytes(b"{")  # a write cut short: never read back
    (journal / "broken.json").write_bytes(b"not json")
    assert DeferredWrites(journal=journal).kept() == [("rejection", "p1", {"reason": "database away"})]


def test_kept_writes_are_resumed_at_start_and_one_that_cannot_be_read_back_stops_nothing(
    gateway_factory: Any, tmp_path: Path
) -> None:
    journal = tmp_path / "storage" / service_module.DEFERRED_WRITES_DIR
    journal.mkdir(parents=True)
    (journal / "gone.rejection.json").write_bytes(orjson.dumps(
        {"what": "rejection", "prediction_id": "gone", "record": {"reason": "database away"}}))
    (journal / "bad.link.json").write_bytes(orjson.dumps(
        {"what": "link", "prediction_id": "bad", "record": {"reply": {"id": "", "status": "nonsense"}}}))
    gateway = gateway_factory()
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    deadline = time.monotonic() + 5
    # The rejection of a prediction that was never written has nothing left to do: done.
    while (journal / "gone.rejection.json").exists():
        assert time.monotonic() < deadline, "the kept rejection was never resumed"
        time.sleep(0.05)
    assert [path.name for path in journal.iterdir()] == ["bad.link.json"]


def test_a_link_kept_on_disk_is_made_by_a_process_that_never_had_it_in_memory(
    postgres_migrated: str, relay: FakeRelay, tmp_path: Path
) -> None:
    # The first process cannot write the link (the statement is refused: the database away for
    # it), as when it is killed before the database is back; a second process on the same
    # storage, which never saw the create, reads the kept write back at its start and makes it.
    with _cuttable_gateway(postgres_migrated, relay, tmp_path) as gateway:
        gateway.link.refuse_statements(b"UPDATE prediction SET upstream_id=")
        created = gateway.api.post(MODEL_PATH, json={"input": {"prompt": "kept"}})
        assert created.status_code == 201, created.text
        prediction_id = created.json()["id"]
        journal = tmp_path / "storage" / service_module.DEFERRED_WRITES_DIR
        assert [path.name for path in journal.iterdir()] == [f"{prediction_id}.link.json"]
        assert gateway.secret not in (journal / f"{prediction_id}.link.json").read_text()
        assert _row(gateway.db_url, prediction_id)["upstream_id"] is None
        settings = make_settings(postgres_migrated, relay.upstream_url, relay.key, storage_dir=tmp_path / "storage")
        second = ServerThread(create_app(settings)).start()
        try:
            deadline = time.monotonic() + 10
            while _row(gateway.db_url, prediction_id)["upstream_id"] is None:
                assert time.monotonic() < deadline, "the kept link was never made"
                time.sleep(0.05)
            with httpx.Client(base_url=second.url + "/replicate/v1", timeout=30,
                              headers={"Authorization": f"Bearer {gateway.secret}"}) as api:
                assert wait_terminal(api, prediction_id)["status"] == "succeeded"
            assert list(journal.iterdir()) == []
        finally:
            second.stop()
        assert _row(gateway.db_url, prediction_id)["upstream_id"] == relay.creates()[0].prediction_id


async def _tick() -> None:
    await asyncio.sleep(0.02)
