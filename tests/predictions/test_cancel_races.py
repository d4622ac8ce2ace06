"""A cancel racing the prediction's end, the reconciler, an upstream webhook and client polls: one
settlement or release, a ledger that adds up, and a final status that never changes (P2, P5)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from replicate.prediction import Prediction as ClientPrediction

from app.config import Settings
from app.db import HotReads, Transactions, make_engine, make_read_sessionmaker, make_sessionmaker
from app.jobs.reconciler import Reconciler
from app.predictions import service as prediction_service
from app.predictions.service import PredictionService
from app.upstream.registry import Registry
from tests.conftest import Gateway
from tests.dbtools import create_token, rows, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import TERMINAL, create, release_together
from tests.invariants import check_ledger

ROUNDS = 20
MODEL = "budget/model"  # $0.01 a prediction, estimated exactly
COST_MICROS = 10_000
# Only the path of the inbound URL is used: the test posts the upstream's hints itself.
PUBLIC_URL = "http://127.0.0.1:1/replicate"
FINISH_STEP = 0.0005


class OtherInstance:
    """The reconciler of another gateway instance on the same database and relay, whose passes
    the test starts (on an event loop of its own, in a thread)."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="other-instance", daemon=True)
        self._thread.start()
        self._closers: list[Callable[[], Any]] = []
        self.reconciler: Reconciler = self._run(self._build(settings))

    async def _build(self, settings: Settings) -> Reconciler:
        engine = make_engine(settings.database_url)
        sessions, read_sessions = make_sessionmaker(engine), make_read_sessionmaker(engine)
        hot_reads, transactions = HotReads(engine, read_sessions), Transactions(engine, sessions)
        registry = Registry.from_settings(settings)
        self._closers += [registry.aclose, hot_reads.dispose, transactions.dispose, engine.dispose]
        service = PredictionService(transactions=transactions, registry=registry, settings=settings,
                                    key=b"another instance", hot_reads=hot_reads, read_sessions=read_sessions)
        return Reconciler(sessions=sessions, transactions=transactions, read_sessions=read_sessions,
                          registry=registry, service=service, settings=settings)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def reconcile(self) -> int:
        """One reconciler pass; how many predictions it polled or resolved."""
        passed: int = self._run(self.reconciler.run_once())
        return passed

    def close(self) -> None:
        async def close_all() -> None:
            for close in self._closers:
                result = close()
                if asyncio.iscoroutine(result):
                    await result

        self._run(close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@dataclass
class Racing:
    """A gateway in front of the relay, a client of it, and another instance's reconciler."""

    gateway: Gateway
    api: httpx.Client
    relay: FakeRelay
    other: OtherInstance


@pytest.fixture
def racing(gateway_factory: Any, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch) -> Iterator[Racing]:
    # Every prediction runs until the test ends it, and is due for polling once created: only
    # the racers below write it (the gateway's own reconciler passes once, at start).
    relay.starting_seconds, relay.processing_seconds = 0, 60
    monkeypatch.setattr(prediction_service, "FIRST_POLL_SECONDS", 0)
    gateway: Gateway = gateway_factory(public_url=PUBLIC_URL, reconcile_interval=3600)
    other = OtherInstance(gateway.settings)
    try:
        with gateway.client(create_token(gateway.db_url, "racer", budget_micros=10_000_000)) as api:
            yield Racing(gateway, api, relay, other)
    finally:
        other.close()


@dataclass
class Running:
    """A prediction the relay is running: the gateway's id, the relay's, and its hint URL."""

    id: str
    upstream_id: str
    hint_url: str


def _running(race: Racing) -> Running:
    created = create(race.api, MODEL)
    assert created.status_code == 201, created.text
    call = race.relay.creates()[-1]
    hint_path = httpx.URL(call.json()["webhook"]).path
    return Running(created.json()["id"], str(call.prediction_id), race.gateway.url + hint_path)


def _hint(running: Running) -> httpx.Response:
    """The upstream's webhook for the prediction: only a hint, which makes the gateway poll."""
    return httpx.post(running.hint_url, json={"id": running.upstream_id, "status": "succeeded"}, timeout=10)


def _prediction(response: httpx.Response, running: Running) -> dict[str, Any]:
    """The answer is a prediction object the official client accepts, for this prediction."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    ClientPrediction(**body)
    assert body["id"] == running.id
    return body


def _stored_status(race: Racing, running: Running) -> str:
    (row,) = [p for p in rows(race.gateway.db_url, "prediction") if p["id"] == running.id]
    return str(row["status"])


def _settled(race: Racing, running: Running) -> str:
    """The prediction's final status, once the gateway has recorded it."""
    deadline = time.monotonic() + 5
    while (status := _stored_status(race, running)) not in TERMINAL:
        assert time.monotonic() < deadline, f"{running.id} still {status}"
        time.sleep(0.02)
    return status


def _stays(race: Racing, running: Running, final: str) -> None:
    """I6: asked again in every way, the final status stays what it is, here and upstream."""
    assert _prediction(race.api.get(f"/predictions/{running.id}"), running)["status"] == final
    assert _prediction(race.api.post(f"/predictions/{running.id}/cancel"), running)["status"] == final
    assert _hint(running).status_code == 204
    race.other.reconcile()
    time.sleep(0.05)  # the hint's refresh runs after its answer
    assert _stored_status(race, running) == final
    assert race.relay.predictions[running.upstream_id]["status"] == final


def _racers(race: Racing, running: Running, *, finish: bool, cancel: bool,
            finish_after: float = 0) -> list[Callable[[], Any]]:
    """What races: the relay ending the run (`finish_after` seconds after the start), the
    client's cancel, two client polls, the upstream's webhook and another instance's reconciler
    pass."""

    def finish_run() -> None:
        time.sleep(finish_after)
        race.relay.finish(running.upstream_id)

    with_cancel: list[Callable[[], Any]] = [lambda: race.api.post(f"/predictions/{running.id}/cancel")]
    with_finish: list[Callable[[], Any]] = [finish_run]
    return [
        *(with_cancel if cancel else []),
        *(with_finish if finish else []),
        lambda: race.api.get(f"/predictions/{running.id}"),
        lambda: race.api.get(f"/predictions/{running.id}"),
        lambda: _hint(running),
        race.other.reconcile,
    ]


def _race(racers: list[Callable[[], Any]]) -> list[Any]:
    return release_together(len(racers), lambda i: racers[i]())


def _check_round(race: Racing, running: Running, results: list[Any], canceled: httpx.Response) -> str:
    final = _settled(race, running)
    assert final == race.relay.predictions[running.upstream_id]["status"], "not the upstream's own end"
    assert _prediction(canceled, running)["status"] == final
    for result in results:
        if isinstance(result, httpx.Response) and result.request.method == "GET":
            assert _prediction(result, running)["status"] in ("processing", final)
        elif isinstance(result, httpx.Response):
            assert result.status_code in (200, 204), result.text
    _stays(race, running, final)
    check_ledger(race.gateway.db_url)
    return final


def _check_totals(race: Racing, finals: list[str], caplog: pytest.LogCaptureFixture) -> None:
    closing = [e for e in rows(race.gateway.db_url, "ledger_entry") if e["kind"] != "reservation"]
    assert len(closing) == len({e["prediction_id"] for e in closing}) == len(finals)
    token = token_row(race.gateway.db_url, "racer")
    assert token["spent_micros"] == COST_MICROS * finals.count("succeeded")
    assert (token["reserved_micros"], token["in_flight"]) == (0, 0)
    check_ledger(race.gateway.db_url, settled=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors


def test_a_cancel_after_the_upstream_finished_races_every_other_recorder(
    racing: Racing, caplog: pytest.LogCaptureFixture
) -> None:
    finals = []
    for _ in range(ROUNDS):
        running = _running(racing)
        racing.relay.finish(running.upstream_id)
        results = _race(_racers(racing, running, finish=False, cancel=True))
        finals.append(_check_round(racing, running, results[1:], results[0]))
    assert set(finals) == {"succeeded"}
    _check_totals(racing, finals, caplog)


def test_a_cancel_the_upstream_took_is_recorded_by_the_others_before_its_answer_returns(
    racing: Racing, caplog: pytest.LogCaptureFixture
) -> None:
    racing.relay.cancel_seconds = 0.2
    finals = []
    with ThreadPoolExecutor(1) as background:
        for _ in range(ROUNDS):
            running = _running(racing)
            canceling = background.submit(racing.api.post, f"/predictions/{running.id}/cancel")
            deadline = time.monotonic() + 5
            while not any(c.path.endswith(f"/{running.upstream_id}/cancel") for c in racing.relay.calls):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            # Canceled upstream, its answer still on its way: the upstream's end, the polls, the
            # hint and the other reconciler all find it canceled, and race to record it.
            results = _race(_racers(racing, running, finish=True, cancel=False))
            finals.append(_check_round(racing, running, results, canceling.result(timeout=10)))
    assert set(finals) == {"canceled"}
    _check_totals(racing, finals, caplog)


def test_a_cancel_and_the_upstream_finishing_at_the_same_moment(
    racing: Racing, caplog: pytest.LogCaptureFixture
) -> None:
    finals = []
    for i in range(ROUNDS):
        running = _running(racing)
        # The cancel takes a few milliseconds to reach the relay: ending the run a little later
        # each round lands the two on either side of each other and, in between, together.
        results = _race(_racers(racing, running, finish=True, cancel=True, finish_after=i * FINISH_STEP))
        finals.append(_check_round(racing, running, results[1:], results[0]))
    _check_totals(racing, finals, caplog)
