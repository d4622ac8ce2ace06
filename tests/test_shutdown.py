"""A SIGTERM drains the gateway: it refuses new connections, answers what it accepted, ends open event
streams with an error event, and exits; a restart then finds everything it stored (P14)."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from replicate.prediction import Prediction as ClientPrediction

from tests.dbtools import create_token, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import wait_until_all_final
from tests.invariants import check_all
from tests.processes import GatewayProcess


def test_sigterm_ends_open_streams_with_an_error_event_and_the_process_exits(
    db_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    relay.processing_seconds = 60  # the prediction outlives the gateway
    gateway = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                             workdir=tmp_path).start()
    assert gateway.process is not None
    try:
        secret = create_token(db_url, "streamer")
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {secret}"}) as api:
            created = api.post("/models/llm/echo/predictions", json={"input": {"text": "a b"}, "stream": True})
        assert created.status_code == 201, created.text
        lines: list[str] = []
        opened = threading.Event()

        def read() -> None:
            with httpx.stream("GET", created.json()["urls"]["stream"], timeout=30) as response:
                opened.set()
                lines.extend(response.iter_lines())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert opened.wait(5)
        time.sleep(0.5)
        stopping = time.monotonic()
        gateway.process.terminate()
        reader.join(timeout=10)
        assert not reader.is_alive(), "the stream kept the connection open through the shutdown"
        assert "event: error" in lines
        assert any(line.startswith("data: ") and "restarting" in line for line in lines)
        assert "event: done" not in lines, "the prediction has not ended"
        # uvicorn raises the signal again once it has shut down, so the exit is the signal's.
        assert gateway.process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert time.monotonic() - stopping < 10
    finally:
        gateway.stop()


DRAIN_SECONDS = 10
LOAD_THREADS = 6
STREAMS = 3
# What a request cut off before the server read it meets: the connection refused, or closed
# while it sat idle between two requests (keep-alive) as the drain began, with a reset when the
# request's bytes were already waiting in it unread. Whether a create so cut left anything
# behind is checked against the database after the restart.
NOT_ACCEPTED = ("ConnectError", "Server disconnected without sending a response.", "Connection reset by peer")


@dataclass
class Outcome:
    """One request of the load, as its client saw it."""

    what: str
    marker: str | None
    status: int | None = None
    body: Any = None
    content_type: str = ""
    failure: str | None = None

    @property
    def refused(self) -> bool:
        return self.failure == "ConnectError"


def _send(api: httpx.Client, what: str, method: str, path: str, marker: str | None = None,
          **kwargs: Any) -> Outcome:
    try:
        response = api.request(method, path, **kwargs)
    except httpx.ConnectError:
        return Outcome(what, marker, failure="ConnectError")
    except httpx.TransportError as error:
        return Outcome(what, marker, failure=str(error) or type(error).__name__)
    try:
        body = response.json()
    except ValueError:  # not JSON at all: kept as text, for the assertion to show
        body = response.text
    return Outcome(what, marker, response.status_code, body, response.headers.get("content-type", ""))


def _assert_complete(outcome: Outcome) -> None:
    """A whole answer: a prediction the official client accepts, or a clean problem; never a 500."""
    if outcome.status in (200, 201):
        ClientPrediction(**outcome.body)
    else:
        assert outcome.status != 500, outcome
        assert outcome.content_type.startswith("application/problem+json"), outcome
        assert outcome.body["status"] == outcome.status, outcome


def _markers(db_url: str) -> list[str]:
    inputs = [p["input"] for p in rows(db_url, "prediction")]
    decoded = [json.loads(i) if isinstance(i, str) else i for i in inputs]
    return [i["marker"] for i in decoded if "marker" in i]


def test_sigterm_under_load_drains_what_was_accepted_refuses_the_rest_and_loses_nothing(
    db_url: str, relay: FakeRelay, tmp_path: Path
) -> None:
    secret = create_token(db_url, "loaded", budget_micros=100_000_000)
    auth = {"Authorization": f"Bearer {secret}"}
    settings = {"drain_seconds": str(DRAIN_SECONDS), "create_timeout": "5"}
    gateway = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                             workdir=tmp_path, **settings).start()
    assert gateway.process is not None
    outcomes: list[Outcome] = []
    streams: list[list[str]] = []
    stopped = threading.Event()
    try:
        relay.processing_seconds = 60  # the streamed predictions outlive the gateway
        with httpx.Client(base_url=gateway.url, headers=auth, timeout=30) as api:
            streamed = [api.post("/models/llm/echo/predictions", json={"input": {"text": "a b"}, "stream": True})
                        for _ in range(STREAMS)]
        assert [r.status_code for r in streamed] == [201] * STREAMS
        relay.starting_seconds, relay.processing_seconds = 0.1, 0.3

        def read(url: str, lines: list[str]) -> None:
            with httpx.stream("GET", url, timeout=30) as response:
                lines.extend(response.iter_lines())

        def load(worker: int) -> list[Outcome]:
            mine: list[Outcome] = []
            with httpx.Client(base_url=gateway.url, headers=auth, timeout=30) as api:
                for n in itertools.count():
                    marker = f"{worker}-{n}"
                    created = _send(api, "create", "POST", "/models/budget/model/predictions", marker,
                                    json={"input": {"marker": marker}})
                    mine.append(created)
                    if created.status == 201:
                        mine += [_send(api, "poll", "GET", f"/predictions/{created.body['id']}") for _ in range(2)]
                    if mine[-1].refused or (stopped.is_set() and mine[-1].failure):
                        return mine

        def slow_create() -> Outcome:
            # Held by the relay through the signal: accepted before it, answered after it.
            with httpx.Client(base_url=gateway.url, headers=auth, timeout=30) as api:
                return _send(api, "slow create", "POST", "/models/black-forest-labs/flux-schnell/predictions",
                             "slow", json={"input": {"marker": "slow"}})

        streams = [[] for _ in streamed]  # each stream's lines, as its reader got them
        readers = [threading.Thread(target=read, args=(r.json()["urls"]["stream"], lines), daemon=True)
                   for r, lines in zip(streamed, streams, strict=True)]
        for reader in readers:
            reader.start()
        with ThreadPoolExecutor(LOAD_THREADS + 1) as pool:
            loads = [pool.submit(load, worker) for worker in range(LOAD_THREADS)]
            time.sleep(1.5)
            relay.fail_next("hang", seconds=2.5, path_contains="flux-schnell")
            slow = pool.submit(slow_create)
            while not any("flux-schnell" in call.path for call in relay.calls):
                time.sleep(0.01)
            stopping = time.monotonic()
            gateway.process.terminate()
            stopped.set()
            refused_at = None
            with httpx.Client(base_url=gateway.url, timeout=5) as late:
                while refused_at is None and time.monotonic() - stopping < 2:
                    # A new connection for each try: a kept-alive one would be the drain's to end.
                    if _send(late, "late", "GET", "/predictions", headers={"Connection": "close"}).refused:
                        refused_at = time.monotonic()
                    time.sleep(0.02)
            assert refused_at is not None, "new connections were still taken two seconds into the drain"
            assert not slow.done(), "nothing was left in flight when the connections were refused"
            outcomes = [o for done in loads for o in done.result(timeout=DRAIN_SECONDS + 5)]
            outcomes.append(slow.result(timeout=DRAIN_SECONDS + 5))
        assert gateway.process.wait(timeout=DRAIN_SECONDS + 5) in (0, -signal.SIGTERM)
        assert time.monotonic() - stopping < DRAIN_SECONDS, "the process outlived its drain timeout"
        for reader in readers:
            reader.join(timeout=5)
            assert not reader.is_alive()
    finally:
        stopped.set()
        gateway.stop()

    assert sum(1 for o in outcomes if o.status == 201) >= LOAD_THREADS, "too little load to mean anything"
    for outcome in outcomes:
        if outcome.failure is None:
            _assert_complete(outcome)
        else:
            assert outcome.failure.endswith(NOT_ACCEPTED), outcome
    assert outcomes[-1].status == 201, outcomes[-1]
    for lines in streams:
        assert "event: error" in lines, lines
        assert "event: done" not in lines

    restarted = GatewayProcess(db_url=db_url, upstream_url=relay.upstream_url, upstream_token=relay.key,
                               workdir=tmp_path, **settings).start()
    try:
        with httpx.Client(base_url=restarted.url, headers=auth, timeout=30) as api:
            for response in streamed:
                assert api.post(f"/predictions/{response.json()['id']}/cancel").json()["status"] == "canceled"
        wait_until_all_final(db_url, 30)
    finally:
        restarted.stop()
    answered = [o.marker for o in outcomes if o.what != "poll" and o.status == 201]
    stored = _markers(db_url)
    # Every create answered 201 is stored once, and none that was cut off is stored at all.
    assert sorted(stored) == sorted(answered)
    predictions = rows(db_url, "prediction")
    assert all(p["upstream_id"] for p in predictions), "a create was left in doubt"
    assert len(relay.creates()) == len(predictions)
    check_all(db_url, relay, settled=True)
